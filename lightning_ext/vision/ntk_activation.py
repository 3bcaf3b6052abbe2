"""Activations whose infinitely wide and deep network is a consistent classifier, and its closed-form kernel.

Radhakrishnan, Belkin and Uhler, "Wide and Deep Neural Networks Achieve Optimality for Classification",
arXiv 2204.14126 (2022); reference code: the authors' repository "Code for Consistency with Infinitely Wide and
Deep Networks" (``models.py``, ``main.py``, ``dataset.py``; https://arxiv.org/abs/2204.14126 links it).

Every activation is described by its normalised dual ``φ̌(ρ) = E[φ(u) φ(v)]`` for standard normals ``u, v``
with correlation ``ρ`` (``φ̌(1) = 1``). For inputs on the unit sphere the NNGP and NTK of a fully connected
network of depth ``L`` follow the layer recursion

    Σ_0 = <x, x'>,   Σ_{l+1} = φ̌(Σ_l),   Θ_0 = Σ_0,   Θ_{l+1} = φ̌(Σ_l) + Θ_l · φ̌'(Σ_l).

As ``L → ∞`` the kernel classifier (interpolation of one-hot labels) is, depending on ``φ``, 1-NN, majority vote or
a singular-kernel classifier; the dimension-specific activations below are in the consistent class.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Union

import torch
from torch import nn

from lightning_ext.core.validation import (
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    check_choice,
    check_number,
    check_positive_int,
)

ActivationName = Literal["relu", "erf", "sine", "hermite", "optimal", "2d_opt", "3d_opt", "5d_opt", "9d_opt"]
ACTIVATIONS = ("relu", "erf", "sine", "hermite", "optimal", "2d_opt", "3d_opt", "5d_opt", "9d_opt")

#: Dual of the dimension-specific optimal activations as Hermite weights {k: c_k}, φ̌(ρ) = Σ c_k ρ^k (authors'
#: ``models.py``); the activation is φ = Σ √c_k He_k / √k!.
OPTIMAL_DUALS: dict[int, dict[int, float]] = {
    2: {1: 0.5, 7: 0.5},
    3: {1: 0.5, 3: 0.5},
    5: {1: 0.25, 2: 0.5, 3: 0.25},
    9: {1: 1 / 16, 2: 7 / 8, 3: 1 / 16},
}
#: The ``sine_a`` parameter the authors use per input dimension (``main.py``).
SINE_A: dict[int, float] = {3: 2.676, 5: 6.13539, 9: 13.8258}


def _hermite_e(x: torch.Tensor, k: int) -> torch.Tensor:
    """Probabilists' Hermite polynomial He_k(x) by the three-term recursion He_{n+1} = x He_n - n He_{n-1}."""
    prev, cur = torch.ones_like(x), x
    if k == 0:
        return prev
    for n in range(1, k):
        prev, cur = cur, x * cur - n * prev
    return cur


class NTKActivation(nn.Module):
    """An activation with a known normalised dual, so that an infinitely wide and deep network classifies consistently.

    The family of "Wide and Deep Neural Networks Achieve Optimality for Classification" (Radhakrishnan, Belkin and
    Uhler, 2022): ``relu`` (√2·max(0, x)), ``erf``, ``sine`` (sin(√a·x) normalised), ``hermite`` (He_k/√k!) and
    the dimension-specific optimal activations ``2d_opt``, ``3d_opt``, ``5d_opt``, ``9d_opt`` (``optimal`` picks
    one from ``input_dim``). Every one is scaled so that ``E[φ(z)²] = 1`` for ``z ~ N(0, 1)``.

    Args:
        name: the activation.
        input_dim: the data's input dimension; needed by ``optimal`` (2, 3, 5 or 9) and by ``sine`` without ``a``
            (3, 5 or 9, the authors' values of ``a``).
        a: the frequency parameter of ``sine`` (its dual is sinh(aρ)/sinh(a)).
        degree: the degree ``k`` of ``hermite`` (its dual is ρ^k).

    Example:
        >>> import torch
        >>> act = NTKActivation("3d_opt")
        >>> act(torch.zeros(2, 4)).shape
        torch.Size([2, 4])
        >>> round(float(act.dual(torch.tensor(0.5))), 4)  # ρ³/2 + ρ/2
        0.3125
    """

    def __init__(self, name: ActivationName = "3d_opt", input_dim: Optional[PositiveInt] = None,
                 a: Optional[PositiveFloat] = None, degree: Optional[PositiveInt] = None) -> None:
        super().__init__()
        check_choice("name", name, ACTIVATIONS)
        if input_dim is not None:
            check_positive_int("input_dim", input_dim)
        if a is not None:
            check_number("a", a, low=0, low_open=True)
        if degree is not None:
            check_positive_int("degree", degree)
        if name == "optimal":
            if input_dim not in OPTIMAL_DUALS:
                raise ValueError(f"NTKActivation('optimal') has a known activation only for input_dim in "
                                 f"{sorted(OPTIMAL_DUALS)}, got input_dim={input_dim}; use 'sine' with a chosen `a`")
            name = f"{input_dim}d_opt"
        if name == "sine" and a is None:
            if input_dim not in SINE_A:
                raise ValueError(f"NTKActivation('sine') needs `a`, or input_dim in {sorted(SINE_A)} for the "
                                 f"authors' value; got input_dim={input_dim}")
            a = SINE_A[input_dim]
        if name == "hermite" and degree is None:
            raise ValueError("NTKActivation('hermite') needs `degree` (a positive int k: dual ρ^k)")
        self.name, self.input_dim, self.a, self.degree = name, input_dim, a, degree
        self.coefficients: Optional[dict[int, float]] = None
        if name.endswith("d_opt"):
            self.coefficients = OPTIMAL_DUALS[int(name[0])]
        elif name == "hermite":
            self.coefficients = {int(degree): 1.0}

    def extra_repr(self) -> str:
        extra = f", a={self.a}" if self.name == "sine" else f", degree={self.degree}" if self.name == "hermite" else ""
        return f"name={self.name!r}{extra}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """φ(x), elementwise."""
        if self.name == "relu":
            return math.sqrt(2.0) * torch.relu(x)
        if self.name == "erf":
            return torch.erf(x) / math.sqrt(2 / math.pi * math.asin(2 / 3))
        if self.name == "sine":
            a = float(self.a)
            return torch.sin(math.sqrt(a) * x) / math.sqrt(math.exp(-a) * math.sinh(a))
        out = torch.zeros_like(x)
        for k, c in self.coefficients.items():
            out = out + math.sqrt(c / math.factorial(k)) * _hermite_e(x, k)
        return out

    def dual(self, rho: torch.Tensor) -> torch.Tensor:
        """The normalised dual φ̌(ρ) = E[φ(u) φ(v)], corr(u, v) = ρ, for ρ in [-1, 1]."""
        if self.name == "relu":
            return (rho * (math.pi - torch.arccos(rho)) + torch.sqrt(torch.clamp(1 - rho**2, min=0))) / math.pi
        if self.name == "erf":
            return torch.asin(2 * rho / 3) / math.asin(2 / 3)
        if self.name == "sine":
            return torch.sinh(self.a * rho) / math.sinh(self.a)
        return sum(c * rho**k for k, c in self.coefficients.items())

    def dual_grad(self, rho: torch.Tensor) -> torch.Tensor:
        """dφ̌/dρ (the dual of φ', up to the normalisation), used by the NTK recursion."""
        if self.name == "relu":
            return (math.pi - torch.arccos(rho)) / math.pi
        if self.name == "erf":
            return (2 / 3) / torch.sqrt(1 - (2 * rho / 3) ** 2) / math.asin(2 / 3)
        if self.name == "sine":
            return self.a * torch.cosh(self.a * rho) / math.sinh(self.a)
        return sum(k * c * rho ** (k - 1) for k, c in self.coefficients.items())


def sphere_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` divided by their L2 norm; a zero row is refused (it has no direction)."""
    norms = x.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError("inputs contain an all-zero row, which has no point on the unit sphere; drop or shift it")
    return x / norms


def deep_kernel(x1: torch.Tensor, x2: torch.Tensor, activation: NTKActivation, depth: int,
                kernel: Literal["nngp", "ntk"] = "nngp", normalize: bool = True) -> torch.Tensor:
    """The NNGP or NTK of a depth-``depth`` network with ``activation`` between rows of ``x1`` and ``x2``.

    Inputs are put on the unit sphere (``normalize``) and correlations clipped to [-1, 1] at every layer, as in
    the authors' ``models.py``. This is the infinite-width limit: a finite network with a polynomial activation
    (``*d_opt``, ``hermite``) is far from it at depth > 1 (its per-input variance drifts off the fixed point 1).

    Example:
        >>> x = torch.eye(3, dtype=torch.float64)
        >>> deep_kernel(x, x, NTKActivation("relu"), depth=2).diagonal()
        tensor([1., 1., 1.], dtype=torch.float64)
    """
    if x1.ndim != 2 or x2.ndim != 2 or x1.shape[1] != x2.shape[1]:
        raise ValueError(f"deep_kernel needs two 2-d inputs with the same number of columns, got shapes "
                         f"{tuple(x1.shape)} and {tuple(x2.shape)}")
    check_positive_int("depth", depth)
    check_choice("kernel", kernel, ("nngp", "ntk"))
    if normalize:
        x1, x2 = sphere_normalize(x1), sphere_normalize(x2)
    sigma = torch.clamp(x1 @ x2.T, -1.0, 1.0)
    theta = sigma.clone() if kernel == "ntk" else None
    for _ in range(depth):
        nxt = torch.clamp(activation.dual(sigma), -1.0, 1.0)
        if kernel == "ntk":
            theta = nxt + theta * activation.dual_grad(sigma)
        sigma = nxt
    return theta if kernel == "ntk" else sigma


class DeepKernelClassifier:
    """Kernel classifier with the closed-form NNGP/NTK of an infinitely wide network of a given depth.

    The classifier of Radhakrishnan, Belkin and Uhler (2022): inputs on the unit sphere, the depth-``L`` kernel of
    :func:`deep_kernel`, interpolation of one-hot labels ``α = (K_train + ridge·I)⁻¹ Y`` in float64 and
    ``argmax(K_test α)``. scikit-learn-style ``fit`` / ``predict`` / ``predict_proba`` / ``decision_function``;
    ``fit`` is one linear solve. ``condition_number_`` reports the train kernel's condition number (the authors'
    solve has no ridge and is meaningless for low-rank kernels such as ``hermite`` of degree 1).

    Args:
        activation: the activation's name (see :class:`NTKActivation`).
        depth: number of hidden layers ``L``.
        kernel: ``"nngp"`` (the authors' ``main.py``) or ``"ntk"``.
        ridge: added to the train kernel's diagonal (0 = the paper's interpolation).
        input_dim: for ``activation="optimal"`` or ``"sine"`` without ``a``.
        a: ``sine``'s parameter.
        degree: ``hermite``'s degree.

    Example:
        >>> import torch
        >>> x = torch.tensor([[1.0, 0.1], [0.9, 0.2], [0.1, 1.0], [0.2, 0.9]])
        >>> DeepKernelClassifier("relu", depth=3).fit(x, torch.tensor([0, 0, 1, 1])).predict(x).tolist()
        [0, 0, 1, 1]
    """

    def __init__(self, activation: ActivationName = "3d_opt", depth: PositiveInt = 100,
                 kernel: Literal["nngp", "ntk"] = "nngp", ridge: NonNegativeFloat = 0.0,
                 input_dim: Optional[PositiveInt] = None, a: Optional[PositiveFloat] = None,
                 degree: Optional[PositiveInt] = None) -> None:
        self.act = NTKActivation(activation, input_dim=input_dim, a=a, degree=degree)
        check_positive_int("depth", depth)
        check_choice("kernel", kernel, ("nngp", "ntk"))
        check_number("ridge", ridge, low=0)
        self.activation, self.depth, self.kernel, self.ridge = activation, int(depth), kernel, float(ridge)

    @staticmethod
    def _inputs(x: Union[torch.Tensor, "object"], what: str) -> torch.Tensor:
        x = torch.as_tensor(x, dtype=torch.float64)
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"{what} must be a non-empty 2-d array (n_samples, n_features), got shape "
                             f"{tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{what} contains NaN or infinity; clean or impute it first")
        return x

    def fit(self, x, y) -> "DeepKernelClassifier":
        """Solve the kernel system on ``(x, y)``; ``y`` holds class labels (any integers)."""
        x = self._inputs(x, "x")
        y = torch.as_tensor(y)
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"y must be 1-d with one label per row of x ({x.shape[0]}), got shape {tuple(y.shape)}")
        self.classes_, index = torch.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError("y has a single class; a classifier needs at least two")
        self.x_train_ = sphere_normalize(x)
        k = deep_kernel(self.x_train_, self.x_train_, self.act, self.depth, self.kernel, normalize=False)
        if self.kernel == "nngp":
            k.fill_diagonal_(1.0)
        if self.ridge:
            k = k + self.ridge * torch.eye(len(k), dtype=k.dtype)
        targets = torch.nn.functional.one_hot(index, len(self.classes_)).to(torch.float64)
        eig = torch.linalg.eigvalsh(k).abs()  # the kernel is symmetric
        self.condition_number_ = float(eig.max() / eig.min()) if float(eig.min()) > 0 else math.inf
        self.alpha_ = torch.linalg.solve(k, targets)
        return self

    def decision_function(self, x) -> torch.Tensor:
        """Kernel regression outputs ``K(x, X_train) α``, one column per class."""
        if not hasattr(self, "alpha_"):
            raise RuntimeError("DeepKernelClassifier is not fitted; call fit(x, y) first")
        x = self._inputs(x, "x")
        if x.shape[1] != self.x_train_.shape[1]:
            raise ValueError(f"x has {x.shape[1]} features but the classifier was fitted on "
                             f"{self.x_train_.shape[1]}")
        k = deep_kernel(sphere_normalize(x), self.x_train_, self.act, self.depth, self.kernel, normalize=False)
        return k @ self.alpha_

    def predict_proba(self, x) -> torch.Tensor:
        """Softmax of :meth:`decision_function` (a score, not a calibrated probability)."""
        return torch.softmax(self.decision_function(x), dim=1)

    def predict(self, x) -> torch.Tensor:
        """The class label with the largest kernel regression output."""
        index = self.decision_function(x).argmax(dim=1)
        return self.classes_[index]
