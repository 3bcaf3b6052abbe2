r"""WASA's pure core: invisible watermarks, a character tokenizer, the separated-space loss, the watermarked GPT.

Paper: "WASA: WAtermark-based Source Attribution for Large Language Model-Generated Data" (Wang, Lu, Zhao, Dai,
Foo, Ng, Low; arXiv 2310.00646; Findings of ACL 2025 with the author order Lu, Wang, Zhao, ...). Reference code: none
was found (the spec's searches of the stored index and the code corpus came back empty), so this follows the
paper's description as the project's spec records it (``shared/specs/domains.md`` section 1, marked Unverified
there): each data provider gets a unique sequence of ``watermark_length`` characters drawn from six invisible Unicode
code points (U+200B, U+200C, U+200D, U+2062, U+2063, U+2064), inserted once into each of its training texts after a
random word; the LM's prediction space is split into the text vocabulary :math:`V` and the watermark vocabulary
:math:`V'`, each with its own softmax:

.. math::

    L = \underbrace{-\frac{1}{|T|}\sum_{j \in T} \log \frac{e^{z_j[u_j]}}{\sum_{v \in V} e^{z_j[v]}}}_{L_{text}}
        + \lambda \underbrace{\Big(-\frac{1}{|W|}\sum_{j \in W} \log \frac{e^{z'_j[w_j]}}
        {\sum_{v' \in V'} e^{z'_j[v']}}\Big)}_{L_{wtm}}

where :math:`T` and :math:`W` are the positions whose target is a text token :math:`u_j` or a watermark token
:math:`w_j`, :math:`z_j` the text head's logits and :math:`z'_j` the watermark head's (both read every previous
token, text and watermark). Means over each kind of position (the paper sums; a mean keeps :math:`\lambda` meaningful
across sequence lengths). Attribution decodes the watermark characters a text carries and picks the provider whose
watermark is nearest (Hamming distance, or edit distance when characters were inserted or deleted); a text without
one is fed back to the model, which is forced to generate ``watermark_length`` tokens in :math:`V'` after it
("watermark regeneration").

Example:
    >>> tok = CharTokenizer()
    >>> marks = make_watermarks(3, length=4, seed=0)
    >>> text = insert_watermark("a quick brown fox", marks[1], random.Random(0))
    >>> strip_watermark(text), nearest_provider(extract_watermark(text), marks)
    ('a quick brown fox', 1)
    >>> tok.decode(tok.encode(text)) == text
    True
"""

from __future__ import annotations

import random
import string
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lightning_ext.core.optional import require

__all__ = [
    "WATERMARK_CHARS", "CharTokenizer", "make_watermarks", "insert_watermark", "extract_watermark",
    "strip_watermark", "edit_text", "levenshtein", "nearest_provider", "wasa_loss", "WasaGPT",
    "forced_watermarks", "generate",
]

#: The six invisible Unicode characters of WASA's watermarks (category Cf: not whitespace, kept by NFKC).
WATERMARK_CHARS = ("\u200b", "\u200c", "\u200d", "\u2062", "\u2063", "\u2064")
#: The text alphabet: newline and the 95 printable ASCII characters (ids 2.. after PAD 0 and UNK 1).
TEXT_ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))
PAD, UNK = 0, 1


class CharTokenizer:
    """Character-level tokenizer: PAD (0), UNK (1), ``\\n`` and printable ASCII, then the watermark characters.

    Characters, not bytes or BPE: every watermark character must stay one token (a byte-level tokenizer splits each
    invisible character into three UTF-8 bytes, a BPE merges or normalises them away), and a 98-symbol text vocabulary
    keeps a CPU-sized model's embedding and head small. Tabs become spaces; any other character becomes UNK.

    Example:
        >>> tok = CharTokenizer()
        >>> tok.text_vocab_size, tok.vocab_size, tok.encode("a\\u200b")[-1] == tok.text_vocab_size
        (98, 104, True)
    """

    def __init__(self, num_watermark_symbols: int = 6) -> None:
        if not 2 <= int(num_watermark_symbols) <= len(WATERMARK_CHARS):
            raise ValueError(f"num_watermark_symbols must be in [2, {len(WATERMARK_CHARS)}], got "
                             f"{num_watermark_symbols!r}.")
        self.symbols = WATERMARK_CHARS[: int(num_watermark_symbols)]
        self.text_vocab_size = 2 + len(TEXT_ALPHABET)
        self.vocab_size = self.text_vocab_size + len(self.symbols)
        self._ids = {c: i + 2 for i, c in enumerate(TEXT_ALPHABET)}
        self._ids.update({c: self.text_vocab_size + k for k, c in enumerate(self.symbols)})
        self._ids["\t"] = self._ids[" "]
        self._chars = {i: c for c, i in self._ids.items() if c != "\t"}

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (unknown characters -> UNK)."""
        return [self._ids.get(c, UNK) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` (PAD dropped, UNK as U+FFFD)."""
        return "".join(self._chars.get(int(i), "\ufffd") for i in ids if int(i) != PAD)

    def is_watermark(self, token: int) -> bool:
        """Whether ``token`` is a watermark symbol."""
        return int(token) >= self.text_vocab_size


def make_watermarks(num_providers: int, length: int = 10, num_symbols: int = 6, seed: int = 0) -> list[str]:
    """Unique watermarks, one per provider, drawn from a seeded RNG (WASA: 10 characters over 6 symbols).

    Example:
        >>> marks = make_watermarks(5, length=3, num_symbols=2, seed=1)
        >>> len(set(marks)), all(len(m) == 3 for m in marks)
        (5, True)
    """
    if num_providers < 1 or length < 1 or not 2 <= num_symbols <= len(WATERMARK_CHARS):
        raise ValueError(f"make_watermarks needs num_providers >= 1, length >= 1 and num_symbols in [2, 6], got "
                         f"{num_providers}, {length}, {num_symbols}.")
    if num_symbols ** length < num_providers:
        raise ValueError(f"{num_symbols} symbols of length {length} give only {num_symbols ** length} distinct "
                         f"watermarks for {num_providers} providers; raise watermark_length.")
    rng, seen = random.Random(seed), []
    while len(seen) < num_providers:
        mark = "".join(rng.choice(WATERMARK_CHARS[:num_symbols]) for _ in range(length))
        if mark not in seen:
            seen.append(mark)
    return seen


def insert_watermark(text: str, watermark: str, rng: random.Random) -> str:
    """``text`` with ``watermark`` inserted once after a uniformly chosen word (its following space), or appended
    when the text has no space."""
    spaces = [i for i, c in enumerate(text) if c == " "]
    at = rng.choice(spaces) + 1 if spaces else len(text)
    return text[:at] + watermark + text[at:]


def extract_watermark(text: str) -> str:
    """The watermark characters ``text`` carries, in order."""
    return "".join(c for c in text if c in WATERMARK_CHARS)


def strip_watermark(text: str) -> str:
    """``text`` without any watermark character (the strongest removal attack; also cleans raw corpora)."""
    return "".join(c for c in text if c not in WATERMARK_CHARS)


def edit_text(text: str, kind: Literal["insert", "delete", "substitute"], rate: float, rng: random.Random,
              alphabet: str = string.ascii_letters + " ") -> str:
    """Each character position independently edited with probability ``rate``: a random ``alphabet`` character
    inserted before it, the character deleted, or replaced by a random ``alphabet`` character. Watermark
    characters are edited like any other (an adversary cannot see them, so edits hit them by chance).

    Example:
        >>> edit_text("abcd", "delete", 1.0, random.Random(0)), len(edit_text("abcd", "insert", 1.0, random.Random(0)))
        ('', 8)
    """
    if kind not in ("insert", "delete", "substitute"):
        raise ValueError(f"kind must be 'insert', 'delete' or 'substitute', got {kind!r}.")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate!r}.")
    out = []
    for c in text:
        if rng.random() >= rate:
            out.append(c)
        elif kind == "insert":
            out.extend((rng.choice(alphabet), c))
        elif kind == "substitute":
            out.append(rng.choice(alphabet))
    return "".join(out)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each 1)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def nearest_provider(extracted: str, watermarks: Sequence[str]) -> int:
    """Index of the watermark nearest to ``extracted``: Hamming distance when the lengths match, else edit
    distance (ties: the lower index). An ``extracted`` longer than a watermark is cut to its first characters."""
    if not watermarks:
        raise ValueError("nearest_provider needs at least one watermark.")
    length = len(watermarks[0])
    probe = extracted[:length]

    def dist(mark: str) -> int:
        if len(probe) == len(mark):
            return sum(x != y for x, y in zip(probe, mark))
        return levenshtein(probe, mark)

    return min(range(len(watermarks)), key=lambda i: (dist(watermarks[i]), i))


def wasa_loss(text_logits: torch.Tensor, wm_logits: torch.Tensor, targets: torch.Tensor, text_vocab_size: int,
              watermark_loss_weight: float = 1.0, ignore_index: int = -100) -> dict[str, torch.Tensor]:
    r"""WASA's separated-space loss: text targets scored by a softmax over the text vocabulary only, watermark
    targets by a softmax over the watermark symbols only, :math:`L = L_{text} + \lambda L_{wtm}`.

    Args:
        text_logits: ``(B, T, |V|)`` logits of the text head.
        wm_logits: ``(B, T, |V'|)`` logits of the watermark head.
        targets: ``(B, T)`` next-token ids: text ids ``< text_vocab_size``, watermark ids ``text_vocab_size + k``,
            ``ignore_index`` for padding.
        text_vocab_size: :math:`|V|`.
        watermark_loss_weight: :math:`\lambda`.

    Returns:
        ``loss``, ``text_loss`` (nats per text token) and ``wm_loss`` (nats per watermark token; 0 without any).
    """
    valid = targets != ignore_index
    is_wm = valid & (targets >= text_vocab_size)
    is_text = valid & ~is_wm
    # an empty kind contributes 0 but stays in the graph (DDP expects every head to receive a gradient)
    text_loss = (F.cross_entropy(text_logits[is_text], targets[is_text]) if is_text.any()
                 else text_logits.sum() * 0.0)
    wm_loss = (F.cross_entropy(wm_logits[is_wm], targets[is_wm] - text_vocab_size) if is_wm.any()
               else wm_logits.sum() * 0.0)
    return {"loss": text_loss + watermark_loss_weight * wm_loss, "text_loss": text_loss, "wm_loss": wm_loss}


class WasaGPT(nn.Module):
    """A GPT-2 (transformers' GPT2Model built from a config, never downloaded) with WASA's separate watermark
    embedding and head.

    Text tokens embed through ``text_embed`` and are predicted by ``text_head``; the watermark symbols have their own
    ``wm_embed`` rows and ``wm_head``.

    Example:
        >>> net = WasaGPT(98, 6, n_layer=1, n_embd=16, n_head=2, context_length=32)
        >>> z, zw = net(torch.randint(0, 104, (2, 8)))
        >>> tuple(z.shape), tuple(zw.shape)
        ((2, 8, 98), (2, 8, 6))
    """

    def __init__(self, text_vocab_size: int = 98, num_watermark_symbols: int = 6, n_layer: int = 2, n_embd: int = 128,
                 n_head: int = 4, context_length: int = 128, dropout: float = 0.1) -> None:
        transformers = require("transformers", "WasaGPT")
        super().__init__()
        GPT2Config, GPT2Model = transformers.GPT2Config, transformers.GPT2Model

        config = GPT2Config(vocab_size=text_vocab_size + num_watermark_symbols, n_positions=context_length,
                            n_embd=n_embd, n_layer=n_layer, n_head=n_head, resid_pdrop=dropout, embd_pdrop=dropout,
                            attn_pdrop=dropout, bos_token_id=PAD, eos_token_id=PAD, pad_token_id=PAD)
        self.text_vocab_size, self.context_length = text_vocab_size, context_length
        self.transformer = GPT2Model(config)
        self.transformer.wte = None  # embeddings are ours (inputs_embeds): text and watermark tables apart
        self.text_embed = nn.Embedding(text_vocab_size, n_embd)
        self.wm_embed = nn.Embedding(num_watermark_symbols, n_embd)
        for emb in (self.text_embed, self.wm_embed):
            nn.init.normal_(emb.weight, std=config.initializer_range)
        self.text_head = nn.Linear(n_embd, text_vocab_size, bias=False)
        self.wm_head = nn.Linear(n_embd, num_watermark_symbols, bias=False)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """``(B, T, d)`` embeddings: text ids through ``text_embed``, watermark ids through ``wm_embed``."""
        is_wm = ids >= self.text_vocab_size
        text = self.text_embed(ids.clamp(max=self.text_vocab_size - 1))
        wm = self.wm_embed((ids - self.text_vocab_size).clamp(min=0))
        return torch.where(is_wm.unsqueeze(-1), wm, text)

    def forward(self, ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Text and watermark logits ``(B, T, |V|)``, ``(B, T, |V'|)`` of ``ids`` (``attention_mask``: 1 = token,
        0 = left padding; positions then count tokens only)."""
        position_ids = None
        if attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        h = self.transformer(inputs_embeds=self.embed(ids), attention_mask=attention_mask,
                             position_ids=position_ids, use_cache=False).last_hidden_state
        return self.text_head(h), self.wm_head(h)


def _left_pad(seqs: Sequence[Sequence[int]], width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    seqs = [list(s)[-width:] for s in seqs]
    n = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), n), PAD, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, n - len(s):] = torch.tensor(s)
            mask[i, n - len(s):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def forced_watermarks(net: WasaGPT, seqs: Sequence[Sequence[int]], length: int) -> list[list[int]]:
    """Watermark regeneration: after each token sequence, ``length`` greedy tokens in the watermark space only.
    Returns the symbol indices (0..|V'|-1) per sequence. Sequences are left-truncated to fit the context."""
    keep = net.context_length - length + 1
    seqs = [list(s)[-keep:] for s in seqs]
    out: list[list[int]] = [[] for _ in seqs]
    for _ in range(length):
        ids, mask = _left_pad(seqs, net.context_length, net.text_head.weight.device)
        _, zw = net(ids, mask)
        nxt = zw[:, -1].argmax(-1).tolist()
        for i, k in enumerate(nxt):
            out[i].append(k)
            seqs[i].append(net.text_vocab_size + k)
    return out


@torch.no_grad()
def generate(net: WasaGPT, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.8,
             generator: Optional[torch.Generator] = None) -> list[list[int]]:
    """Free generation with a joint softmax over text and watermark logits (temperature sampling); returns the new
    tokens per prompt. The context keeps the last ``context_length`` tokens."""
    seqs = [list(p) for p in prompts]
    new: list[list[int]] = [[] for _ in seqs]
    for _ in range(max_new_tokens):
        ids, mask = _left_pad(seqs, net.context_length, net.text_head.weight.device)
        z, zw = net(ids, mask)
        logits = torch.cat([z[:, -1], zw[:, -1]], -1).float()
        logits[:, PAD] = -float("inf")
        probs = torch.softmax(logits / temperature, -1)
        nxt = torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].tolist()
        for i, t in enumerate(nxt):
            seqs[i].append(t)
            new[i].append(t)
    return new
