"""SFPrompt's pure core: a ViT split into client head, server body and client tail, with prompt tokens.

Paper: Cao, Zhu, Gong, "SFPrompt: Communication-Efficient Split Federated Fine-Tuning for Large Pre-Trained Models
over Resource-Limited Devices", arXiv 2407.17533 (2024). No official code was found (a third-party repository
exists; not read). The model is ``W = [W_h, W_b, W_t]``; a client holds the head ``W_h`` (patch embedding and the
first ``cut[0]`` blocks, plus the learnable prompts ``p``) and the tail ``W_t`` (blocks ``cut[1]:``, the final
norm and the classifier), the server holds the body ``W_b`` (blocks ``cut[0]:cut[1]``, frozen). The prompts are
VPT-shallow tokens inserted after the class token::

    logits = W_t( W_b( W_h([x_cls ; p ; E(x)]) ) )            (split forward, through the server)
    logits_local = W_t( W_h([x_cls ; p ; E(x)]) )              (the local-loss model: the body skipped)

Trainable in SFPrompt: the prompts and the tail (the head's and body's weights stay frozen). Each round a client
(phase 1) updates ``p`` and ``W_t`` with the local loss ``CE(logits_local, y)`` without any communication, (phase
2) scores its data with EL2N (Paul et al. 2021) under the local model, ``||softmax(logits_local) - onehot(y)||_2``,
and keeps the hardest ``keep`` fraction, then (phase 3) trains on the kept samples through the server (split
learning: activations up, gradients down; :mod:`lightning_ext.federated.sfprompt_federation`), and the server
averages the clients' prompts and tails (FedAvg). The phases' order and what trains are the spec's reading of a
secondary summary (``federated.md`` 2.8: Unverified in the paper's text).

Example:
    >>> import torch
    >>> net = SplitPromptViT(depth=3, cut=[1, 2], num_prompts=2, embed_dim=16, num_heads=2)
    >>> x = torch.randn(2, 1, 28, 28)
    >>> torch.allclose(net(x), net.tail(net.body(net.head(x))))
    True
    >>> net.head(x).shape  # class token + 2 prompts + 16 patches
    torch.Size([2, 19, 16])
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from typing_extensions import override

from lightning_ext.core.optional import require
from lightning_ext.core.validation import check_fraction, check_number, check_positive_int

__all__ = ["SplitPromptViT", "TUNE_MODES", "el2n_keep", "split_part"]

Tune = Literal["sfprompt", "prompt", "full"]
TUNE_MODES = ("sfprompt", "prompt", "full")


class SplitPromptViT(nn.Module):
    """A timm ``VisionTransformer`` cut into client head, server body and client tail, with ``num_prompts`` prompts.

    Args:
        img_size: input side in pixels.
        patch_size: patch side (the spec's 4; 7 makes 16 patches of a 28 x 28 image).
        in_chans: input channels.
        num_classes: classifier outputs.
        embed_dim: token width.
        depth: number of transformer blocks.
        num_heads: attention heads.
        cut: ``[a, b]``: head = blocks ``[0, a)``, body = ``[a, b)``, tail = ``[b, depth)``; ``0 <= a <= b < depth``.
        num_prompts: prompt tokens after the class token (0: none).

    Attention runs unfused (``fused_attn=False``) so that ``torch.utils.flop_counter`` counts its matmuls.
    """

    def __init__(self, img_size: int = 28, patch_size: int = 7, in_chans: int = 1, num_classes: int = 10,
                 embed_dim: int = 64, depth: int = 6, num_heads: int = 4, cut: Sequence[int] = (1, 5),
                 num_prompts: int = 10) -> None:
        super().__init__()
        for name, value in (("img_size", img_size), ("patch_size", patch_size), ("in_chans", in_chans),
                            ("num_classes", num_classes), ("embed_dim", embed_dim), ("depth", depth),
                            ("num_heads", num_heads)):
            check_positive_int(name, value)
        check_number("num_prompts", num_prompts, low=0, integer=True)
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not a multiple of patch_size={patch_size}.")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}.")
        cut = list(cut)
        if len(cut) != 2 or not all(isinstance(c, int) for c in cut) or not 0 <= cut[0] <= cut[1] < depth:
            raise ValueError(f"cut must be [a, b] with 0 <= a <= b < depth={depth} (the tail needs a block); "
                             f"got {cut}.")
        require("timm", "SplitPromptViT")
        from timm.models.vision_transformer import VisionTransformer

        self.vit = VisionTransformer(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                     num_classes=num_classes, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                                     global_pool="token", class_token=True)
        for block in self.vit.blocks:
            block.attn.fused_attn = False
        self.cut, self.num_prompts, self.depth = (cut[0], cut[1]), num_prompts, depth
        self.prompts = nn.Parameter(torch.zeros(1, num_prompts, embed_dim))
        if num_prompts:  # VPT's initialisation: uniform in +-sqrt(6 / (fan_in + fan_out)) of the patch projection
            bound = math.sqrt(6.0 / float(in_chans * patch_size * patch_size + embed_dim))
            nn.init.uniform_(self.prompts, -bound, bound)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Client head: patch embedding, class token and positions, prompts, blocks ``[0, a)``."""
        v = self.vit
        t = v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(x))))
        if self.num_prompts:
            k = v.num_prefix_tokens
            t = torch.cat([t[:, :k], self.prompts.expand(len(t), -1, -1), t[:, k:]], dim=1)
        for block in v.blocks[:self.cut[0]]:
            t = block(t)
        return t

    def body(self, t: torch.Tensor) -> torch.Tensor:
        """Server body: blocks ``[a, b)``."""
        for block in self.vit.blocks[self.cut[0]:self.cut[1]]:
            t = block(t)
        return t

    def tail(self, t: torch.Tensor) -> torch.Tensor:
        """Client tail: blocks ``[b, depth)``, final norm, class-token pooling and the classifier."""
        for block in self.vit.blocks[self.cut[1]:]:
            t = block(t)
        return self.vit.forward_head(self.vit.norm(t))

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The whole model (head, body, tail) in one place."""
        return self.tail(self.body(self.head(x)))

    def local_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The client's local model: head then tail, the server's body skipped (the local-loss phase)."""
        return self.tail(self.head(x))

    def trainable_keys(self, tune: Tune) -> list[str]:
        """Parameter names trained (and averaged) under ``tune``: ``"sfprompt"`` prompts + tail,
        ``"prompt"`` prompts + final norm + classifier, ``"full"`` every parameter."""
        if tune not in TUNE_MODES:
            raise ValueError(f"tune={tune!r} is unknown; choose one of {', '.join(TUNE_MODES)}.")
        names = [n for n, _ in self.named_parameters()]
        if tune == "full":
            return [n for n in names if n != "prompts" or self.num_prompts]
        if tune == "prompt":
            keep = ("vit.norm.", "vit.fc_norm.", "vit.head.")
            return [n for n in names if (n == "prompts" and self.num_prompts) or n.startswith(keep)]
        return [n for n in names if (n == "prompts" and self.num_prompts) or split_part(self, n) == "tail"]

    def set_trainable(self, tune: Tune) -> list[str]:
        """``requires_grad`` on exactly :meth:`trainable_keys` (others frozen); returns them."""
        keys = set(self.trainable_keys(tune))
        for name, p in self.named_parameters():
            p.requires_grad_(name in keys)
        return sorted(keys)


def split_part(model: SplitPromptViT, key: str) -> str:
    """Which party holds a ``state_dict``/parameter key: ``"head"``, ``"body"`` or ``"tail"``."""
    match = re.match(r"vit\.blocks\.(\d+)\.", key)
    if match:
        i = int(match.group(1))
        return "head" if i < model.cut[0] else "body" if i < model.cut[1] else "tail"
    if key.startswith(("vit.norm.", "vit.fc_norm.", "vit.head.", "vit.head_drop")):
        return "tail"
    return "head"  # prompts, class token, position embedding, patch embedding


def el2n_keep(scores: torch.Tensor, keep: float) -> torch.Tensor:
    """SFPrompt's client-side pruning rule: indices of the ``ceil(keep * n)`` samples with the highest EL2N score
    (the hardest), in ascending index order. Scores come from
    :func:`lightning_ext.curation.el2n.el2n_scores` (``||softmax(f(x)) - onehot(y)||_2``) under the local model.

    Example:
        >>> el2n_keep(torch.tensor([0.1, 0.9, 0.5]), 0.5).tolist()
        [1, 2]
    """
    check_fraction("keep", keep, allow_zero=False)
    if scores.dim() != 1 or len(scores) == 0:
        raise ValueError(f"el2n_keep needs a non-empty vector of scores; got shape {tuple(scores.shape)}.")
    n = max(1, math.ceil(keep * len(scores) - 1e-9))
    return torch.sort(torch.topk(scores, n).indices).values
