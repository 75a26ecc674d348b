"""The same cleaning and splitting as `cleaning`, in DuckDB SQL.

DuckDB spills to disk under a memory limit, which is what large inputs need; the Polars path is
the default. Both give identical output for every split but `random` (each engine draws its own
seeded permutation; the properties, not the rows, are the same).
"""

from __future__ import annotations

import duckdb
import polars as pl

from recsys_ccl.data.cleaning import SplitMethod

__all__ = ["clean_and_split_duckdb"]


def clean_and_split_duckdb(
    frame: pl.DataFrame,
    *,
    split: SplitMethod,
    min_rating: float | None,
    k_core: int,
    holdout: int,
    test_ratio: float,
    valid_ratio: float,
    seed: int,
    memory_limit: str | None = None,
) -> tuple[pl.DataFrame, list[tuple[str, int]]]:
    """Run the cleaning steps and the split; return the rows with a `split` column and the
    (reason, rows dropped) of each step, in order."""
    con = duckdb.connect()
    try:
        if memory_limit:
            con.sql(f"SET memory_limit = '{memory_limit}'")
        con.sql("SET preserve_insertion_order = false")
        con.register("raw", frame.to_arrow())
        steps: list[tuple[str, int]] = []
        current = "raw"

        def step(reason: str, sql: str) -> None:
            nonlocal current
            name = f"t{len(steps)}"
            before = _count(con, current)
            con.sql(f"CREATE TEMP TABLE {name} AS {sql.format(src=current)}")
            steps.append((reason, before - _count(con, name)))
            current = name

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
            removed_total = 0
            before = _count(con, current)
            while True:
                n = _count(con, current)
                name = f"k{removed_total}_{n}"
                con.sql(
                    f"""CREATE TEMP TABLE {name} AS SELECT * FROM (
                          SELECT *, count(*) OVER (PARTITION BY user_id) AS nu,
                                    count(*) OVER (PARTITION BY item_id) AS ni FROM {current})
                        WHERE nu >= {k_core} AND ni >= {k_core}"""
                )
                con.sql(f"ALTER TABLE {name} DROP COLUMN nu")
                con.sql(f"ALTER TABLE {name} DROP COLUMN ni")
                removed = n - _count(con, name)
                current = name
                removed_total += removed
                if removed == 0:
                    break
            steps.append(("k_core", before - _count(con, current)))

        if split == "temporal":
            assign = f"""
              CASE WHEN from_end < least({holdout}, n - 1) THEN 'test'
                   WHEN from_end < least({holdout}, n - 1)
                                 + least({holdout}, n - 1 - least({holdout}, n - 1)) THEN 'valid'
                   ELSE 'train' END"""
            order = "ts DESC, row_nr DESC"
        elif split == "random":
            n_test = f"least(CAST(round(n * {float(test_ratio)!r}) AS BIGINT), n - 1)"
            n_valid = f"least(CAST(round(n * {float(valid_ratio)!r}) AS BIGINT), n - 1 - {n_test})"
            assign = f"""
              CASE WHEN from_end < {n_test} THEN 'test'
                   WHEN from_end < {n_test} + {n_valid} THEN 'valid'
                   ELSE 'train' END"""
            order = f"hash(user_id, item_id, {int(seed)})"
        else:
            assign = "given_split"
            order = "row_nr"
        result = con.sql(
            f"""SELECT row_nr, user_id, item_id, ts, rating, given_split, {assign} AS split
                FROM (SELECT *, row_number() OVER (PARTITION BY user_id ORDER BY {order}) - 1
                                  AS from_end,
                                count(*) OVER (PARTITION BY user_id) AS n FROM {current})
                ORDER BY row_nr"""
        ).pl()
        return result, steps
    finally:
        con.close()


def _count(con: duckdb.DuckDBPyConnection, table: str) -> int:
    return int(con.sql(f"SELECT count(*) FROM {table}").fetchall()[0][0])
