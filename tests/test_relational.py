"""Relational Deep Learning: SQLite -> temporal HeteroData, the forecast task's splits, no future leaks, resume."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("torch_geometric")

from lightning_ext.graph.rdl import RDLModule  # noqa: E402
from lightning_ext.graph.relational import RelationalDataModule  # noqa: E402
from lightning_ext.graph.relational_db import (  # noqa: E402
    ML100K_TABLES,
    ForecastTask,
    SQLiteSource,
    build_hetero_data,
    to_unix_seconds,
    write_movielens100k_sqlite,
)
from lightning_ext.testing import assert_same_parameters, crash_and_resume  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
DAY = 86400
TOY_TABLES = {"customers": {"pkey": "cid"}, "shops": {"pkey": "sid"},
              "visits": {"pkey": "vid", "time_col": "at", "fkeys": {"cid": "customers", "sid": "shops"}}}
TOY_SQL = """
SELECT t.timestamp AS timestamp, v.sid AS sid, MAX(v.secs > t.timestamp) AS label
FROM timestamps t JOIN (SELECT sid, CAST(strftime('%s', at) AS INTEGER) AS secs FROM visits) v
  ON v.secs <= t.timestamp + :timedelta
GROUP BY t.timestamp, v.sid HAVING MIN(v.secs) <= t.timestamp
"""  # the visits' times are ISO text: SQLite's strftime('%s', ...) turns them into Unix seconds


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory) -> Path:
    return write_movielens100k_sqlite(tmp_path_factory.mktemp("ml") / "ml100k.sqlite")


def _toy_db(path: Path, n_visits: int = 600, seed: int = 0) -> Path:
    """30 customers, 12 shops, visits over 120 days from 2020-01-01 (times as ISO text, ids from 100)."""
    rng = np.random.default_rng(seed)
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE customers (cid INTEGER PRIMARY KEY, age REAL, tier TEXT)")
    con.execute("CREATE TABLE shops (sid INTEGER PRIMARY KEY, kind TEXT)")
    con.execute("CREATE TABLE visits (vid INTEGER PRIMARY KEY, cid INTEGER, sid INTEGER, at TEXT, spend REAL)")
    con.executemany("INSERT INTO customers VALUES (?, ?, ?)",
                    [(100 + i, float(rng.integers(18, 70)), str(rng.choice(["a", "b"]))) for i in range(30)])
    con.executemany("INSERT INTO shops VALUES (?, ?)", [(100 + i, f"k{i % 3}") for i in range(12)])
    start = to_unix_seconds("2020-01-01")
    times = np.sort(rng.integers(start, start + 120 * DAY, n_visits))
    shops = rng.choice(12, n_visits, p=np.arange(1, 13) / 78)  # busy and quiet shops
    rows = [(i, 100 + int(rng.integers(30)), 100 + int(s), str(np.datetime64(int(t), "s")), float(rng.random()))
            for i, (t, s) in enumerate(zip(times, shops))]
    con.executemany("INSERT INTO visits VALUES (?, ?, ?, ?, ?)", rows)
    con.commit()
    con.close()
    return path


def _toy_dm(tmp: Path, **kwargs) -> RelationalDataModule:
    path = tmp / "toy.sqlite"
    if not path.exists():
        _toy_db(path)
    task = ForecastTask("shops", "sid", TOY_SQL, timedelta_days=7, val_timestamp="2020-03-25",
                        test_timestamp="2020-04-08", num_eval_timestamps=1)
    return RelationalDataModule(SQLiteSource(str(path), TOY_TABLES), task, **{"num_neighbors": [4, 2],
                                                                              "batch_size": 16, **kwargs})


def test_movielens_sqlite_becomes_a_temporal_hetero_graph_with_times_in_seconds(ml100k):
    data, ids = build_hetero_data(SQLiteSource(str(ml100k), ML100K_TABLES))
    assert {t: data[t].num_nodes for t in data.node_types} == {"users": 943, "movies": 1682, "ratings": 100000}
    assert set(data.edge_types) == {("ratings", "f2p_user_id", "users"), ("users", "rev_f2p_user_id", "ratings"),
                                    ("ratings", "f2p_item_id", "movies"), ("movies", "rev_f2p_item_id", "ratings")}
    t = data["ratings"].time
    # seconds, not RelBench-under-pandas-3's milliseconds-as-seconds: 1997-09-20 .. 1998-04-23
    assert to_unix_seconds("1997-09-19") < int(t.min()) and int(t.max()) < to_unix_seconds("1998-04-23")
    assert "time" not in data["users"] and "time" not in data["movies"]
    # ratings point at the right parents (original ids mapped to rows)
    con = sqlite3.connect(ml100k)
    first = con.execute("SELECT user_id, item_id FROM ratings WHERE rating_id = 0").fetchone()
    ei = data["ratings", "f2p_item_id", "movies"].edge_index
    assert ids["movies"][int(ei[1, ei[0] == 0][0])] == first[1]
    names = data["movies"].feature_names
    assert "genres=Comedy" in names and "release_year" in names and not any(n.startswith("title") for n in names)


def test_movie_active_task_has_the_specs_seed_times_and_rows(ml100k):
    dm = RelationalDataModule(SQLiteSource(str(ml100k), ML100K_TABLES), num_neighbors=[2])
    dm.setup("fit")
    assert dm.stats["rows"] == {"train": 14789, "val": 3222, "test": 3286}  # graph-and-recsys.md section 3
    times = dm.stats["seed_times"]
    assert len(times["train"]) == 11 and max(times["train"]) == to_unix_seconds("1998-02-11")
    assert times["val"] == [to_unix_seconds("1998-02-25"), to_unix_seconds("1998-03-11")]
    assert times["test"] == [to_unix_seconds("1998-03-25"), to_unix_seconds("1998-04-08")]


def _leaks(loader) -> tuple[int, int]:
    leaks = rows = 0
    for b in loader:
        entity = [t for t in b.node_types if "seed_time" in b[t]][0]
        seed_time = b[entity].seed_time
        for t in b.node_types:
            if "time" in b[t]:
                leaks += int((b[t].time > seed_time[b[t].batch]).sum())
                rows += b[t].num_nodes
    return leaks, rows


def test_no_sampled_row_is_later_than_its_seed_time(ml100k):
    dm = RelationalDataModule(SQLiteSource(str(ml100k), ML100K_TABLES), num_neighbors=[8, 4, 2], batch_size=1024)
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        leaks, rows = _leaks(loader)
        assert rows > 10_000 and leaks == 0


def test_the_seed_sees_its_own_past_rows_only(tmp_path):
    dm = _toy_dm(tmp_path, num_neighbors=[-1])
    dm.setup("fit")
    b = next(iter(dm.val_dataloader()))
    visits_time = dm.data["visits"].time
    ei = dm.data["visits", "f2p_sid", "shops"].edge_index
    for i in range(int(b["shops"].batch_size)):
        shop, t = int(b["shops"].n_id[i]), int(b["shops"].seed_time[i])
        expect = set(ei[0, (ei[1] == shop) & (visits_time[ei[0]] <= t)].tolist())
        got = set(b["visits"].n_id[b["visits"].batch == i].tolist())
        assert got == expect and expect  # every past visit (fan-out -1), nothing later


def test_deleting_far_future_rows_leaves_val_and_test_predictions_unchanged(ml100k, tmp_path):
    cut = tmp_path / "cut.sqlite"
    cut.write_bytes(ml100k.read_bytes())
    con = sqlite3.connect(cut)
    deleted = con.execute("DELETE FROM ratings WHERE timestamp > ?", (to_unix_seconds("1998-04-22"),)).rowcount
    con.commit()
    con.close()
    assert deleted > 0
    preds, rows = [], []
    for path in (ml100k, cut):
        # "last": a seed's neighbourhood does not depend on which other seeds share its batch
        dm = RelationalDataModule(SQLiteSource(str(path), ML100K_TABLES), num_neighbors=[8, 4],
                                  temporal_strategy="last", batch_size=1024)
        dm.setup("fit")
        torch.manual_seed(0)
        model = RDLModule(channels=16, num_layers=2)
        model.bind(dm.metadata(), dm.feature_dims, dm.entity_table, dm.timed_types)
        model.eval()
        with torch.no_grad():
            preds.append({s: torch.cat([model(b) for b in loader])
                          for s, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader()))})
        rows.append({s: torch.stack([dm.splits[s]["node"], dm.splits[s]["time"]]) for s in ("val", "test")})
    assert torch.equal(rows[0]["val"], rows[1]["val"]) and torch.equal(preds[0]["val"], preds[1]["val"])
    # the cut database ends earlier, so its test split keeps only the first window (RelBench's rule): a prefix
    n = rows[1]["test"].shape[1]
    assert 0 < n < rows[0]["test"].shape[1] and torch.equal(rows[0]["test"][:, :n], rows[1]["test"])
    assert torch.equal(preds[0]["test"][:n], preds[1]["test"])


def test_ddp_is_refused_in_setup(tmp_path):
    class _Trainer:
        world_size = 2

    dm = _toy_dm(tmp_path)
    dm.trainer = _Trainer()
    with pytest.raises(RuntimeError, match="devices=1"):
        dm.setup("fit")


def test_rdl_learns_the_toy_task_and_logs_auroc(tmp_path):
    import lightning.pytorch as pl

    torch.manual_seed(0)
    dm = _toy_dm(tmp_path)
    model = RDLModule(channels=16, num_layers=2, lr=0.01)
    trainer = pl.Trainer(max_epochs=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    auroc = float(trainer.test(model, datamodule=dm, verbose=False)[0]["test_auroc"])
    assert auroc > 0.7  # busy shops are visited again next week; a shop's past visits tell which ones are busy


def test_mid_epoch_crash_and_resume_matches_an_uninterrupted_fit(tmp_path):
    def model():
        torch.manual_seed(0)
        return RDLModule(channels=8, num_layers=2, lr=0.01)

    full, resumed, info = crash_and_resume(model, lambda: _toy_dm(tmp_path, batch_size=8), lambda: [],
                                           max_epochs=2, crash_step=7, tmp_path=tmp_path / "runs",
                                           checkpoint_every_n_steps=3, weights_only=True, limit_val_batches=0,
                                           num_sanity_val_steps=0)
    assert info["resumed_from_step"] == 6
    assert_same_parameters(full, resumed)


@pytest.mark.parametrize("make, words", [
    (lambda p: ForecastTask(timedelta_days=float("nan")), "timedelta_days"),
    (lambda p: ForecastTask(val_timestamp="1998-03-25", test_timestamp="1998-02-25"), "test_timestamp"),
    (lambda p: SQLiteSource(str(p), {"a": {"pkey": "x", "fkeys": {"y": "nowhere"}}}), "nowhere"),
    (lambda p: SQLiteSource(str(p), {"a": {"primary": "x"}}), "unknown keys"),
    (lambda p: SQLiteSource(str(p), {"no_table": {}}).read(), "no_table"),
    (lambda p: SQLiteSource(str(p), {"ratings": {"time_col": "when"}}).read(), "when"),
    (lambda p: SQLiteSource(str(p) + ".missing", ML100K_TABLES).read(), "is not a file"),
    (lambda p: ForecastTask(label_sql="SELECT nonsense FROM").labels(SQLiteSource(str(p), ML100K_TABLES),
                                                                     {"train": [0]}), "label_sql"),
    (lambda p: RelationalDataModule(SQLiteSource(str(p), ML100K_TABLES), ForecastTask(entity_table="shops")),
     "entity_table"),
    (lambda p: RelationalDataModule(num_neighbors=[4, -2]), "num_neighbors"),
    (lambda p: RDLModule(channels=0), "channels"),
])
def test_bad_input_fails_with_one_line_naming_it(ml100k, make, words):
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        make(ml100k)
    text = str(err.value)
    assert words in text and "\n" not in text
