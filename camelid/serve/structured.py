"""Structured output: `response_format` (json_object, json_schema) as a grammar for the sampler.

The schema is checked first (a valid JSON Schema by its own meta-schema, at most
MAX_SCHEMA_BYTES), then compiled by llguidance against the served model's vocabulary
(`engine.grammar`); a schema it cannot enforce is 400 naming the problem, never a request that
quietly runs unconstrained. Decoding is then constrained row by row, so the answer is JSON that
validates against the schema whenever it ends by itself (finish_reason "stop"); cut short by
max_tokens it ends with finish_reason "length", as OpenAI's does.
"""

from __future__ import annotations

import json
from typing import Any

from camelid.errors import CamelidError
from camelid.serve import protocol as P

ANY_OBJECT = {"type": "object"}
"""json_object: any JSON object (OpenAI's json mode)."""


def check_schema(schema: Any, param: str) -> None:
    """400 unless `schema` is a JSON Schema object of at most MAX_SCHEMA_BYTES."""
    import jsonschema

    if not isinstance(schema, dict):
        raise P.APIError(400, f"{param} must be a JSON Schema object", param=param)
    if len(json.dumps(schema, separators=(",", ":"))) > P.MAX_SCHEMA_BYTES:
        raise P.APIError(400, f"{param} is larger than {P.MAX_SCHEMA_BYTES} bytes", param=param)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise P.APIError(400, f"{param} is not a valid JSON Schema: {e.message[:300]}", param=param) from None
    except (RecursionError, ValueError) as e:  # a $ref cycle, an unknown $schema draft
        raise P.APIError(400, f"{param} cannot be checked as a JSON Schema: {str(e)[:300]}", param=param) from None


def schema_grammar(engine: Any, schema: dict, param: str) -> str:
    """The llguidance grammar for `schema`, checked against the engine's vocabulary (400 if
    llguidance cannot enforce it)."""
    from camelid.engine import grammar

    check_schema(schema, param)
    try:
        g = grammar.json_schema_grammar(schema)
        grammar.check_grammar(engine, g)
    except CamelidError as e:
        raise P.APIError(400, f"{param}: {e}", param=param) from None
    return g


def response_schema(req: P.ChatRequest) -> dict | None:
    """The schema the answer must follow, or None for free text (type text or no format)."""
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        if fmt is not None and fmt.json_schema is not None:
            raise P.APIError(400, "response_format.json_schema goes with type json_schema", param="response_format")
        return None
    if fmt.type == "json_object":
        return ANY_OBJECT
    if fmt.json_schema is None:
        raise P.APIError(400, "response_format type json_schema needs json_schema: {name, schema}", param="response_format")
    return fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None else ANY_OBJECT


def check_constrained(req: P.ChatRequest) -> None:
    """Options a grammar-constrained answer cannot honour, refused before any work (400)."""
    if req.stop:
        raise P.APIError(400, "stop cannot be combined with a JSON response_format or a forced tool call: a stop string "
                              "would cut the JSON short", param="stop")
    if req.ignore_eos:
        raise P.APIError(400, "ignore_eos cannot be combined with a JSON response_format or a forced tool call: the "
                              "answer ends where the JSON does", param="ignore_eos")
