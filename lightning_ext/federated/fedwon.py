"""FedWon (Zhuang & Lyu, ICLR 2024): multi-domain federated learning without normalisation layers.

Paper: "FedWon: Triumphing Multi-domain Federated Learning Without Normalization", Weiming Zhuang and Lingjuan Lyu,
ICLR 2024, arXiv 2306.05879. No official code was published (the author's page lists none); the scaled weight
standardisation follows NF-ResNets (Brock et al., 2021, arXiv 2101.08692) as implemented in timm
(``timm.layers.ScaledStdConv2d``, https://github.com/huggingface/pytorch-image-models).

FedWon removes every normalisation layer and reparameterises each convolution with scaled weight standardisation,
then trains with plain FedAvg (no personal layers, so no BatchNorm statistics that differ between domains, and
training works at batch size 1). Per output channel ``o`` with fan-in ``N``::

    W_hat[o] = g[o] * gamma * (W[o] - mean(W[o])) / (std(W[o]) * sqrt(N))

with a learnable gain ``g`` (initialised to 1) and ``gamma`` the activation's variance-preserving constant
(1.7139588594436646 for ReLU, timm's ``_nonlin_gamma``).

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))
    >>> net = remove_normalization(net)
    >>> [type(m).__name__ for m in net]
    ['WSConv2d', 'Identity', 'ReLU', 'Flatten', 'Linear']
    >>> net(torch.randn(1, 1, 8, 8)).shape  # batch size 1 trains too
    torch.Size([1, 10])
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from lightning_ext.core.validation import check_number

#: variance-preserving gains of common activations (timm/models/nfnet.py ``_nonlin_gamma``)
ACTIVATION_GAMMA = {"identity": 1.0, "relu": 1.7139588594436646, "gelu": 1.7015043497085571,
                    "silu": 1.7881293296813965, "elu": 1.2716004848480225}
NORMALIZATION = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


class WSConv2d(nn.Conv2d):
    """Conv2d with scaled weight standardisation (NF-ResNets; FedWon's convolution): no normalisation layer needed.

    The forward pass of timm's ``ScaledStdConv2d`` with the activation's gain chosen by name: the weight of
    each output channel is standardised (zero mean, unit variance over its fan-in), scaled by
    ``gain * gamma / sqrt(fan_in)`` with a learnable per-channel ``gain``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as ``nn.Conv2d``.
        activation: the following non-linearity, which sets ``gamma`` (``"relu"``: 1.714).
        eps: added to the variance (guards constant filters).

    Example:
        >>> conv = WSConv2d(3, 8, 3, padding=1)
        >>> conv(torch.randn(1, 3, 5, 5)).shape
        torch.Size([1, 8, 5, 5])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True,
                 activation: Literal["identity", "relu", "gelu", "silu", "elu"] = "relu", eps: float = 1e-6) -> None:
        if activation not in ACTIVATION_GAMMA:
            raise ValueError(f"activation={activation!r} is unknown; choose one of {', '.join(ACTIVATION_GAMMA)}.")
        check_number("eps", eps, low=0, low_open=True)
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         groups=groups, bias=bias)
        self.gamma, self.eps = ACTIVATION_GAMMA[activation], eps
        self.gain = nn.Parameter(torch.ones(out_channels, 1, 1, 1))

    def standardized_weight(self) -> torch.Tensor:
        """The standardised, scaled weight used in the forward pass (timm's batch-norm-over-the-weight form)."""
        fan_in = self.weight[0].numel()
        flat = self.weight.reshape(1, self.out_channels, -1)
        scale = (self.gain * self.gamma * fan_in ** -0.5).view(-1)
        return torch.nn.functional.batch_norm(flat, None, None, weight=scale, training=True, momentum=0.0,
                                              eps=self.eps).reshape_as(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve with the standardised weight."""
        return self._conv_forward(x, self.standardized_weight(), self.bias)


def remove_normalization(model: nn.Module, activation: Literal["identity", "relu", "gelu", "silu", "elu"] = "relu",
                         standardize: bool = True) -> nn.Module:
    """FedWon's model transform, in place: every normalisation layer -> Identity, every Conv2d -> :class:`WSConv2d`.

    BatchNorm, GroupNorm, LayerNorm and InstanceNorm become ``nn.Identity``; with ``standardize`` each ``nn.Conv2d``
    becomes a :class:`WSConv2d` with the same geometry and its weights and bias copied (``standardize=False`` gives
    the "no normalisation, plain convolution" ablation). Returns the model.
    """
    if activation not in ACTIVATION_GAMMA:
        raise ValueError(f"activation={activation!r} is unknown; choose one of {', '.join(ACTIVATION_GAMMA)}.")
    for name, child in list(model.named_children()):
        if isinstance(child, NORMALIZATION):
            setattr(model, name, nn.Identity())
        elif standardize and type(child) is nn.Conv2d:
            conv = WSConv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                            child.dilation, child.groups, child.bias is not None, activation)
            with torch.no_grad():
                conv.weight.copy_(child.weight)
                if child.bias is not None:
                    conv.bias.copy_(child.bias)
            setattr(model, name, conv)
        else:
            remove_normalization(child, activation, standardize)
    return model
