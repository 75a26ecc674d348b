"""MovieLens' own item and user tables as feature tables (`prepare --format movielens
--item-features auto --user-features auto`), beside the ratings file:

    100K   u.item   movie id | title | release date | video release date | URL | 19 genre flags
           u.user   user id | age | gender | occupation | zip code
    1M/10M movies.dat  MovieID::Title::Genres (genres "|"-separated)
           users.dat   UserID::Gender::Age::Occupation::Zip-code (1M only)

Items become item_id, genres (a list of texts: multi_hot) and year (numeric: of the release
date, or of the "(1995)" ending the title); users become user_id, age (numeric), gender and
occupation (categorical) and zip3 (categorical: the first three characters of the zip code).
The files are Latin-1 (titles with accents), read as such.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from recsys_ccl.errors import DataError

__all__ = ["movielens_item_features", "movielens_user_features"]

GENRES_100K = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
               "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
               "Romance", "Sci-Fi", "Thriller", "War", "Western")


def _directory(input_path: str | Path) -> Path:
    path = Path(input_path)
    return path if path.is_dir() else path.parent


def _lines(path: Path, separator: str) -> list[list[str]]:
    """Rows of a MovieLens table (Latin-1, no header, no quoting), blank lines skipped."""
    text = path.read_bytes().decode("latin-1")
    return [line.split(separator) for line in text.splitlines() if line.strip()]


def _rows_of_width(rows: list[list[str]], width: int, path: Path) -> list[list[str]]:
    bad = next((i for i, r in enumerate(rows) if len(r) < width), None)
    if bad is not None:
        raise DataError(f"{path}: line {bad + 1} has {len(rows[bad])} fields, expected "
                        f"{width}; not a MovieLens table")
    return rows


def movielens_item_features(input_path: str | Path) -> pl.DataFrame:
    """u.item (100K) or movies.dat (1M/10M) beside the ratings as item_id, genres, year."""
    root = _directory(input_path)
    if (root / "u.item").exists():
        path = root / "u.item"
        rows = _rows_of_width(_lines(path, "|"), 5 + len(GENRES_100K), path)
        genres = ["|".join(g for g, flag in zip(GENRES_100K, r[5:5 + len(GENRES_100K)],
                                                strict=True) if flag.strip() == "1")
                  for r in rows]
        df = pl.DataFrame({"item_id": [r[0] for r in rows], "genres": genres,
                           "release": [r[2] for r in rows]}, schema={"item_id": pl.String,
                                                                    "genres": pl.String,
                                                                    "release": pl.String})
        year = pl.col("release").str.extract(r"(\d{4})\s*$").cast(pl.Float64, strict=False)
    elif (root / "movies.dat").exists():
        path = root / "movies.dat"
        rows = _rows_of_width(_lines(path, "::"), 3, path)
        df = pl.DataFrame({"item_id": [r[0] for r in rows], "title": [r[1] for r in rows],
                           "genres": [r[2] for r in rows]},
                          schema={"item_id": pl.String, "title": pl.String, "genres": pl.String})
        year = pl.col("title").str.extract(r"\((\d{4})\)\s*$").cast(pl.Float64, strict=False)
    else:
        raise DataError(f"--item-features auto: no u.item or movies.dat in {root}")
    # a list column: multi_hot whatever the share of multi-genre films
    genres = (pl.when(pl.col("genres") == "").then(None)
              .otherwise(pl.col("genres").str.split("|")))
    return df.select("item_id", genres.alias("genres"), year.alias("year"))


def movielens_user_features(input_path: str | Path) -> pl.DataFrame:
    """u.user (100K) or users.dat (1M) as user_id, age, gender, occupation, zip3."""
    root = _directory(input_path)
    if (root / "u.user").exists():
        path = root / "u.user"
        rows = _rows_of_width(_lines(path, "|"), 5, path)
        cols = {"user_id": 0, "age": 1, "gender": 2, "occupation": 3, "zip": 4}
    elif (root / "users.dat").exists():
        path = root / "users.dat"
        rows = _rows_of_width(_lines(path, "::"), 5, path)
        cols = {"user_id": 0, "gender": 1, "age": 2, "occupation": 3, "zip": 4}
    else:
        raise DataError(f"--user-features auto: no u.user or users.dat in {root}")
    df = pl.DataFrame({name: [r[i].strip() for r in rows] for name, i in cols.items()},
                      schema={name: pl.String for name in cols})
    return df.select(
        "user_id",
        pl.col("age").cast(pl.Float64, strict=False),
        "gender",
        "occupation",
        pl.col("zip").str.slice(0, 3).alias("zip3"),
    )
