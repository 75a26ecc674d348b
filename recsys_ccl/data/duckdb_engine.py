"""The same cleaning and splitting as `cleaning`, in DuckDB SQL.

DuckDB spills to disk under a memory limit, which is what large inputs need; the Polars path is
the default. Both give identical output for every split but `random` (each engine draws its own
seeded permutation; the properties, not the rows, are the same).
"""

from __future__ import annotations

from collections.abc import Callable

import duckdb
import polars as pl

from recsys_ccl.data.plan import PrepareConfig, SplitMethod
from recsys_ccl.data.readers import RawInteractions
from recsys_ccl.data.schema import SPLIT_DTYPE

__all__ = ["clean_and_split_duckdb", "clean_and_split_sql", "count_rows"]


def clean_and_split_duckdb(
    raw: RawInteractions, config: PrepareConfig, split: SplitMethod,
) -> tuple[pl.DataFrame, list[tuple[str, int]]]:
    """Run the cleaning steps and the split of `config` (`split` resolved) over the frame
    taken from `raw`; return the rows with a `split` column and the (reason, rows dropped) of
    each step, in order."""
    con = duckdb.connect()
    try:
        con.sql("SET preserve_insertion_order = false")
        # Taken here, not passed in: an argument stays referenced by the caller's frame for
        # the whole call, and then the input could not be let go after the first step.
        con.register("raw", raw.take_frame().to_arrow())
        table, steps = clean_and_split_sql(con, "raw", config, split,
                                           release_source=lambda: con.unregister("raw"))
        result = con.sql(f"SELECT user_id, item_id, ts, split FROM {table}").pl()
        return result.with_columns(pl.col("split").cast(SPLIT_DTYPE)), steps
    finally:
        con.close()


def clean_and_split_sql(
    con: duckdb.DuckDBPyConnection,
    source: str,
    config: PrepareConfig,
    split: SplitMethod,
    *,
    release_source: Callable[[], None],
) -> tuple[str, list[tuple[str, int]]]:
    """The cleaning steps and the split of `config` (`split` resolved) over the table or view
    `source` (columns of the normalised frame, see readers). Returns the name of a table of
    the kept rows (user_id, item_id, ts, split as text) and the (reason, rows dropped) of each
    step, in order. `release_source` is called once `source` is no longer needed."""
    min_rating, k_core, holdout = config.min_rating, config.k_core, config.holdout
    steps: list[tuple[str, int]] = []
    current = source

    def release(name: str) -> None:
        if name == source:
            release_source()
        else:
            con.sql(f"DROP TABLE {name}")

    def replace(name: str, sql: str) -> int:
        """CREATE name AS sql over the current table, drop that one; return rows removed."""
        nonlocal current
        before = count_rows(con, current)
        con.sql(f"CREATE TEMP TABLE {name} AS {sql.format(src=current)}")
        release(current)
        current = name
        return before - count_rows(con, name)

    def step(reason: str, sql: str) -> None:
        steps.append((reason, replace(f"t{len(steps)}", sql)))

    step("null_id", "SELECT * FROM {src} WHERE user_id IS NOT NULL AND item_id IS NOT NULL")
    if split == "temporal":
        step("null_timestamp", "SELECT * FROM {src} WHERE ts IS NOT NULL")
    step(
        "duplicate",
        """SELECT * EXCLUDE (rn) FROM (
             SELECT *, row_number() OVER (
               PARTITION BY user_id, item_id ORDER BY ts DESC NULLS LAST, row_nr DESC) AS rn
             FROM {src}) WHERE rn = 1""",
    )
    if min_rating is not None:
        step("below_min_rating", f"SELECT * FROM {{src}} WHERE rating >= {float(min_rating)!r}")
    if k_core > 1:
        removed, rounds = 0, 0
        while True:
            rounds += 1
            n = replace(
                f"k{rounds}",
                f"""SELECT * EXCLUDE (nu, ni) FROM (
                      SELECT *, count(*) OVER (PARTITION BY user_id) AS nu,
                                count(*) OVER (PARTITION BY item_id) AS ni FROM {{src}})
                    WHERE nu >= {k_core} AND ni >= {k_core}""",
            )
            removed += n
            if n == 0:
                break
        steps.append(("k_core", removed))

    if split == "temporal":
        assign = f"""
          CASE WHEN from_end < least({holdout}, n - 1) THEN 'test'
               WHEN from_end < least({holdout}, n - 1)
                             + least({holdout}, n - 1 - least({holdout}, n - 1)) THEN 'valid'
               ELSE 'train' END"""
        order = "ts DESC, row_nr DESC"
    elif split == "random":
        n_test = f"least(CAST(round(n * {float(config.test_ratio)!r}) AS BIGINT), n - 1)"
        n_valid = (f"least(CAST(round(n * {float(config.valid_ratio)!r}) AS BIGINT), "
                   f"n - 1 - {n_test})")
        assign = f"""
          CASE WHEN from_end < {n_test} THEN 'test'
               WHEN from_end < {n_test} + {n_valid} THEN 'valid'
               ELSE 'train' END"""
        order = f"hash(user_id, item_id, {int(config.seed)})"
    else:
        assign = "CAST(given_split AS VARCHAR)"
        order = "row_nr"
    con.sql(
        f"""CREATE TEMP TABLE split_rows AS
            SELECT user_id, item_id, ts, {assign} AS split
            FROM (SELECT *, row_number() OVER (PARTITION BY user_id ORDER BY {order}) - 1
                              AS from_end,
                            count(*) OVER (PARTITION BY user_id) AS n FROM {current})"""
    )
    release(current)
    return "split_rows", steps


def count_rows(con: duckdb.DuckDBPyConnection, table: str, where: str = "") -> int:
    """Rows of `table` (that match the SQL condition `where`, when given)."""
    condition = f" WHERE {where}" if where else ""
    return int(con.sql(f"SELECT count(*) FROM {table}{condition}").fetchall()[0][0])
