"""DuckDB over a build's work folder, with every path handed over as a value, never spliced into SQL.

The work folder sits inside the output folder, so its path is whatever the user typed for
`--out`: a `'` in it would end a SQL string literal early. Paths therefore go in through the
connection's config and the relation API (`read_parquet`, `write_parquet`); the SQL text holds
only view names, column names and numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ROW_GROUP_ROWS = 2048  # sorted outputs are read back one row group at a time


def connect(work: Path, memory_limit: str | None = None) -> Any:
    """A DuckDB database in `work` that spills to `work/spill` and keeps insertion order."""
    import duckdb

    config: dict[str, Any] = {"temp_directory": str(work / "spill"), "preserve_insertion_order": True}
    if memory_limit:
        config["memory_limit"] = memory_limit
    return duckdb.connect(str(work / "group.duckdb"), config=config)


def view_parquet(con: Any, name: str, path: Path) -> None:
    """Make the parquet file `path` readable in SQL as the (temporary) view `name`."""
    con.read_parquet(str(path)).create_view(name)


def write_parquet(con: Any, query: str, path: Path) -> None:
    """Write the rows of `query` (in its ORDER BY order) to the parquet file `path`."""
    con.sql(query).write_parquet(str(path), row_group_size=ROW_GROUP_ROWS)
