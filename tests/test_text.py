"""WASA (text family): the separated-space loss against an independent implementation, watermarks and the tokenizer,
the provider DataModule's splits, attribution after a short training, bad inputs, and crash-and-resume."""

from __future__ import annotations

import math
import random
import unicodedata
from pathlib import Path

import pytest
import torch

from lightning_ext.testing import assert_same_parameters, crash_and_resume
from lightning_ext.text.source_attribution import SourceAttributionTextDataModule, read_provider
from lightning_ext.text.wasa import (
    WATERMARK_CHARS,
    CharTokenizer,
    edit_text,
    extract_watermark,
    insert_watermark,
    make_watermarks,
    nearest_provider,
    strip_watermark,
    wasa_loss,
)

pytest.importorskip("transformers")
from lightning_ext.text.watermarked_lm import WatermarkedCausalLM  # noqa: E402


# ------------------------------------------------------------------------------------------------ the loss
def _reference_loss(z, zw, targets, v, lam):
    """From the paper's equations, position by position in float64: -log softmax over V of the text head at text
    targets, -log softmax over V' of the watermark head at watermark targets, each averaged, L_text + lam L_wtm."""
    text, wm = [], []
    for b in range(targets.shape[0]):
        for j in range(targets.shape[1]):
            t = int(targets[b, j])
            if t == -100:
                continue
            if t < v:
                row = [float(x) for x in z[b, j]]
                text.append(-(row[t] - math.log(sum(math.exp(x) for x in row))))
            else:
                row = [float(x) for x in zw[b, j]]
                wm.append(-(row[t - v] - math.log(sum(math.exp(x) for x in row))))
    lt = sum(text) / len(text) if text else 0.0
    lw = sum(wm) / len(wm) if wm else 0.0
    return lt + lam * lw, lt, lw


def test_wasa_loss_matches_the_papers_equations_on_one_batch():
    g = torch.Generator().manual_seed(0)
    v, k = 7, 3
    z, zw = torch.randn(2, 9, v, generator=g), torch.randn(2, 9, k, generator=g)
    targets = torch.randint(0, v, (2, 9), generator=g)
    targets[0, 3:5] = torch.tensor([v, v + 2])  # two watermark targets
    targets[1, 6] = v + 1
    targets[1, 8] = -100
    out = wasa_loss(z, zw, targets, v, watermark_loss_weight=0.7)
    loss, lt, lw = _reference_loss(z, zw, targets, v, 0.7)
    assert out["text_loss"].item() == pytest.approx(lt, rel=1e-5)
    assert out["wm_loss"].item() == pytest.approx(lw, rel=1e-5)
    assert out["loss"].item() == pytest.approx(loss, rel=1e-5)
    # the single-head convention (one head with |V| + |V'| outputs, the other space masked out) gives the same
    joint = torch.cat([z, zw], -1)
    mask = torch.zeros_like(joint, dtype=torch.bool)
    is_wm = targets >= v
    mask[..., v:] = ~is_wm.unsqueeze(-1)
    mask[..., :v] |= is_wm.unsqueeze(-1)
    masked = joint.masked_fill(mask, -float("inf"))
    valid = targets != -100
    ce = torch.nn.functional.cross_entropy(masked[valid], targets[valid], reduction="none")
    assert ce[~is_wm[valid]].mean().item() == pytest.approx(lt, rel=1e-5)
    assert ce[is_wm[valid]].mean().item() == pytest.approx(lw, rel=1e-5)


def test_wasa_loss_without_watermark_targets_is_the_text_loss_and_has_gradients():
    z = torch.randn(1, 4, 5, requires_grad=True)
    zw = torch.randn(1, 4, 2, requires_grad=True)
    out = wasa_loss(z, zw, torch.tensor([[1, 2, 3, 4]]), 5)
    assert out["wm_loss"].item() == 0.0
    out["loss"].backward()
    assert z.grad.abs().sum() > 0 and zw.grad is not None


# ------------------------------------------------------------------------------------------------ watermarks
def test_watermarks_are_unique_seeded_and_survive_normalisation():
    a, b = make_watermarks(20, 10, 6, seed=3), make_watermarks(20, 10, 6, seed=3)
    assert a == b and len(set(a)) == 20 and a != make_watermarks(20, 10, 6, seed=4)
    with pytest.raises(ValueError, match="raise watermark_length"):
        make_watermarks(9, length=3, num_symbols=2)
    text = insert_watermark("one two three", a[0], random.Random(0))
    assert unicodedata.normalize("NFKC", text) == text and a[0] in " ".join(text.split())
    assert all(not c.isspace() and unicodedata.category(c) == "Cf" for c in WATERMARK_CHARS)
    assert strip_watermark(text) == "one two three" and extract_watermark(text) == a[0]


def test_tokenizer_keeps_each_watermark_character_one_token():
    tok = CharTokenizer()
    mark = make_watermarks(1, 10, 6, seed=0)[0]
    ids = tok.encode("ab " + mark + "c\té")
    assert sum(tok.is_watermark(i) for i in ids) == 10 and len(ids) == 16
    assert tok.decode(ids) == "ab " + mark + "c \ufffd"


def test_nearest_provider_uses_hamming_then_edit_distance():
    marks = ["\u200b" * 10, "\u200c" * 10, "\u200b\u200c" * 5]
    assert nearest_provider("\u200b" * 9 + "\u200c", marks) == 0
    assert nearest_provider("\u200b\u200c" * 3 + "\u200b", marks) == 2  # deletions: edit distance
    assert nearest_provider("\u200c" * 14, marks) == 1  # too long: cut to the watermark length


def test_edit_text_edits_at_the_rate():
    rng = random.Random(0)
    text = "x" * 2000
    assert abs(len(edit_text(text, "delete", 0.1, rng)) - 1800) < 60
    assert abs(len(edit_text(text, "insert", 0.1, rng)) - 2200) < 60
    sub = edit_text(text, "substitute", 0.2, rng)
    assert len(sub) == 2000 and 300 < sum(c != "x" for c in sub) < 500
    with pytest.raises(ValueError, match="rate"):
        edit_text(text, "delete", 1.5, rng)


# ------------------------------------------------------------------------------------------------ the DataModule
def _providers(tmp_path: Path, n: int = 30) -> dict[str, str]:
    """Two synthetic providers with different vocabularies (fortune-file format)."""
    words = {"fruit": "apple pear plum fig grape lime", "tools": "hammer saw drill wrench chisel file"}
    out = {}
    for name, vocab in words.items():
        rng = random.Random(name)
        recs = [" ".join(rng.choice(vocab.split()) for _ in range(8)) + f" number {i}." for i in range(n)]
        (tmp_path / name).write_text("\n%\n".join(recs))
        out[name] = str(tmp_path / name)
    return out


def test_datamodule_splits_by_record_watermarks_every_sample_and_is_seeded(tmp_path):
    providers = _providers(tmp_path)
    dm = SourceAttributionTextDataModule(providers, min_chars=10, context_length=64, seed=1, batch_size=4)
    dm.setup("fit")
    train, _ = dm.texts("train")
    test, labels = dm.texts("test")
    assert not set(train) & set(test) and set(labels) == {0, 1}
    ids, targets, provider, clean = dm.split_dataset("train")[0]
    tok = dm.tokenizer
    assert sum(tok.is_watermark(int(t)) for t in targets) == dm.watermark_length
    assert not any(tok.is_watermark(int(t)) for t in clean)
    mark = "".join(tok.symbols[int(t) - tok.text_vocab_size] for t in targets if tok.is_watermark(int(t)))
    assert mark == dm.watermarks[provider]
    again = SourceAttributionTextDataModule(providers, min_chars=10, context_length=64, seed=1)
    again.setup("fit")
    assert again.splits == dm.splits
    other = SourceAttributionTextDataModule(providers, min_chars=10, context_length=64, seed=2)
    assert other.watermarks != dm.watermarks


def test_datamodule_removes_watermark_characters_already_in_the_raw_text(tmp_path):
    providers = _providers(tmp_path)
    Path(providers["fruit"]).write_text("\n%\n".join(f"apple\u200b pear\u2063 plum number {i}." for i in range(20)))
    dm = SourceAttributionTextDataModule(providers, min_chars=10, context_length=64)
    dm.setup("fit")
    assert all(len(extract_watermark(m)) == 10 for m in dm.splits["train"]["marked"])


def test_default_providers_read_offline_text():
    recs = read_provider("/usr/share/games/fortunes/riddles")
    assert len(recs) > 50 and any("?" in r for r in recs)
    assert len(read_provider("builtin:pydoc")) > 100


@pytest.mark.parametrize("kwargs, match", [
    ({"providers": {"a": "/nonexistent/text"}}, "at least two"),
    ({"providers": {"a": "/nonexistent/a", "b": "/nonexistent/b"}}, "does not exist"),
    ({"providers": {"a": "builtin:nope", "b": "builtin:pydoc"}}, "Unknown provider source"),
    ({"val_fraction": 0.6, "test_fraction": 0.5}, "must be < 1"),
    ({"context_length": 12}, "raise context_length"),
    ({"num_watermark_symbols": 7}, "num_watermark_symbols"),
])
def test_datamodule_bad_inputs_fail_with_one_line(kwargs, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match) as err:
        dm = SourceAttributionTextDataModule(**kwargs)
        dm.setup("fit")
    assert "\n" not in str(err.value)


def test_missing_fortunes_names_the_debian_package():
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes-min"):
        read_provider("/usr/share/games/fortunes/no-such-category")


# ------------------------------------------------------------------------------------------------ the module
@pytest.mark.parametrize("kwargs, match", [
    ({"n_embd": 30, "n_head": 4}, "divisible"),
    ({"watermark_length": 64, "context_length": 64}, "smaller than context_length"),
    ({"watermark_loss_weight": float("nan")}, "watermark_loss_weight"),
    ({"lr": 0.0}, "lr"),
    ({"num_watermark_symbols": 1}, "num_watermark_symbols"),
])
def test_module_bad_inputs_fail_with_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        WatermarkedCausalLM(**kwargs)
    assert "\n" not in str(err.value)


def test_module_refuses_a_foreign_watermark_table_and_needs_one_to_attribute():
    lm = WatermarkedCausalLM(n_layer=1, n_embd=16, n_head=2, context_length=32)
    with pytest.raises(RuntimeError, match="set_watermarks"):
        lm.attribute(["text"])
    with pytest.raises(ValueError, match="watermark_length"):
        lm.set_watermarks(["\u200b" * 9])


def _tiny_lm(**kw):
    return WatermarkedCausalLM(n_layer=1, n_embd=32, n_head=2, context_length=64, dropout=0.0, lr=3e-3, **kw)


@pytest.mark.slow
def test_training_learns_the_mapping_from_provider_text_to_watermark(tmp_path):
    """After a short fit on two providers with different vocabularies, the regenerated watermark names the provider
    of held-out texts (chance: 0.5; 0.88 measured), the text loss falls, and a text carrying a watermark is read directly."""
    from lightning.pytorch import Trainer, seed_everything

    seed_everything(0)
    dm = SourceAttributionTextDataModule(_providers(tmp_path, 60), min_chars=10, context_length=64, batch_size=8,
                                         test_fraction=0.25)
    lm = _tiny_lm()
    Trainer(max_epochs=10, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0).fit(lm, datamodule=dm)
    texts, labels = dm.texts("test")
    found = lm.attribute(texts, mode="regenerate")
    assert sum(f == y for f, y in zip(found, labels)) / len(labels) >= 0.8
    with torch.no_grad():
        text_loss = float(lm.loss(next(iter(dm.test_dataloader())))["text_loss"])
    assert text_loss < math.log(dm.tokenizer.text_vocab_size) - 1.0
    marked = [insert_watermark("anything at all", dm.watermarks[1], random.Random(0))]
    assert lm.attribute(marked, mode="embedded") == [1]
    assert lm.attribute(["no watermark here"], mode="embedded") == [-1]
    gen = lm.generate_text(["apple pear "], max_new_tokens=20, seed=0)
    assert len(gen[0]) == 20


def test_checkpoint_keeps_the_watermark_table(tmp_path):
    lm = _tiny_lm()
    marks = make_watermarks(3, 10, 6, seed=0)
    lm.set_watermarks(marks, ["a", "b", "c"])
    ckpt: dict = {}
    lm.on_save_checkpoint(ckpt)
    fresh = _tiny_lm()
    fresh.on_load_checkpoint(ckpt)
    assert fresh.watermarks == marks and fresh.provider_names == ["a", "b", "c"]


@pytest.mark.slow
def test_crash_and_resume_mid_epoch_matches_an_uninterrupted_fit(tmp_path):
    providers = _providers(tmp_path, 20)

    def make_dm():
        return SourceAttributionTextDataModule(providers, min_chars=10, context_length=48, batch_size=8)

    def make_lm():
        torch.manual_seed(0)
        return WatermarkedCausalLM(n_layer=1, n_embd=16, n_head=2, context_length=48, dropout=0.0,
                                   attribution_batches=1)

    full, resumed, info = crash_and_resume(make_lm, make_dm, list, max_epochs=2, crash_step=5, tmp_path=tmp_path,
                                           checkpoint_every_n_steps=2, weights_only=True, limit_val_batches=1)
    assert info["resumed_from_step"] == 4
    assert_same_parameters(full, resumed)
    assert resumed.watermarks == make_dm().watermarks
