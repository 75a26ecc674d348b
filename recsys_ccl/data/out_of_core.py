"""Out-of-core `prepare` (`--memory-limit`): inputs larger than memory, the same DATA directory.

    input --(Polars streaming)--> normalised.parquet --(DuckDB, memory_limit, spilling to a
    temporary directory)--> clean, split, drop cold rows, vocabularies --(COPY)--> Parquet

Nothing is collected into Python: Polars streams the parse and normalisation to disk, DuckDB
runs the cleaning SQL of `duckdb_engine` with its memory limit and writes the outputs with
COPY. The DATA directory equals the in-memory one row for row (the temporal and given splits
equal the Polars path's; the random split equals the DuckDB path's, which draws its own
permutation).
"""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import duckdb
import polars as pl

from recsys_ccl.data.duckdb_engine import clean_and_split_sql, count_rows
from recsys_ccl.data.item_stats import log_q
from recsys_ccl.data.plan import (
    PrepareConfig,
    check_not_emptied,
    data_manifest,
    resolve_split,
)
from recsys_ccl.data.readers import ColumnMap, sink_normalised
from recsys_ccl.data.schema import SPLITS
from recsys_ccl.errors import DataError
from recsys_ccl.fileio import (
    BackgroundSha256,
    atomic_directory,
    sha256_file,
    write_json_atomic,
)

__all__ = ["MIN_MEMORY_LIMIT", "parse_memory_limit", "prepare_out_of_core"]

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}

# below it DuckDB's pool would get under ~110 MB, where its sorts of 10^7 rows can run out
MIN_MEMORY_LIMIT = 320 * 10**6

# Of the limit, DuckDB's buffer pool gets what the process does not already hold (the
# interpreter, Polars, DuckDB's code), less DuckDB's own use outside its pool (about constant
# whatever the pool's size; grows with its threads) and a 10% margin.
_MARGIN = 0.10
_DUCKDB_OUTSIDE_POOL = 72 * 10**6
_DUCKDB_MIN = 64 * 10**6


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: assume the typical figure
        return 300 * 10**6


def parse_memory_limit(text: str) -> int:
    """'512MB', '1.5GiB', '800000000' -> bytes; a clear error otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text or "")
    if not m or m.group(2).upper() not in _UNITS:
        raise DataError(f"--memory-limit must look like 512MB or 2GiB, got {text!r}")
    value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value < MIN_MEMORY_LIMIT:
        raise DataError(f"--memory-limit must be at least 320MB (the interpreter, Polars and "
                        f"DuckDB take ~170 MB besides DuckDB's buffers), got {text!r}")
    return value


def prepare_out_of_core(config: PrepareConfig, out: str | Path, *,
                        overwrite: bool = False) -> dict:
    """Build and write the DATA directory of `config` within `config.memory_limit`; return its
    manifest. Same contract as `prepare.prepare` (atomic, row accounting, one-line errors)."""
    config.validate()
    limit = parse_memory_limit(config.memory_limit or "")
    with atomic_directory(out, overwrite=overwrite) as tmp:
        scratch = tmp / ".scratch"
        scratch.mkdir()
        try:
            # In a child process: the memory Polars' streaming pass touched goes back to the
            # system with it instead of staying in this process while DuckDB runs.
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                raw = pool.submit(sink_normalised, config.input, config.format,
                                  ColumnMap(config.user_col, config.item_col, config.time_col,
                                            config.rating_col),
                                  scratch / "normalised.parquet").result()
            input_sha256 = BackgroundSha256(raw.files)  # while DuckDB works
            split = resolve_split(config, raw)
            if config.min_rating is not None and not raw.has_rating:
                raise DataError("--min-rating needs a rating column; none found (name it with "
                                "--rating-col)")
            con = duckdb.connect()
            try:
                budget = max(_DUCKDB_MIN, int(limit * (1 - _MARGIN)) - _resident_bytes()
                             - _DUCKDB_OUTSIDE_POOL)
                con.sql(f"SET memory_limit = '{budget}B'")
                con.sql(f"SET temp_directory = {_sql_path(scratch / 'spill')}")
                con.sql("SET preserve_insertion_order = false")
                con.sql("SET enable_progress_bar = false")
                con.sql(f"CREATE VIEW raw AS SELECT * FROM "
                        f"read_parquet({_sql_path(scratch / 'normalised.parquet')})")
                table, steps = clean_and_split_sql(
                    con, "raw", config, split, release_source=lambda: con.sql("DROP VIEW raw"))
                check_not_emptied(steps, raw.num_rows, config)
                steps += _drop_cold(con, table)
                counts = _write_outputs(con, tmp)
            except duckdb.OutOfMemoryException as exc:
                raise DataError(
                    f"--memory-limit {config.memory_limit} is too small for this input: DuckDB "
                    f"ran out of its {budget / 1e6:.0f} MB ({str(exc).splitlines()[0]}); "
                    f"raise the limit") from exc
            finally:
                con.close()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        manifest = data_manifest(config, raw, split, counts, dict(steps),
                                 input_sha256.result())
        manifest["files"] = {p.name: sha256_file(p) for p in sorted(tmp.glob("*.parquet"))}
        write_json_atomic(tmp / "manifest.json", manifest)
    return manifest


def _sql_path(path: Path) -> str:
    """A path as an SQL string literal."""
    return "'" + str(path).replace("'", "''") + "'"


def _drop_cold(con: duckdb.DuckDBPyConnection, table: str) -> list[tuple[str, int]]:
    """Valid/test rows whose user, then item, has no train row: dropped and counted (as
    `cleaning.drop_cold`). Leaves the kept rows in table `kept`."""
    con.sql(f"""CREATE TEMP TABLE known_users AS
                SELECT * FROM {table} WHERE split = 'train' OR user_id IN
                  (SELECT DISTINCT user_id FROM {table} WHERE split = 'train')""")
    con.sql("""CREATE TEMP TABLE kept AS
               SELECT * FROM known_users WHERE split = 'train' OR item_id IN
                 (SELECT DISTINCT item_id FROM known_users WHERE split = 'train')""")
    n, n_users, n_kept = (count_rows(con, t) for t in (table, "known_users", "kept"))
    con.sql(f"DROP TABLE {table}")
    con.sql("DROP TABLE known_users")
    return [("cold_user", n - n_users), ("cold_item", n_users - n_kept)]


def _write_outputs(con: duckdb.DuckDBPyConnection, tmp: Path) -> dict[str, int]:
    """Vocabularies (ids in sorted order -> contiguous int32) and the encoded splits, written
    with COPY in the layout and row order of the in-memory path."""
    con.sql("""CREATE TEMP TABLE users AS
               SELECT CAST(row_number() OVER (ORDER BY user_id) - 1 AS INTEGER) AS user_idx,
                      user_id
               FROM (SELECT DISTINCT user_id FROM kept WHERE split = 'train')""")
    con.sql("""CREATE TEMP TABLE items AS
               SELECT CAST(row_number() OVER (ORDER BY item_id) - 1 AS INTEGER) AS item_idx,
                      item_id AS native_id, train_count
               FROM (SELECT item_id, count(*) AS train_count FROM kept
                     WHERE split = 'train' GROUP BY item_id)""")
    con.sql("SET preserve_insertion_order = true")  # COPY keeps the ORDER BY
    con.sql(f"""COPY (SELECT user_idx, CAST(user_id AS VARCHAR) AS user_id FROM users
                      ORDER BY user_idx) TO {_sql_path(tmp / 'users.parquet')} (FORMAT parquet)""")
    # log_q by the function every engine shares (DuckDB's ln differs in the last bit); the item
    # table is one row per item, small next to the interactions
    counts_file = tmp / ".scratch" / "item_counts.parquet"
    con.sql(f"""COPY (SELECT item_idx, CAST(native_id AS VARCHAR) AS item_id, train_count
                      FROM items ORDER BY item_idx) TO {_sql_path(counts_file)} (FORMAT parquet)""")
    total = count_rows(con, "kept", "split = 'train'")
    items = pl.read_parquet(counts_file)
    items.with_columns(pl.Series("log_q", log_q(items["train_count"].to_numpy(), total))
                       ).write_parquet(tmp / "items.parquet")
    counts = {"users": count_rows(con, "users"), "items": count_rows(con, "items")}
    for name in SPLITS:
        con.sql(f"""COPY (SELECT u.user_idx, i.item_idx, CAST(k.ts AS BIGINT) AS ts
                          FROM kept k JOIN users u ON k.user_id = u.user_id
                                      JOIN items i ON k.item_id = i.native_id
                          WHERE k.split = '{name}'
                          ORDER BY u.user_idx, ts NULLS FIRST, i.item_idx)
                    TO {_sql_path(tmp / f'{name}.parquet')} (FORMAT parquet)""")
        counts[f"{name}_rows"] = count_rows(con, "kept", f"split = '{name}'")
    return counts
