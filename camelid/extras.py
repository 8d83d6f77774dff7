"""Which optional extra (`pip install 'camelid[EXTRA]'`) brings which imported module.

The base install is what `camelid chat`, `generate`, `models`, `merge`, `export` and `estimate`
need. The other commands need an extra (pyproject.toml lists each one's packages):

    train      data, sft, reward, ppo, eval, report, pipeline
    serve      serve
    llamacpp   --backend llama.cpp, export --quant q4_k_m (compiles llama.cpp)
    8bit       --load-8bit when training (bitsandbytes)
    tracking   --report-to tensorboard / wandb / trackio
    test       everything the test suite needs

A command whose extra is missing fails with one line naming it (camelid.cli.main turns the
ModuleNotFoundError of a module listed here into MissingExtra).
"""

from __future__ import annotations

from camelid.errors import MissingExtra

EXTRA_OF_MODULE: dict[str, str] = {
    "trl": "train", "datasets": "train", "accelerate": "train", "pyarrow": "train", "duckdb": "train",
    "py7zr": "train", "markdownify": "train", "matplotlib": "train",
    "fastapi": "serve", "uvicorn": "serve", "starlette": "serve", "pydantic": "serve", "llguidance": "serve",
    "jsonschema": "serve", "prometheus_client": "serve", "regex": "serve",
    "llama_cpp": "llamacpp",
    "bitsandbytes": "8bit",
    "tensorboard": "tracking", "wandb": "tracking", "trackio": "tracking",
}
"""Top-level module -> the extra that installs it (modules of the base install are not listed)."""


def missing_extra(error: ModuleNotFoundError, what: str) -> MissingExtra | None:
    """The MissingExtra for `error` when the missing module belongs to an extra, else None
    (a missing base module is a broken install: the caller lets its traceback through)."""
    top = (error.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(top)
    return MissingExtra(extra, what, top) if extra else None
