"""Preference data: Stack Exchange dumps and other paired data -> split parquet datasets.

Light on import (no pandas/datasets/duckdb at the top) so that `camelid --help` stays instant.
"""

from __future__ import annotations

from pathlib import Path

from camelid.data.output import ANSWER_COLUMNS, PAIR_COLUMNS, SPLITS, split_path

SAMPLE_DIR = Path(__file__).parent / "sample"
"""The bundled sample dump (Posts.xml + Votes.xml), made by tools/make_sample (`make sample`)."""


def sample_dump_path() -> Path:
    """The folder of the bundled sample dump: the default input of `camelid data stackexchange`."""
    return SAMPLE_DIR


__all__ = ["ANSWER_COLUMNS", "PAIR_COLUMNS", "SAMPLE_DIR", "SPLITS", "sample_dump_path", "split_path"]
