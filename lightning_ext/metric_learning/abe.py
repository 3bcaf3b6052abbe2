"""ABE: an attention-based ensemble of embedding learners sharing one network, and its divergence loss."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ext.core.validation import check_non_negative, check_positive_int

__all__ = ["ABE", "divergence_loss", "learner_spread", "tiny_abe"]


def divergence_loss(embeddings: Tensor, margin: float = 1.0) -> Tensor:
    r"""ABE's divergence loss: learners' embeddings *of the same input* kept at least ``margin`` apart.

    .. math:: L_{div} = \frac{1}{B\,M(M-1)} \sum_x \sum_{p \ne q} \max(0,\; m_{div} - \lVert f_p(x) - f_q(x)\rVert_2^2)

    (the paper sums; this is the mean over inputs and ordered learner pairs, so its weight does not depend on the
    batch size or the number of learners).

    Args:
        embeddings: ``(B, M, D)``, each learner's (L2-normalised) embedding of each input.
        margin: :math:`m_{div}`.

    Example:
        >>> e = F.normalize(torch.randn(4, 3, 8), dim=-1)
        >>> float(divergence_loss(e, margin=0.0))
        0.0
    """
    b, m, _ = embeddings.shape
    if m < 2:
        return embeddings.new_zeros(())
    d2 = torch.cdist(embeddings, embeddings).pow(2)  # (B, M, M)
    off = ~torch.eye(m, dtype=torch.bool, device=embeddings.device)
    return F.relu(margin - d2[:, off]).mean()


@torch.no_grad()
def learner_spread(embeddings: Tensor) -> float:
    """Mean squared distance between different learners' embeddings of the same input (``(B, M, D)``): how
    diverse the ensemble is (0 when every learner embeds alike)."""
    m = embeddings.shape[1]
    if m < 2:
        return 0.0
    d2 = torch.cdist(embeddings, embeddings).pow(2)
    return float(d2[:, ~torch.eye(m, dtype=torch.bool, device=embeddings.device)].mean())


class ABE(nn.Module):
    r"""Attention-based Ensemble: ``M`` learners that share every weight but their attention masks.

    Paper: Kim, Goyal, Chawla, Lee and Kwon, "Attention-based Ensemble for Deep Metric Learning", ECCV 2018,
    arXiv 1804.00382 (no official code; the Keras ``ABE`` of the kerastools repositories is the reference).

    With a spatial feature extractor :math:`S`, a shared attention trunk :math:`A` with one 1x1-conv + sigmoid head
    per learner, and a shared global embedding :math:`G` (conv stack, global average pooling, FC to
    ``embedding_dim / M``):

    .. math:: f_m(x) = \frac{G(S(x) \odot \sigma(W_m * A(S(x))))}{\lVert G(S(x) \odot \sigma(W_m * A(S(x))))\rVert_2},
              \qquad f(x) = [f_1(x); \dots; f_M(x)]

    ``forward`` returns ``(B, M, D/M)`` (each learner L2-normalised); :meth:`embed` the concatenation used for
    retrieval. With ``num_learners=1`` there is no attention (a plain embedding network: the single-learner
    baseline).

    Args:
        spatial: :math:`S`, images to a ``(B, channels, H, W)`` feature map.
        attention: :math:`A`, ``channels`` to ``channels`` maps (shared by the learners); ``None``: identity.
        global_embedding: :math:`G` up to pooling: ``channels`` maps to ``(B, pooled_dim, H', W')``.
        channels: channels of :math:`S`'s output.
        pooled_dim: channels of :math:`G`'s output.
        num_learners: :math:`M`.
        embedding_dim: total dimension :math:`D` (``M`` must divide it).

    Example:
        >>> net = tiny_abe(num_learners=4, embedding_dim=32)
        >>> net(torch.randn(2, 1, 8, 8)).shape, net.embed(torch.randn(2, 1, 8, 8)).shape
        (torch.Size([2, 4, 8]), torch.Size([2, 32]))
    """

    def __init__(self, spatial: nn.Module, attention: Optional[nn.Module], global_embedding: nn.Module,
                 channels: int, pooled_dim: int, num_learners: int = 4, embedding_dim: int = 512) -> None:
        super().__init__()
        for name, value in (("channels", channels), ("pooled_dim", pooled_dim), ("num_learners", num_learners),
                            ("embedding_dim", embedding_dim)):
            check_positive_int(name, value)
        if embedding_dim % num_learners:
            raise ValueError(f"embedding_dim ({embedding_dim}) must be divisible by num_learners ({num_learners}); "
                             f"e.g. embedding_dim={num_learners * max(1, embedding_dim // num_learners)}.")
        self.num_learners, self.embedding_dim = num_learners, embedding_dim
        self.spatial, self.global_embedding = spatial, global_embedding
        self.attention = (attention if attention is not None else nn.Identity()) if num_learners > 1 else None
        # one 1x1 conv per learner, computed together as one conv with M*channels outputs
        self.heads = nn.Conv2d(channels, num_learners * channels, 1) if num_learners > 1 else None
        self.fc = nn.Linear(pooled_dim, embedding_dim // num_learners)  # shared by the learners (the Keras ABE)
        self.last_masks: Optional[Tensor] = None

    def forward(self, x: Tensor) -> Tensor:
        """Each learner's L2-normalised embedding, ``(B, M, D / M)``."""
        s = self.spatial(x)
        b, c, h, w = s.shape
        if self.num_learners == 1:
            inputs = s
        else:
            masks = torch.sigmoid(self.heads(self.attention(s))).view(b, self.num_learners, c, h, w)
            self.last_masks = masks.detach()
            inputs = (s.unsqueeze(1) * masks).flatten(0, 1)  # (B*M, C, H, W)
        g = self.global_embedding(inputs).mean(dim=(-2, -1))
        return F.normalize(self.fc(g), dim=-1).view(b, self.num_learners, -1)

    def embed(self, x: Tensor) -> Tensor:
        """The ensemble embedding: the learners' normalised embeddings concatenated, ``(B, D)``."""
        return self(x).flatten(1)


def tiny_abe(in_chans: int = 1, width: int = 32, num_learners: int = 4, embedding_dim: int = 32) -> ABE:
    """The spec's small ABE for 8x8 or 28x28 images: ``S`` = conv(width)-conv(2*width) with BN and ReLU, a shared
    conv as the attention trunk, ``G`` = conv(2*width) + BN + ReLU (pooled, then the shared FC)."""
    check_positive_int("in_chans", in_chans)
    check_positive_int("width", width)

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    c = 2 * width
    spatial = nn.Sequential(*block(in_chans, width), *block(width, c))
    attention = nn.Sequential(*block(c, c))
    global_embedding = nn.Sequential(*block(c, c))
    return ABE(spatial, attention, global_embedding, c, c, num_learners, embedding_dim)


def check_margin(name: str, value: float) -> float:
    """A finite, non-negative margin."""
    return float(check_non_negative(name, value))
