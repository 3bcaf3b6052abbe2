"""WASA source attribution on offline text: the watermarked LM's decoded watermarks vs a TF-IDF classifier vs chance.

Claim under test (Wang, Lu, Zhao et al., arXiv 2310.00646): an LLM trained with each data provider's invisible
watermark learns the mapping from a provider's texts to its watermark, so the watermark it embeds in (or regenerates
after) generated text identifies the source, and the attribution survives edits. Rules, fixed before the runs
(the spec's pass criteria, ``shared/specs/domains.md`` section 1, on this provider set):

- premise: the LM learns the text: its held-out bits per character (text space) is at least 0.5 below a unigram
  model's (from the training characters); otherwise "not testable here";
- (a) attribution of held-out real text (watermark regenerated after the un-watermarked text) >= 0.45, and of
  generated continuations (the watermark they carry, else regenerated) >= 0.35 (seed means; chance ~0.2);
- (b) robustness: deleting 3 of the 10 watermark characters keeps >= 90% of the clean generated-text accuracy,
  and stripping all of them (regeneration only) keeps >= 80% of it;
- any seed whose best validation epoch is its last makes the verdict inconclusive; all claims hold = reproduced,
  some = partly reproduced, none = not reproduced. The TF-IDF classifier is the reference the paper's "style
  carries the signal" worry asks for, not a claim.

Protocol: ``SourceAttributionTextDataModule`` with its five default offline providers (Debian fortunes-min's
fortunes / literature / riddles, a seeded sample of GCIDE entries, CPython's pydoc topics), at most 150 training
chunks per provider (chunks of <= 119 characters + a 10-character watermark = 128 tokens), records split 80/10/10
per provider by record. ``WatermarkedCausalLM``: GPT-2 with 2 layers, d=128, 4 heads, context 128, dropout 0.1,
AdamW lr 1e-3 (not tuned), batch 16, at most 40 epochs, early stop after 4 epochs without a lower validation
loss (text + watermark tokens), best weights kept. (The first protocol stopped on the validation attribution
accuracy, at most 25 epochs: its stops fired on noise, see the page; its runs are kept in the JSON under
``runs_v1``.) TF-IDF: char 2-4-gram ``TfidfVectorizer(analyzer="char_wb", min_df=2,
sublinear_tf=True)`` + ``LogisticRegression``, C in {1, 4, 16} tuned on the validation split (a larger grid than
WASA's single setting: favours the reference). Generated text: 96 characters sampled (joint softmax, temperature
0.8) after the first 32 characters of each test text; both methods see only the continuation. Edits: each character
independently inserted-before / deleted / substituted (random letters or space) at rates 0.05, 0.1, 0.2. Seeds
0, 1, 2 (data split, watermarks, insertion positions, init, batch order). One thread.

Run: ``python benchmarks/wasa.py`` (``--render-only`` re-renders the page from the JSON).
"""

from __future__ import annotations

import json
import math
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fit_early_stopping, mean_std, page_main, pop_option, verdict_of  # noqa: E402

from lightning.pytorch import seed_everything  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "docs" / "results"
JSON = OUT / "wasa.json"
P = {"max_records": 150, "context_length": 128, "watermark_length": 10, "n_layer": 2, "n_embd": 128, "n_head": 4,
     "dropout": 0.1, "lr": 1e-3, "batch": 16, "max_epochs": 40, "patience": 4, "monitor": "val_loss", "tfidf_C": [1.0, 4.0, 16.0],
     "prompt_chars": 32, "new_chars": 96, "temperature": 0.8, "rates": [0.05, 0.1, 0.2], "seeds": [0, 1, 2]}
KINDS = ("insert", "delete", "substitute")
#: A one-seed diagnostic run after the main runs (``--diagnostic``; not part of the verdict): the same model trained
#: longer, early-stopped on the validation loss instead of the noisy validation attribution accuracy.
DIAG = {"monitor": "val_loss (text + watermark)", "max_epochs": 20, "patience": 3, "seed": 0}


def make_dm(seed):
    from lightning_ext.text.source_attribution import SourceAttributionTextDataModule

    return SourceAttributionTextDataModule(max_records=P["max_records"], context_length=P["context_length"],
                                           watermark_length=P["watermark_length"], seed=seed,
                                           batch_size=P["batch"], shuffle_seed=seed)


def unigram_bpc(train, test):
    counts = Counter("".join(train))
    total, vocab = sum(counts.values()), len(counts) + 1
    bits = [-math.log2((counts.get(c, 0) + 1) / (total + vocab)) for c in "".join(test)]
    return sum(bits) / len(bits)


def tfidf(dm):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    (xtr, ytr), (xva, yva) = dm.texts("train"), dm.texts("val")
    vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), min_df=2, sublinear_tf=True)
    features, val_features = vec.fit_transform(xtr), vec.transform(xva)
    best = None
    for c in P["tfidf_C"]:
        clf = LogisticRegression(C=c, max_iter=2000).fit(features, ytr)
        score = sum(int(p == y) for p, y in zip(clf.predict(val_features), yva)) / len(yva)
        if best is None or score > best[0]:
            best = (score, c, clf)
    return lambda texts: best[2].predict(vec.transform(texts)).tolist(), best[1], best[0]


def acc(pred, labels):
    return sum(int(p == y) for p, y in zip(pred, labels)) / len(labels)


def run_seed(seed, monitor=None, max_epochs=None, patience=None):
    from lightning_ext.text.wasa import WATERMARK_CHARS, edit_text, extract_watermark, strip_watermark
    from lightning_ext.text.watermarked_lm import WatermarkedCausalLM

    seed_everything(seed, workers=True)
    dm = make_dm(seed)
    dm.setup("fit")
    model = WatermarkedCausalLM(n_layer=P["n_layer"], n_embd=P["n_embd"], n_head=P["n_head"],
                                context_length=P["context_length"], dropout=P["dropout"],
                                watermark_length=P["watermark_length"], attribution_batches=1000, lr=P["lr"])
    monitor = monitor or P["monitor"]
    if monitor == "val_loss":  # KeepBestWeights maximises: log the negated validation loss
        model.validation_step = _negated_val_loss(model)
        monitor = "neg_val_loss"
    fit = fit_early_stopping(model, dm, max_epochs or P["max_epochs"], [], f"wasa seed {seed}",
                             patience=patience or P["patience"], monitor=monitor)
    model.eval()
    t0 = time.time()
    (xtr, _), (xte, yte) = dm.texts("train"), dm.texts("test")
    # premise: held-out bits per char, text space, vs a unigram model
    with torch.no_grad():
        losses = [model.loss(b) for b in dm.test_dataloader()]
    lm_bpc = statistics.mean(float(t["text_loss"]) for t in losses) / math.log(2)
    uni_bpc = unigram_bpc(xtr, xte)
    classify, c_best, c_val = tfidf(dm)
    out = {"fit": fit, "lm_bpc": lm_bpc, "unigram_bpc": uni_bpc, "tfidf_C": c_best, "tfidf_val": c_val,
           "chance": max(Counter(yte).values()) / len(yte), "n_test": len(yte), "n_val": len(dm.texts("val")[1])}
    out["real"] = {"wasa": acc(model.attribute(xte, mode="regenerate"), yte), "tfidf": acc(classify(xte), yte)}
    prompts = [t[:P["prompt_chars"]] for t in xte]
    gen = model.generate_text(prompts, P["new_chars"], P["temperature"], seed=seed)
    full = [len(extract_watermark(g)) >= P["watermark_length"] for g in gen]
    embedded = model.attribute(gen, mode="embedded", min_symbols=P["watermark_length"])
    out["generated"] = {
        "wasa": acc(model.attribute(gen), yte), "tfidf": acc(classify([strip_watermark(g) for g in gen]), yte),
        "regenerated": acc(model.attribute(gen, mode="regenerate"), yte),
        "carry_full_watermark": sum(full) / len(gen),
        "embedded_acc_when_carried": (sum(int(e == y) for e, y, f in zip(embedded, yte, full) if f) / sum(full)
                                      if any(full) else None),
        "examples": [repr(g) for g in gen[:3]],
    }
    rng = random.Random(seed)
    dropped = []
    for g in gen:  # delete 3 of the watermark characters (texts carrying fewer lose what they have)
        idx = [i for i, c in enumerate(g) if c in WATERMARK_CHARS]
        gone = set(rng.sample(idx, min(3, len(idx))))
        dropped.append("".join(c for i, c in enumerate(g) if i not in gone))
    out["attacks"] = {"delete 3 watermark chars": {"wasa": acc(model.attribute(dropped), yte),
                                                   "tfidf": out["generated"]["tfidf"]},
                      "strip watermark": {"wasa": out["generated"]["regenerated"],
                                          "tfidf": out["generated"]["tfidf"]}}
    for kind in KINDS:
        for rate in P["rates"]:
            edited = [edit_text(g, kind, rate, rng) for g in gen]
            out["attacks"][f"{kind} {rate}"] = {"wasa": acc(model.attribute(edited), yte),
                                                "tfidf": acc(classify([strip_watermark(e) for e in edited]), yte)}
    out["eval_s"] = time.time() - t0
    return out


def _negated_val_loss(model):
    """The module's validation step plus ``neg_val_loss`` (text + watermark loss, negated) for early stopping."""
    step = model.validation_step

    def validation_step(batch, batch_idx):
        step(batch, batch_idx)
        model.log("neg_val_loss", -model.loss(batch)["loss"], batch_size=batch[0].shape[0])

    return validation_step


DIAGNOSTIC = False
SEEDS: list[int] = []
MERGE: list[str] = []


def main_runs(data):
    if "runs" in data and "runs_v1" not in data:  # runs of the first protocol (stopped on attribution accuracy)
        data["runs_v1"] = data.pop("runs")
    for part in MERGE:  # per-seed JSONs written by parallel ``--seed N --json PATH`` runs
        data.setdefault("runs", {}).update(json.loads(Path(part).read_text())["runs"])
    if MERGE:
        return
    if DIAGNOSTIC:
        if "diagnostic" not in data:
            data["diagnostic"] = run_seed(0, "val_loss", DIAG["max_epochs"], DIAG["patience"])
        return
    runs = data.setdefault("runs", {})
    for seed in SEEDS or P["seeds"]:
        if str(seed) in runs:
            continue
        runs[str(seed)] = run_seed(seed)
        from lightning_ext.core.io import atomic_write_json

        atomic_write_json(data, JSON_PATH, indent=1)
        r = runs[str(seed)]
        print(f"seed {seed}: bpc {r['lm_bpc']:.3f} (unigram {r['unigram_bpc']:.3f}) real {r['real']} "
              f"generated {r['generated']['wasa']:.3f} tfidf {r['generated']['tfidf']:.3f}", flush=True)


def _ms(values, digits=3):
    return mean_std(values, digits) if values else "n/a"


def _n_val(seed, run):
    return run.get("n_val") or len(make_dm(int(seed)).texts("val")[1])


def _noise_stop(history, n_val):
    first, best = history[0], max(history)
    return best - first <= 2 * math.sqrt(max(first * (1 - first), 1e-6) / n_val)


def summarise(data):
    runs = [data["runs"][k] for k in sorted(data.get("runs", {}))]
    if not runs:
        return None
    m = statistics.mean
    res = {"n": len(runs), "runs": runs}
    res["premise"] = all(r["unigram_bpc"] - r["lm_bpc"] >= 0.5 for r in runs)
    res["converged"] = all(r["fit"]["converged"] for r in runs)
    # added after seeing the runs (states why a stop may be noise): the best validation attribution accuracy must
    # beat the first epoch's by more than two binomial standard errors, else the early stop fired on noise
    res["noise_stops"] = ([k for k, r in sorted(data["runs"].items()) if _noise_stop(r["fit"]["history"], _n_val(k, r))]
                          if P["monitor"] != "val_loss" else [])
    res["real"] = m(r["real"]["wasa"] for r in runs)
    res["gen"] = m(r["generated"]["wasa"] for r in runs)
    res["gen_attacks"] = {k: m(r["attacks"][k]["wasa"] for r in runs) for k in runs[0]["attacks"]}
    return res


def render(data):
    res = summarise(data)
    meta = data["meta"]
    if res is None:
        return "# WASA\n\nNo runs yet.\n", res, "inconclusive"
    runs = res["runs"]
    claims = []
    if not res["premise"]:
        claims.append(("premise", None, "not testable: the LM did not beat the unigram model by 0.5 bits/char"))
    elif not res["converged"] or res["n"] < 3 or res["noise_stops"]:
        why = ("inconclusive: a seed's best epoch was its last" if not res["converged"] else
               "inconclusive: < 3 seeds" if res["n"] < 3 else
               f"inconclusive: the early stop of seed(s) {', '.join(res['noise_stops'])} fired on noise (best "
               "validation attribution within two standard errors of the first epoch's), so the training length "
               "was decided by noise, not by the model")
        claims += [("(a)", None, why), ("(b)", None, why)]
    else:
        claims.append(("(a) attribution", res["real"] >= 0.45 and res["gen"] >= 0.35,
                       f"real {res['real']:.3f} (>= 0.45), generated {res['gen']:.3f} (>= 0.35)"))
        d3, strip = res["gen_attacks"]["delete 3 watermark chars"], res["gen_attacks"]["strip watermark"]
        claims.append(("(b) robustness", d3 >= 0.9 * res["gen"] and strip >= 0.8 * res["gen"],
                       f"delete-3 {d3:.3f} (>= {0.9 * res['gen']:.3f}), strip {strip:.3f} (>= {0.8 * res['gen']:.3f})"))
    verdict = verdict_of(claims)
    strict = []
    if res["premise"]:
        strict = [res["real"] >= 0.45 and res["gen"] >= 0.35,
                  res["gen_attacks"]["delete 3 watermark chars"] >= 0.9 * res["gen"]
                  and res["gen_attacks"]["strip watermark"] >= 0.8 * res["gen"]]
    from _common import combine_claims

    strict_verdict = combine_claims(strict) if strict else "not testable here"
    col = lambda f: _ms([f(r) for r in runs])  # noqa: E731
    lines = [
        "# WASA: watermark-based source attribution of generated text",
        "",
        f"**Verdict: {verdict}.** " + "; ".join(f"{n}: {why}" for n, _, why in claims) + ".",
        "",
        protocol_note(data, res, strict_verdict),
        "",
        "Paper: *WASA: WAtermark-based Source Attribution for Large Language Model-Generated Data* (arXiv 2310.00646; "
        "no reference code found). Components: `WatermarkedCausalLM`, `SourceAttributionTextDataModule`.",
        "",
        "## Protocol",
        "",
        __doc__.split("Protocol: ", 1)[1].split("Run:", 1)[0].strip(),
        "",
        "Rules, fixed before the runs " + __doc__.split("Rules, fixed before the runs", 1)[1].split("Protocol:", 1)[0]
        .strip(),
        "",
        "Command: " + ", ".join(f"`{c}`" for c in meta["commands"]) + f" ({meta['machine']}; "
        "`torch.set_num_threads(1)`, niced, on a shared 2-core machine).",
        "",
        "## Premise: does the LM learn the text?",
        "",
        "| | held-out bits/char (text space) |",
        "|---|---|",
        f"| WASA LM | {col(lambda r: r['lm_bpc'])} |",
        f"| unigram (train character frequencies) | {col(lambda r: r['unigram_bpc'])} |",
        "",
        "## Attribution accuracy (test split, mean ± std over seeds)",
        "",
        "| texts | WASA | TF-IDF + logistic regression | chance (majority) |",
        "|---|---|---|---|",
        f"| held-out real text (WASA: regenerated watermark) | {col(lambda r: r['real']['wasa'])} | "
        f"{col(lambda r: r['real']['tfidf'])} | {col(lambda r: r['chance'])} |",
        f"| generated continuations (carried watermark, else regenerated) | {col(lambda r: r['generated']['wasa'])} | "
        f"{col(lambda r: r['generated']['tfidf'])} | {col(lambda r: r['chance'])} |",
        f"| generated, regeneration only | {col(lambda r: r['generated']['regenerated'])} | | |",
        "",
        f"Generations carrying a full watermark: {col(lambda r: r['generated']['carry_full_watermark'])}; accuracy "
        "of the carried watermark alone on those: "
        f"{_ms([r['generated']['embedded_acc_when_carried'] for r in runs if r['generated']['embedded_acc_when_carried'] is not None])}.",
        "",
        "## Robustness to edits of the generated text",
        "",
        "| attack | WASA | TF-IDF |",
        "|---|---|---|",
    ]
    for k in runs[0]["attacks"]:
        lines.append(f"| {k} | {col(lambda r, k=k: r['attacks'][k]['wasa'])} | "
                     f"{col(lambda r, k=k: r['attacks'][k]['tfidf'])} |")
    carried = [r["generated"]["embedded_acc_when_carried"] for r in runs
               if r["generated"]["embedded_acc_when_carried"] is not None]
    lines += [
        "",
        reading(runs, res, carried),
        "",
        "![accuracy under edits](wasa.png)",
        "",
        "## Budget and convergence",
        "",
        "| seed | epochs | best epoch | steps | samples seen | train s | eval s | TF-IDF C (val acc) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k in sorted(data["runs"]):
        r = data["runs"][k]
        f = r["fit"]
        lines.append(f"| {k} | {f['epochs']} | {f['best_epoch'] + 1} | {f['steps']} | {f['samples']} | "
                     f"{f['wall_s']:.0f} | {r['eval_s']:.0f} | {r['tfidf_C']} ({r['tfidf_val']:.3f}) |")
    lines += ["", ("Validation loss (text + watermark) per epoch, the early-stopping monitor:" if P["monitor"] == "val_loss"
                   else "Validation attribution accuracy per epoch (the early-stopping monitor):"), ""]
    sign = -1 if P["monitor"] == "val_loss" else 1  # the loss is logged negated (KeepBestWeights maximises)
    lines += [f"- seed {k}: " + ", ".join(f"{sign * v:.2f}" for v in data["runs"][k]["fit"]["history"])
              for k in sorted(data["runs"])]
    diag = data.get("diagnostic")
    if diag:
        f = diag["fit"]
        lines += ["", "## Diagnostic before protocol 2 (one seed, not part of the verdict): trained longer, stopped on "
                  "the validation loss", "", f"Same protocol, seed 0, early stop on the validation loss (text + watermark) with patience "
                  f"{DIAG['patience']}, at most {DIAG['max_epochs']} epochs: {f['epochs']} epochs, best {f['best_epoch'] + 1}, "
                  f"{f['steps']} steps, {f['wall_s']:.0f} s. Held-out bits/char {diag['lm_bpc']:.3f} (unigram "
                  f"{diag['unigram_bpc']:.3f}); attribution of held-out real text {diag['real']['wasa']:.3f} (TF-IDF "
                  f"{diag['real']['tfidf']:.3f}); generated {diag['generated']['wasa']:.3f} (TF-IDF "
                  f"{diag['generated']['tfidf']:.3f}), regeneration only {diag['generated']['regenerated']:.3f}, "
                  f"carrying a full watermark {diag['generated']['carry_full_watermark']:.3f}; delete-3 "
                  f"{diag['attacks']['delete 3 watermark chars']['wasa']:.3f}; chance {diag['chance']:.3f}.", "",
                  "Reading: training longer makes the model emit its watermark far more often and the carried "
                  "watermark names the provider more often, but watermark regeneration after a text (the route the "
                  "paper relies on once watermarks are removed) stays near or below chance, and real-text "
                  "attribution stays far below the TF-IDF classifier; so the weak regeneration is not only a budget "
                  "artefact of protocol 1's runs. This diagnostic (run with protocol 1's seeds and data, at most 20 "
                  "epochs, patience 3) is what protocol 2 adopted for all three seeds."]
    lines += ["", "Example generated continuations (seed 0; `\\u200b`... are watermark characters):", ""]
    lines += [f"- `{e}`" for e in runs[0]["generated"]["examples"]]
    lines += ["", "Not measured here: performance preservation (an un-watermarked LM of the same size), for lack of "
              "CPU time; the text-space bits/char above is the number to compare it with.", ""]
    return "\n".join(lines), res, verdict


def reading(runs, res, carried):
    """The page's reading of the numbers (every number computed from the runs)."""
    m = statistics.mean
    worst = min(P["rates"][-1:], default=0.2)
    edits = {k: m(r["attacks"][f"{k} {worst}"]["wasa"] for r in runs) for k in KINDS}
    tf_gen, tf_real = m(r["generated"]["tfidf"] for r in runs), m(r["real"]["tfidf"] for r in runs)
    regen, chance = m(r["generated"]["regenerated"] for r in runs), m(r["chance"] for r in runs)
    return (
        f"Reading: the LM learns the text (held-out bits/char {m(r['lm_bpc'] for r in runs):.2f} against the unigram "
        f"model's {m(r['unigram_bpc'] for r in runs):.2f}; the spec's miniature reached 3.07-3.55 after 1,500-4,000 "
        f"steps, these runs stopped after {min(r['fit']['steps'] for r in runs)}-"
        f"{max(r['fit']['steps'] for r in runs)}). It emits a full watermark in "
        f"{m(r['generated']['carry_full_watermark'] for r in runs):.2f} of its generations, and the carried watermark "
        f"names the provider in {m(carried) if carried else float('nan'):.2f} of those (some generations degenerate "
        "into long runs of watermark characters: see the examples at the end), so on generated text WASA "
        f"({res['gen']:.2f}) is ahead of the style classifier ({tf_gen:.2f}). The route the paper relies on once "
        f"watermarks are gone, regenerating one after the text, stays near chance (generated text {regen:.2f}, "
        f"held-out real text {res['real']:.2f}, chance {chance:.2f}), while TF-IDF reads held-out real text at "
        f"{tf_real:.2f}: what the model learned is to emit a watermark that goes with the prompt's provider, not the "
        "mapping from a provider's text to its watermark. Character edits at rate "
        f"{worst} leave WASA at " + ", ".join(f"{v:.2f} ({k})" for k, v in edits.items()) +
        f" from {res['gen']:.2f}: deletions and substitutions, which can hit watermark characters, cost it most; "
        "insertions do not. A candidate cause of the weak "
        "regeneration: training inserts watermarks after a word and its space, while regeneration starts right "
        "after the text's last character.")


def protocol_note(data, res, strict_verdict):
    """How the stopping rule came about, and protocol 1's outcome (its runs are in the JSON as ``runs_v1``)."""
    if P["monitor"] != "val_loss":
        return (f"By the rules fixed before the runs alone (premise, claims (a) and (b), best epoch not the last), the "
                f"outcome would read *{strict_verdict}*: real-text attribution {res['real']:.3f} (>= 0.45?), generated "
                f"{res['gen']:.3f} (>= 0.35?), delete-3 {res['gen_attacks']['delete 3 watermark chars']:.3f}, strip "
                f"{res['gen_attacks']['strip watermark']:.3f}. The noise rule was added after seeing the validation "
                "curves (seed histories below): it only ever turns a verdict into *inconclusive*.")
    old = [data["runs_v1"][k] for k in sorted(data.get("runs_v1", {}))]
    text = ("This is protocol 2. Protocol 1 stopped on the validation attribution accuracy (patience 4, at most 25 "
            "epochs); its stops fired on noise for 2 of 3 seeds, so it was inconclusive. Protocol 2 changes only the "
            "stopping rule: it stops on the validation loss (text + watermark tokens), a smooth quantity, with the "
            "same patience, at most 40 epochs. The premise, claims and thresholds are unchanged, and the change was "
            "made after seeing protocol 1's curves and a one-seed diagnostic run with this rule (below).")
    if old:
        m = statistics.mean
        text += (f" Protocol 1's numbers, for comparison (3 seeds, {min(r['fit']['steps'] for r in old)}-"
                 f"{max(r['fit']['steps'] for r in old)} steps): held-out real text {m(r['real']['wasa'] for r in old):.3f},"
                 f" generated {m(r['generated']['wasa'] for r in old):.3f}, regeneration only "
                 f"{m(r['generated']['regenerated'] for r in old):.3f}; its runs are in the JSON as `runs_v1`.")
    return text


def plot(data, res, path):
    from lightning_ext.core.plotting import new_figure, save_figure

    if res is None:
        return
    runs = res["runs"]
    fig, axes = new_figure(1, 3, figsize=(11, 3.4))
    for ax, kind in zip(axes, KINDS):
        xs = [0.0] + P["rates"]
        for method, style in (("wasa", "o-"), ("tfidf", "s--")):
            ys = [statistics.mean(r["generated"][method] for r in runs)]
            ys += [statistics.mean(r["attacks"][f"{kind} {rate}"][method] for r in runs) for rate in P["rates"]]
            ax.plot(xs, ys, style, label="WASA" if method == "wasa" else "TF-IDF")
        ax.axhline(statistics.mean(r["chance"] for r in runs), color="grey", lw=1, label="chance")
        ax.set_title({"insert": "insertion", "delete": "deletion", "substitute": "substitution"}[kind]
                     + " of characters")
        ax.set_xlabel("edit rate per character")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("attribution accuracy (generated text)")
    axes[0].legend()
    save_figure(fig, path)


JSON_PATH = JSON

if __name__ == "__main__":
    DIAGNOSTIC = "--diagnostic" in sys.argv
    if DIAGNOSTIC:
        sys.argv.remove("--diagnostic")
    SEEDS = [int(v) for v in pop_option("--seed")]
    MERGE = pop_option("--merge", many=True)
    JSON_PATH = Path((pop_option("--json") or [str(JSON)])[0])
    command = ".venv/bin/python benchmarks/wasa.py" + (" --diagnostic" if DIAGNOSTIC else "")
    if SEEDS or MERGE:  # parallel seeds: ``--seed N --json /tmp/wasa_sN.json`` each, then ``--merge`` them
        command = ("for s in 0 1 2; do .venv/bin/python benchmarks/wasa.py --seed $s --json /tmp/wasa_s$s.json & "
                   "done; wait; .venv/bin/python benchmarks/wasa.py --merge /tmp/wasa_s0.json /tmp/wasa_s1.json "
                   "/tmp/wasa_s2.json")
    if JSON_PATH != JSON and not JSON_PATH.exists():
        JSON_PATH.write_text("{}")
    page_main(JSON_PATH, "wasa" if JSON_PATH == JSON else JSON_PATH.stem, P, command, main_runs, render, plot)
