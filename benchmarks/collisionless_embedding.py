"""Monolith's collisionless embedding table vs hashed tables of equal and smaller memory, plus its frequency filter
and expiry, on MovieLens-100K as a time-ordered CTR stream (online training, progressive validation AUC).

Protocol (fixed before the runs, from graph-and-recsys.md §13; the page states it):
- Stream: recbole's ML-100K ratings sorted by timestamp; label rating >= 4; fields user, movie, age, gender,
  occupation, zip code and the movie's genres (a bag, mean-pooled). One table per field (Monolith's per-slot
  configuration); a factorisation machine (first-order weight + dim-16 factors per id) on top.
- Online: one pass in time order, batches of ``BATCH`` events; each batch is first scored (eval mode: nothing
  inserted), then trained on (Adagrad, the usual optimiser of sparse id features). Progressive validation:
  AUC of the scores made before training.
- Tuning: each arm's lr on seed 0 over ``LRS`` by the progressive AUC of the first ``TUNE_SHARE`` of the stream
  (the "validation" part); the reported AUC is over the rest of the stream (the "test" part), 3 seeds.
- Arms: collisionless; hashed with, per field, as many rows as the collisionless table ends with (equal
  memory); hashed with 25% of those rows; collisionless + movie occurrence threshold 5 (counting filter);
  collisionless + 30-day expiry (event time) on users and movies.
- Pass (spec): AUC(collisionless) >= AUC(hashed equal) >= AUC(hashed 25%) with the first minus the last
  >= 0.5 pt; the threshold arm stores >= 15% fewer rows with an AUC loss <= 0.5 pt. A difference is counted only
  when it exceeds the larger seed std.
- Premise check: the collisionless FM must beat the item-popularity score (movie's running positive rate) on the
  test part; otherwise "not testable here".
- 1 thread, ``nice -n 10``.

Run::

    nice -n 10 python benchmarks/collisionless_embedding.py
    python benchmarks/collisionless_embedding.py --render-only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "results"
JSON = OUT / "collisionless_embedding.json"
SEEDS = [0, 1, 2]
LRS = [1e-2, 3e-2, 1e-1]
BATCH, DIM, TUNE_SHARE = 512, 16, 0.3
FIELDS = ["user", "movie", "age", "gender", "occupation", "zip", "genre"]
ARMS = ["collisionless", "hashed (equal rows)", "hashed (25% rows)", "collisionless + movie threshold 5",
        "collisionless + 30-day expiry"]
DAY = 86_400.0
COMMAND = "nice -n 10 python benchmarks/collisionless_embedding.py"


def load_stream():
    """``(fields dict of id arrays, genre (event, genre) pairs, labels, times)`` in time order."""
    from lightning_ext.recsys.movielens100k import find_ml100k_inter

    root = find_ml100k_inter().parent
    inter = np.loadtxt(root / "ml-100k.inter", skiprows=1, delimiter="\t")
    order = np.argsort(inter[:, 3], kind="stable")
    inter = inter[order]
    users, movies = inter[:, 0].astype(np.int64), inter[:, 1].astype(np.int64)
    ufeat, codes = {}, {k: {} for k in ("age", "gender", "occupation", "zip")}
    with open(root / "ml-100k.user") as fh:
        next(fh)
        for line in fh:
            uid, age, gender, occ, zipc = line.rstrip("\n").split("\t")
            ufeat[int(uid)] = [codes[k].setdefault(v, len(codes[k])) for k, v in
                               zip(("age", "gender", "occupation", "zip"), (age, gender, occ, zipc))]
    genre_codes, movie_genres = {}, {}
    with open(root / "ml-100k.item", encoding="latin-1") as fh:
        next(fh)
        for line in fh:
            parts = line.rstrip("\n").split("\t")
            movie_genres[int(parts[0])] = [genre_codes.setdefault(g, len(genre_codes)) for g in parts[-1].split()]
    feats = np.array([ufeat[u] for u in users])
    fields = {"user": users, "movie": movies, "age": feats[:, 0], "gender": feats[:, 1], "occupation": feats[:, 2],
              "zip": feats[:, 3]}
    g_event = np.concatenate([np.full(len(movie_genres[m]), i) for i, m in enumerate(movies)])
    g_id = np.concatenate([movie_genres[m] for m in movies])
    fields["genre"] = (g_event, g_id)
    return fields, (inter[:, 2] >= 4).astype(np.float32), inter[:, 3]


class FM(torch.nn.Module):
    """A factorisation machine over one embedding table per field (each row: first-order weight + factors)."""

    def __init__(self, tables: dict):
        super().__init__()
        self.tables = torch.nn.ModuleDict(tables)
        self.bias = torch.nn.Parameter(torch.zeros(1))

    def forward(self, batch, time=None):
        vecs = []
        for f in FIELDS:
            if f == "genre":
                event, gid = batch["genre"]
                rows = self.tables[f](gid, time=None if time is None else time[event])
                pooled = torch.zeros(len(batch["user"]), rows.shape[1]).index_add(0, event, rows)
                count = torch.bincount(event, minlength=len(batch["user"])).clamp(min=1)
                vecs.append(pooled / count[:, None])
            else:
                vecs.append(self.tables[f](batch[f], time=time))
        v = torch.stack(vecs, 1)  # (B, F, 1 + DIM)
        first, factors = v[..., 0].sum(1), v[..., 1:]
        inter = 0.5 * (factors.sum(1).pow(2) - factors.pow(2).sum(1)).sum(1)
        return self.bias + first + inter


def batches(fields, labels, times):
    n = len(labels)
    g_event, g_id = fields["genre"]
    g_start = np.searchsorted(g_event, np.arange(0, n + BATCH, BATCH))
    for k, s in enumerate(range(0, n, BATCH)):
        e = min(s + BATCH, n)
        b = {f: torch.as_tensor(fields[f][s:e]) for f in FIELDS if f != "genre"}
        a, z = g_start[k], g_start[k + 1] if k + 1 < len(g_start) else len(g_event)
        b["genre"] = (torch.as_tensor(g_event[a:z] - s), torch.as_tensor(g_id[a:z]))
        yield b, torch.as_tensor(labels[s:e]), torch.as_tensor(times[s:e], dtype=torch.float64)


def make_tables(arm, seed, rows_per_field):
    from lightning_ext.recsys.collisionless import CollisionlessEmbedding, HashedEmbedding

    tables = {}
    for i, f in enumerate(FIELDS):
        s = seed * 100 + i
        if arm.startswith("hashed"):
            share = 1.0 if "equal" in arm else 0.25
            tables[f] = HashedEmbedding(1 + DIM, max(1, round(share * rows_per_field[f])), init_std=0.01, seed=s)
        else:
            kw = {}
            if "threshold" in arm and f == "movie":
                kw = {"admission": "counting", "occurrence_threshold": 5}
            if "expiry" in arm and f in ("user", "movie"):
                kw = {"expire_after": 30 * DAY}
            tables[f] = CollisionlessEmbedding(1 + DIM, 4096, init_std=0.01, seed=s, **kw)
    return tables


def auc(scores, labels):
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def run(arm, lr, seed, stream, rows_per_field=None):
    from lightning_ext.recsys.collisionless import CollisionlessEmbedding, reset_optimizer_rows

    fields, labels, times = stream
    torch.manual_seed(seed)
    model = FM(make_tables(arm, seed, rows_per_field))
    opt = torch.optim.Adagrad(model.parameters(), lr=lr)
    scores, evicted, c0 = [], 0, time.process_time()
    for b, y, t in batches(fields, labels, times):
        model.eval()
        with torch.no_grad():
            scores.append(model(b).numpy())
        model.train()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(b, time=t), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for table in model.tables.values():  # EmbeddingExpiry's work, every step
            if isinstance(table, CollisionlessEmbedding):
                old = table.evict()
                if len(old):
                    reset_optimizer_rows(opt, table.weight, old)
                    evicted += len(old)
    scores = np.concatenate(scores)
    cut = int(TUNE_SHARE * len(labels))
    rows = {f: (t.num_rows if isinstance(t, CollisionlessEmbedding) else t.num_buckets)
            for f, t in model.tables.items()}
    out = {"arm": arm, "lr": lr, "seed": seed, "val_auc": auc(scores[:cut], labels[:cut]),
           "test_auc": auc(scores[cut:], labels[cut:]), "rows": rows, "total_rows": sum(rows.values()),
           "bytes": sum(rows.values()) * (1 + DIM) * 4, "evicted": evicted, "cpu_s": time.process_time() - c0,
           "admission_failures": sum(int(getattr(t, "admission_failures", 0)) for t in model.tables.values())}
    print(f"  {arm:34s} lr {lr:g} seed {seed}: val AUC {out['val_auc']:.4f} test AUC {out['test_auc']:.4f} "
          f"rows {out['total_rows']} cpu {out['cpu_s']:.0f}s", flush=True)
    return out


def popularity_auc(stream):
    """Movie's running positive rate (Laplace-smoothed, updated after each batch) as the score."""
    fields, labels, _ = stream
    pos, cnt, scores = {}, {}, []
    movies = fields["movie"]
    for s in range(0, len(labels), BATCH):
        e = min(s + BATCH, len(labels))
        scores += [(pos.get(m, 0) + 0.55) / (cnt.get(m, 0) + 1) for m in movies[s:e]]
        for m, y in zip(movies[s:e], labels[s:e]):
            pos[m], cnt[m] = pos.get(m, 0) + y, cnt.get(m, 0) + 1
    cut = int(TUNE_SHARE * len(labels))
    return auc(np.array(scores[cut:]), labels[cut:])


def train_all():
    torch.set_num_threads(1)
    stream = load_stream()
    t0, c0 = time.time(), time.process_time()
    data = {"events": len(stream[1]), "positive_rate": float(stream[1].mean()),
            "distinct_ids": {f: int(len(np.unique(stream[0][f] if f != "genre" else stream[0][f][1]))) for f in FIELDS},
            "popularity_test_auc": popularity_auc(stream), "runs": [], "selected_lr": {}}
    rows_per_field = None
    for arm in ARMS:
        tuning = [run(arm, lr, SEEDS[0], stream, rows_per_field) for lr in LRS]
        best = max(tuning, key=lambda r: r["val_auc"])
        data["selected_lr"][arm] = best["lr"]
        for r in tuning:
            r["role"] = "tuning+seed" if r is best else "tuning"
        data["runs"] += tuning + [run(arm, best["lr"], s, stream, rows_per_field) for s in SEEDS[1:]]
        if arm == "collisionless":
            rows_per_field = best["rows"]
            data["collisionless_rows"] = rows_per_field
    data["wall_s"], data["cpu_s"] = time.time() - t0, time.process_time() - c0
    data["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    from lightning_ext.core.io import atomic_write_json

    atomic_write_json(data, JSON)
    return data


def seeds_of(data, arm):
    return [r for r in data["runs"] if r["arm"] == arm and r["lr"] == data["selected_lr"][arm]]


def mean(xs):
    return statistics.mean(xs)


def sd(xs):
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def verdict(data):
    a = {arm: [r["test_auc"] for r in seeds_of(data, arm)] for arm in ARMS}
    rows = {arm: mean([r["total_rows"] for r in seeds_of(data, arm)]) for arm in ARMS}
    if mean(a["collisionless"]) <= data["popularity_test_auc"]:
        return "not testable here", ["the collisionless FM does not beat movie popularity"], {}

    def ge(x, y):  # x >= y unless x is below y by more than the larger seed std
        return mean(a[x]) - mean(a[y]) >= -max(sd(a[x]), sd(a[y]))

    c, h1, h4 = "collisionless", "hashed (equal rows)", "hashed (25% rows)"
    thr = "collisionless + movie threshold 5"
    gap = mean(a[c]) - mean(a[h4])
    claim1 = ge(c, h1) and ge(h1, h4) and gap >= 0.005 and gap > max(sd(a[c]), sd(a[h4]))
    saving = 1 - rows[thr] / rows[c]
    loss = mean(a[c]) - mean(a[thr])
    claim2 = saving >= 0.15 and loss <= 0.005
    notes = [f"collisionless {mean(a[c]):.4f} vs hashed equal {mean(a[h1]):.4f} vs hashed 25% {mean(a[h4]):.4f}: "
             f"collisionless - hashed 25% = {100 * gap:+.2f} pt (needs >= 0.5 pt and the order) -> "
             f"{'holds' if claim1 else 'fails'}",
             f"movie threshold 5 stores {saving:.1%} fewer rows (needs >= 15%) at an AUC loss of {100 * loss:+.2f} pt "
             f"(needs <= 0.5 pt) -> {'holds' if claim2 else 'fails'}"]
    v = "reproduced" if claim1 and claim2 else "partly reproduced" if claim1 or claim2 else "not reproduced"
    return v, notes, {"claim1": claim1, "claim2": claim2, "saving": saving}


def plot(data, path):
    from lightning_ext.core.plotting import new_figure, save_figure

    fig, axes = new_figure(1, 2, figsize=(12, 4.5))
    ms = [mean([r["test_auc"] for r in seeds_of(data, arm)]) for arm in ARMS]
    es = [sd([r["test_auc"] for r in seeds_of(data, arm)]) for arm in ARMS]
    axes[0].bar(range(len(ARMS)), ms, yerr=es, capsize=3, color=["C0", "C1", "C1", "C2", "C3"])
    axes[0].axhline(data["popularity_test_auc"], color="grey", ls="--", label="movie popularity")
    axes[0].set_ylim(min(ms + [data["popularity_test_auc"]]) - 0.02, max(ms) + 0.01)
    axes[0].set_xticks(range(len(ARMS)), [a.replace(" + ", "\n+ ").replace(" (", "\n(") for a in ARMS], fontsize=7)
    axes[0].set_ylabel("progressive AUC, last 70% of the stream")
    axes[0].legend(fontsize=8)
    rows = [mean([r["total_rows"] for r in seeds_of(data, arm)]) for arm in ARMS]
    axes[1].scatter(rows, ms, c=["C0", "C1", "C1", "C2", "C3"])
    for x, y, label in zip(rows, ms, ARMS):
        axes[1].annotate(label, (x, y), fontsize=7)
    axes[1].set_xlabel("embedding rows at the end of the stream (all fields)")
    axes[1].set_ylabel("test AUC")
    save_figure(fig, path)


def caveats(data):
    """Observations computed from the JSON that bound the verdict."""
    c, thr, exp = "collisionless", "collisionless + movie threshold 5", "collisionless + 30-day expiry"
    avg = lambda arm, key: mean([r[key] for r in seeds_of(data, arm)])  # noqa: E731
    movie = lambda arm: mean([r["rows"]["movie"] for r in seeds_of(data, arm)])  # noqa: E731
    auc_c = avg(c, "test_auc")
    return "\n".join([
        f"- Claim 2's row saving is measured over all fields' rows, as the rule was written: "
        f"{1 - avg(thr, 'total_rows') / avg(c, 'total_rows'):.1%}. Within the movie table the filter removes "
        f"{1 - movie(thr) / movie(c):.1%} of the rows (the spec's illustration, 333 of 1,682, suggests the 15% is meant "
        "per table); by that reading the claim would hold. The verdict keeps the rule fixed before the runs.",
        f"- Expiry (30 days, users and movies) stores {1 - avg(exp, 'total_rows') / avg(c, 'total_rows'):.1%} fewer "
        f"rows at the end at an AUC change of {100 * (avg(exp, 'test_auc') - auc_c):+.2f} pt "
        f"({avg(exp, 'evicted'):,.0f} evictions per run): a cheap saving, not part of the pre-registered rule.",
        f"- The premise margin is small: the collisionless FM's test AUC {auc_c:.4f} vs movie popularity "
        f"{data['popularity_test_auc']:.4f}; one pass over 100k events is little data for pairwise factors.",
        "- Hashed tables at equal rows still collide (a universal hash of n ids into n buckets leaves about 37% of "
        "the buckets empty), which is the effect under test; at 25% rows the best lr sat at the grid's top (0.1), "
        "essentially tied with 0.03 on validation."])


def render(data):
    v, notes, _ = verdict(data)
    rows = []
    for arm in ARMS:
        runs = seeds_of(data, arm)
        aucs = [r["test_auc"] for r in runs]
        rows.append(f"| {arm} | {data['selected_lr'][arm]:g} | {mean([r['val_auc'] for r in runs]):.4f} | "
                    f"**{mean(aucs):.4f} ± {sd(aucs):.4f}** | {mean([r['total_rows'] for r in runs]):,.0f} | "
                    f"{mean([r['rows']['movie'] for r in runs]):,.0f} | {mean([r['rows']['user'] for r in runs]):,.0f} | "
                    f"{mean([r['bytes'] for r in runs]) / 1024:,.0f} | {mean([r['evicted'] for r in runs]):,.0f} | "
                    f"{mean([r['cpu_s'] for r in runs]):.0f} |")
    tuning = "\n".join(f"| {r['arm']} | {r['lr']:g} | {r['val_auc']:.4f} | {'yes' if r['role'] == 'tuning+seed' else ''} |"
                       for r in data["runs"] if r.get("role", "").startswith("tuning"))
    ids = ", ".join(f"{f} {n:,}" for f, n in data["distinct_ids"].items())
    page = f"""# Monolith collisionless embeddings vs hashed tables (MovieLens-100K CTR stream)

Rendered by `benchmarks/collisionless_embedding.py` from `collisionless_embedding.json`. Claims (Monolith,
arXiv 2209.07663): a collisionless table beats hashed tables (collisions cost accuracy), and frequency filtering /
expiry cut memory cheaply. Spec: `graph-and-recsys.md` §13. Components: `CollisionlessEmbedding`,
`HashedEmbedding`, `EmbeddingExpiry`'s eviction step (inlined in the stream loop).

## Verdict: **{v}**

{chr(10).join('- ' + n for n in notes)}

Premise check: movie popularity (running positive rate) scores test AUC {data['popularity_test_auc']:.4f}; the
collisionless FM is above it.

**Rule (fixed before the runs):** claim 1 holds if AUC(collisionless) >= AUC(hashed, equal rows) >= AUC(hashed,
25% rows) (a pair counts as ordered unless reversed by more than the larger seed std) and collisionless minus
hashed-25% is >= 0.5 pt and above the larger seed std; claim 2 holds if the movie-threshold arm stores >= 15% fewer
rows with an AUC loss <= 0.5 pt. Both: reproduced; one: partly reproduced; none: not reproduced.

## Results (progressive AUC on the last 70% of the stream, mean ± std over seeds 0, 1, 2)

| arm | lr (seed-0 val) | val AUC (first 30%) | test AUC | rows at the end (all fields) | movie rows | user rows | KiB of rows (fp32, 17 per row) | rows evicted | CPU-s per run |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Distinct ids in the stream: {ids}. Hashed tables get, per field, the rows the collisionless table ended with
({data['collisionless_rows']}) or 25% of them (at least 1).

Tuning (seed 0, progressive AUC on the first 30%):

| arm | lr | val AUC | chosen |
|---|---|---|---|
{tuning}

![AUC and memory](collisionless_embedding.png)

## Caveats (read before citing the verdict)

{caveats(data)}

## Protocol

- {data['events']:,} ratings of recbole's ML-100K in timestamp order, label rating >= 4 (positive rate
  {data['positive_rate']:.3f}); fields {', '.join(FIELDS)} (genres mean-pooled); one table per field.
- Model: factorisation machine, each id a row of 1 + {DIM} numbers (first-order weight + factors), one
  pass in batches of {BATCH} with Adagrad; each batch scored before it is trained on (progressive validation).
- Tables: collisionless capacity 4,096 rows per field (preallocated; only rows in use are counted); hashed:
  universal hash `((a·id + b) mod p) mod n`. Threshold arm: the movie table admits a movie at its 5th occurrence
  (counting filter; earlier occurrences read zeros). Expiry arm: user and movie rows untouched for 30 days of
  event time are evicted after every step, their Adagrad state zeroed.
- Scaled down from the paper: a 100k-event public stream instead of ByteDance production traffic, one machine,
  no parameter synchronisation; lr tuned on seed 0 over {LRS} per arm on the first 30% of the stream.
- 1 thread (`torch.set_num_threads(1)`), `nice -n 10`, on a 2-core machine shared with other jobs.

## Command and runtime

```bash
{COMMAND}
```

Wall {data['wall_s']:.0f} s, CPU {data['cpu_s']:.0f} s, finished {data['finished']}.
"""
    from lightning_ext.core.io import atomic_write_text

    atomic_write_text(page, OUT / "collisionless_embedding.md")
    plot(data, OUT / "collisionless_embedding.png")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    data = json.loads(JSON.read_text()) if args.render_only else train_all()
    render(data)
    print(verdict(data)[:2])


if __name__ == "__main__":
    main()
