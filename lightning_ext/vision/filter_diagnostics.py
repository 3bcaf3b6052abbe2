"""Filter diagnostics (CNN Filter DB, "On filter design in deep CNNs"): per-layer statistics of 3x3 conv filters
during training (sparsity, variance entropy, distribution shift on PCA coefficients), plots and warnings."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_ext.core.checkpoints import read_state_dict
from lightning_ext.core.io import atomic_write_text
from lightning_ext.core.layers import match_names
from lightning_ext.core.paths import check_path_argument, output_path
from lightning_ext.core.strategy import refuse_sharded_strategy
from lightning_ext.core.validation import (
    ClosedUnitInterval,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
    check_number,
    check_positive_int,
)

__all__ = ["FilterDiagnostics", "FilterPCA", "conv3x3_layers", "distribution_shift", "entropy_threshold",
           "filter_statistics", "layer_filters", "pairwise_shift", "sparsity", "variance_entropy", "variance_ratios"]

_EPS32 = float(torch.finfo(torch.float32).eps)


# -- pure core: statistics of one layer's filters -----------------------------------------------------------------

def conv3x3_layers(model: nn.Module, layers: Optional[Sequence[str]] = None,
                   include_depthwise: bool = False) -> dict[str, nn.Conv2d]:
    """The 3x3 convolutions of ``model`` by name: every ``nn.Conv2d`` instance (subclasses such as timm's
    ``Conv2dSame``/``StdConv2d`` included, unlike torchconvquality's exact-type test) with a 3x3 kernel; depthwise
    convs (one input channel per filter) only with ``include_depthwise``. ``layers`` (names or globs) restricts.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 8, 1))
        >>> list(conv3x3_layers(net)), list(conv3x3_layers(net, include_depthwise=True))
        (['0'], ['0', '1'])
    """
    found = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (3, 3) and not getattr(m, "transposed", False):
            if m.in_channels // m.groups == 1 and m.in_channels > 1 and not include_depthwise:
                continue
            found[name] = m
    if layers is not None:
        keep = match_names(list(found), layers, "layers", f"the 3x3 convs of {type(model).__name__}")
        found = {n: found[n] for n in keep}
    return found


def layer_filters(weight: Tensor) -> Tensor:
    """A conv weight ``(c_out, c_in/groups, 3, 3)`` as ``n x 9`` float64 rows on the CPU (``n = c_out c_in/groups``)."""
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"expected a 3x3 conv weight (c_out, c_in, 3, 3), got shape {tuple(weight.shape)}")
    return weight.detach().to("cpu", torch.float64).reshape(-1, 9)


def sparsity(filters: Tensor, sparsity_eps: float = 0.01, row_peak: Optional[Tensor] = None) -> tuple[float, Tensor]:
    """Share of filters whose 9 entries are all below ``sparsity_eps`` times the layer's largest ``|w|`` (a zero
    layer uses threshold 1), and the mask of those filters.

    Example:
        >>> f = torch.tensor([[1.0] * 9, [0.001] * 9])
        >>> sparsity(f)[0]
        0.5
    """
    peak = filters.abs().amax(dim=1) if row_peak is None else row_peak  # all 9 entries < t <=> their max < t
    t = float(peak.max()) * sparsity_eps if peak.numel() else 0.0
    if t == 0:
        t = 1.0
    mask = peak < t
    return float(mask.double().mean()) if len(mask) else 0.0, mask


def variance_ratios(filters: Tensor) -> Tensor:
    """Explained-variance ratios of the filters' 9 principal directions, largest first, from the eigenvalues of
    the 9x9 covariance (equal to the squared singular values of the centred ``n x 9`` matrix over ``n - 1``, at a
    fraction of the cost for wide layers). All zeros for fewer than 2 filters or no variance."""
    n = len(filters)
    if n < 2:
        return torch.zeros(9, dtype=torch.float64)
    mu = filters.mean(dim=0)
    cov = (filters.T @ filters - n * torch.outer(mu, mu)) / (n - 1)  # no centred n x 9 copy
    ev = torch.linalg.eigvalsh(cov).clamp(min=0).flip(0)
    total = ev.sum()
    return ev / total if total > 0 else torch.zeros_like(ev)


def variance_entropy(filters: Tensor) -> float:
    r"""Variance entropy :math:`H = -\sum_i r_i \log_{10} r_i` of the explained-variance ratios (base 10: at most
    :math:`\log_{10} 9 \approx 0.954` for isotropic filters, 0 when one direction holds all variance).

    Example:
        >>> round(variance_entropy(torch.randn(20000, 9, dtype=torch.float64)), 2)
        0.95
    """
    r = variance_ratios(filters)
    r = r[r > 0]
    return float(-(r * torch.log10(r)).sum()) if len(r) else 0.0


def entropy_threshold(n: int) -> float:
    """torchconvquality's empirical variance entropy of ``n`` random filters, the normaliser of
    ``variance_entropy_norm`` (above 1 looks random, near 0 redundant)."""
    return 1.2618047 / (1 + math.exp(-0.88767525 * (math.log2(max(n, 1)) - 2.30436435))) - 0.31050834


def filter_statistics(filters: Tensor, sparsity_eps: float = 0.01, row_peak: Optional[Tensor] = None
                      ) -> dict[str, float]:
    """``n``, ``sparsity``, ``variance_entropy``, ``variance_entropy_norm`` and the same entropy on the non-sparse
    filters (``variance_entropy_clean``) of one layer's ``n x 9`` filters (``row_peak``: their ``max |w|`` per row,
    if already computed)."""
    n = len(filters)
    sp, mask = sparsity(filters, sparsity_eps, row_peak)
    h = variance_entropy(filters)
    clean = h if not bool(mask.any()) else variance_entropy(filters[~mask])
    norm = entropy_threshold(n)
    return {"n": n, "sparsity": sp, "variance_entropy": h, "variance_entropy_norm": h / norm,
            "variance_entropy_clean": clean, "variance_entropy_clean_norm": clean / entropy_threshold(int((~mask).sum()))}


# -- pure core: distribution shift on PCA coefficients ------------------------------------------------------------

def peak_scale(filters: Tensor, row_peak: Optional[Tensor] = None) -> Tensor:
    """Each filter divided by its largest ``|w|`` (a zero filter by 1)."""
    peak = (filters.abs().amax(dim=1) if row_peak is None else row_peak).unsqueeze(1)
    return filters / torch.where(peak > 0, peak, torch.ones_like(peak))


class FilterPCA:
    r"""The CNN Filter DB's 9-component PCA of peak-scaled filters with fixed per-component histogram ranges.

    Fitted once on a reference set (the initial filters of all layers); ``histograms`` gives, per component, the
    ``bins``-bin distribution of the coefficients :math:`c = (w/\max|w| - \mu) V^T` over the fixed range (values
    outside it count in the edge bins), as densities with empty bins set to float32 eps and renormalised to sum 1,
    as in the notebook's KL code. Component signs follow scikit-learn (largest ``|entry|`` positive).
    """

    def __init__(self, mean: Tensor, components: Tensor, explained_variance_ratio: Tensor, low: Tensor, high: Tensor,
                 bins: int = 70) -> None:
        self.mean, self.components, self.explained_variance_ratio = mean, components, explained_variance_ratio
        self.low, self.high, self.bins = low, high, int(bins)

    @classmethod
    def fit(cls, filter_sets: Sequence[Tensor], bins: int = 70) -> "FilterPCA":
        """Fit on the peak-scaled union of ``filter_sets`` (each ``n_i x 9``)."""
        x = torch.cat([peak_scale(f) for f in filter_sets])
        mean = x.mean(dim=0)
        xc = x - mean
        ev, vec = torch.linalg.eigh(xc.T @ xc / max(len(x) - 1, 1))
        order = torch.argsort(ev, descending=True)
        ev, comps = ev[order].clamp(min=0), vec[:, order].T.contiguous()
        sign = torch.sign(comps.gather(1, comps.abs().argmax(dim=1, keepdim=True)))
        comps = comps * torch.where(sign == 0, torch.ones_like(sign), sign)
        evr = ev / ev.sum() if ev.sum() > 0 else torch.full_like(ev, 1 / 9)
        coef = xc @ comps.T
        low, high = coef.amin(dim=0), coef.amax(dim=0)
        high = torch.where(high > low, high, low + 1.0)
        return cls(mean, comps, evr, low, high, bins)

    def coefficients(self, filters: Tensor, row_peak: Optional[Tensor] = None) -> Tensor:
        """PCA coefficients ``n x 9`` of peak-scaled ``filters``."""
        return peak_scale(filters, row_peak) @ self.components.T - self.mean @ self.components.T

    def histograms(self, filters: Tensor, row_peak: Optional[Tensor] = None) -> Tensor:
        """``9 x bins`` probabilities (see the class docstring)."""
        c = self.coefficients(filters, row_peak)
        width = (self.high - self.low) / self.bins
        # bin index floor((c - low) / width), clamped into [0, bins - 1]; in place: wide layers hold millions of values
        c.sub_(self.low).mul_(self.bins / (self.high - self.low)).clamp_(0, self.bins - 1)
        idx = c.to(torch.int64)  # truncation == floor for values >= 0
        idx.add_(torch.arange(9).unsqueeze(0) * self.bins)
        counts = torch.bincount(idx.flatten(), minlength=9 * self.bins).view(9, self.bins).double()
        density = counts / (len(filters) * width.unsqueeze(1))
        density = torch.where(density > 0, density, torch.full_like(density, _EPS32))
        return density / density.sum(dim=1, keepdim=True)

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "components": self.components, "explained_variance_ratio":
                self.explained_variance_ratio, "low": self.low, "high": self.high, "bins": self.bins}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "FilterPCA":
        return cls(state["mean"], state["components"], state["explained_variance_ratio"], state["low"],
                   state["high"], state["bins"])


def distribution_shift(p: Tensor, q: Tensor, weights: Tensor) -> float:
    r"""The CNN Filter DB's drift :math:`D(P, Q) = \sum_i v_i\,[\mathrm{KL}(p_i \| q_i) + \mathrm{KL}(q_i \| p_i)]`
    between two ``9 x bins`` histogram sets, weighted by the explained-variance ratios :math:`v` (natural log).

    Example:
        >>> p = torch.full((9, 4), 0.25, dtype=torch.float64)
        >>> distribution_shift(p, p, torch.full((9,), 1 / 9, dtype=torch.float64))
        0.0
    """
    kl = (p * (p / q).log()).sum(dim=-1) + (q * (q / p).log()).sum(dim=-1)
    return float((weights * kl).sum())


def pairwise_shift(hists: Tensor, weights: Tensor) -> Tensor:
    """``D`` between every pair of ``L x 9 x bins`` histogram sets, an ``L x L`` symmetric matrix (zero diagonal)."""
    logp = hists.log()
    self_term = (hists * logp).sum(dim=-1)  # L x 9
    cross = torch.einsum("ikb,jkb->ijk", hists, logp)  # sum_b p_i log p_j
    kl = self_term.unsqueeze(1) - cross  # KL(p_i || p_j), L x L x 9
    return ((kl + kl.transpose(0, 1)) * weights).sum(dim=-1)


# -- Lightning wrapper --------------------------------------------------------------------------------------------

class FilterDiagnostics(Callback):
    r"""Filter diagnostics (Gavrikov & Keuper, 2022): every N epochs, per 3x3 conv layer, the CNN Filter DB's
    sparsity, variance entropy and distribution shift of the filters, logged, plotted and checked for degeneration.

    Papers: "CNN Filter DB: An Empirical Investigation of Trained Convolutional Filters" (Gavrikov, Keuper), CVPR
    2022, arXiv 2203.15331, reference code https://github.com/paulgavrikov/CNN-Filter-DB (``main.ipynb``) and
    https://github.com/paulgavrikov/torchconvquality (per-layer metrics); "On filter design in deep convolutional
    neural network" (Hirani, Abdulla), arXiv 2410.21644 (a survey: why to watch filters next to the initialisation).

    For a layer's :math:`n` filters :math:`w_j \in \mathbb{R}^9` (one per output x input channel):

    - sparsity: share of filters with all :math:`|w_{jk}| < \epsilon \max_{j,k} |w_{jk}|` (``sparsity_eps``);
    - variance entropy :math:`H = -\sum_i r_i \log_{10} r_i`, :math:`r` the explained-variance ratios (eigenvalues of
      the 9x9 covariance), and :math:`H / f(n)` with torchconvquality's random-filter curve :math:`f`;
    - distribution shift :math:`D(P, Q) = \sum_i v_i [\mathrm{KL}(p_i\|q_i) + \mathrm{KL}(q_i\|p_i)]` over the
      ``bins``-bin histograms :math:`p_i, q_i` of the coefficients on principal component :math:`i` of peak-scaled
      filters, :math:`v` the explained-variance ratios. The PCA basis and histogram ranges are fitted once, on the
      initial filters of all selected layers (so values stay comparable across epochs).

    Logged under ``filters/``: per layer (``log_per_layer``) ``<layer>/sparsity``, ``/variance_entropy``,
    ``/variance_entropy_norm``, ``/drift_from_init`` (D now vs at fit start), ``/drift_prev`` (vs the previous
    call), ``/drift_reference`` (vs the same-named layer of ``reference``); model-level ``filters/frac_degenerate``
    (share of layers with sparsity > ``degenerate_sparsity`` or normalised entropy < ``degenerate_entropy``),
    ``filters/frac_near_random`` (layers whose ``drift_from_init`` is below ``near_random_ratio`` times their noise
    floor: their filter distribution cannot be told from the random initialisation's; both judged among layers
    with at least ``min_filters`` filters) and ``filters/depth_drift`` (D between the pooled filters
    of the first and last quarter of the layers). Degenerate and near-random layers are named in a warning.
    A PNG (``plot_path``) shows drift from init per layer over epochs, the latest per-layer entropy and sparsity
    and the layer-by-layer D matrix; ``table_path`` writes one CSV row per (epoch, layer). Both are written
    atomically under the run's directory. Statistics are computed on rank zero, under ``no_grad``, in float64 on
    the CPU; sharded strategies are refused.

    Args:
        every_n_epochs: compute after every N-th training epoch (and once at fit start, the initial state).
        layers: names or globs of the 3x3 convs to watch (default all; names relative to the LightningModule).
        include_depthwise: also watch depthwise 3x3 convs.
        sparsity_eps: relative threshold of the sparsity test (the paper's 1%).
        bins: histogram bins per principal component (the notebook's 70).
        reference: weights of a reference model (a state dict or Lightning checkpoint, relative to
            ``trainer.default_root_dir``) whose same-named layers give ``drift_reference``.
        degenerate_sparsity: sparsity above which a layer counts as degenerate.
        degenerate_entropy: normalised variance entropy below which a layer counts as degenerate.
        near_random_ratio: a layer whose drift from init is below this multiple of its noise floor counts as
            near-random. The floor (logged as ``<layer>/drift_floor``) is D between the two halves (even/odd rows)
            of the layer's initial filters, halved: the D that sampling alone gives for that many random filters.
            It falls with the filter count, so raw D is smaller in wide layers whether they learned or not (on
            ResNet-18 the last stage's floor is ~70x below the first stage's); compare layers through
            ``drift_from_init / drift_floor``, not through D.
        min_filters: layers with fewer filters are measured but not judged (degenerate / near-random; unless
            every layer is that small): with few filters the 70-bin histograms are mostly empty bins, so a tiny
            move gives a large D (a stem conv with one input channel has only ``c_out`` filters).
        log_per_layer: log the per-layer statistics (the model-level summaries are always logged).
        plot_path: PNG path relative to the run's directory; ``None`` disables.
        table_path: CSV path relative to the run's directory; ``None`` disables.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from lightning_ext.data.digits import DigitsDataModule
        >>> from lightning_ext.vision.image_classifier import ImageClassifier
        >>> diag = FilterDiagnostics(plot_path=None)
        >>> trainer = Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=[diag], logger=False,
        ...                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> model = ImageClassifier("resnet10t", image_size=8, stem_downsample=4)
        >>> trainer.fit(model, datamodule=DigitsDataModule())
        >>> rows = [r for r in diag.history if r["epoch"] == -1]
        >>> len(rows), all(r["sparsity"] == 0 for r in rows)  # at fit start: 11 layers of random filters
        (11, True)
    """

    def __init__(
        self,
        every_n_epochs: PositiveInt = 1,
        layers: Optional[list[str]] = None,
        include_depthwise: bool = False,
        sparsity_eps: OpenUnitInterval = 0.01,
        bins: PositiveInt = 70,
        reference: Optional[str] = None,
        degenerate_sparsity: ClosedUnitInterval = 0.1,
        degenerate_entropy: ClosedUnitInterval = 0.5,
        near_random_ratio: PositiveFloat = 2.0,
        min_filters: PositiveInt = 512,
        log_per_layer: bool = True,
        plot_path: Optional[str] = "filter_diagnostics.png",
        table_path: Optional[str] = None,
    ) -> None:
        check_positive_int("every_n_epochs", every_n_epochs)
        check_number("sparsity_eps", sparsity_eps, low=0, high=1, low_open=True, high_open=True)
        check_positive_int("bins", bins)
        check_positive_int("min_filters", min_filters)
        for name, value in (("degenerate_sparsity", degenerate_sparsity), ("degenerate_entropy", degenerate_entropy)):
            check_number(name, value, low=0, high=1)
        check_number("near_random_ratio", near_random_ratio, low=0, low_open=True)
        for name, value in (("reference", reference), ("plot_path", plot_path), ("table_path", table_path)):
            check_path_argument(name, value)
        if layers is not None and (isinstance(layers, str) or not all(isinstance(x, str) for x in layers)):
            raise ValueError(f"`layers` must be a list of conv names or globs, got {layers!r}.")
        self.every_n_epochs, self.layers, self.include_depthwise = every_n_epochs, layers, include_depthwise
        self.sparsity_eps, self.bins, self.reference = float(sparsity_eps), int(bins), reference
        self.degenerate_sparsity, self.degenerate_entropy = float(degenerate_sparsity), float(degenerate_entropy)
        self.near_random_ratio, self.log_per_layer = float(near_random_ratio), log_per_layer
        self.min_filters = int(min_filters)
        self.plot_path, self.table_path = plot_path, table_path
        self.names: list[str] = []
        self.pca: Optional[FilterPCA] = None
        self.init_hist: Optional[Tensor] = None
        self.prev_hist: Optional[Tensor] = None
        self.ref_hist: dict[str, Tensor] = {}
        self.history: list[dict[str, Any]] = []
        self.summaries: list[dict[str, Any]] = []
        self.layer_shift: Optional[Tensor] = None
        self.floor: Optional[Tensor] = None
        self._loaded: Optional[dict] = None

    # -- state --------------------------------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        """The PCA basis and ranges, the initial and previous histograms and the history so far."""
        if self.pca is None:
            return {}
        return {"names": list(self.names), "pca": self.pca.state_dict(), "init_hist": self.init_hist,
                "prev_hist": self.prev_hist, "ref_hist": dict(self.ref_hist), "history": list(self.history),
                "floor": self.floor,
                "summaries": list(self.summaries)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the saved state for ``on_fit_start`` (which then does not refit on the resumed weights)."""
        self._loaded = dict(state_dict) if state_dict else None

    # -- computation --------------------------------------------------------------------------------------------

    def _filters(self, pl_module: nn.Module) -> dict[str, Tensor]:
        with torch.no_grad():
            return {n: layer_filters(pl_module.get_submodule(n).weight) for n in self.names}

    def compute(self, pl_module: nn.Module, epoch: int) -> list[dict[str, Any]]:
        """Every statistic of every watched layer now; appends to ``history`` and returns this call's rows."""
        filters = self._filters(pl_module)
        peaks = {n: f.abs().amax(dim=1) for n, f in filters.items()}  # shared by sparsity and peak scaling
        hists = torch.stack([self.pca.histograms(filters[n], peaks[n]) for n in self.names])
        w = self.pca.explained_variance_ratio
        rows = []
        for i, n in enumerate(self.names):
            row = {"epoch": epoch, "layer": n, **filter_statistics(filters[n], self.sparsity_eps, peaks[n])}
            row["drift_from_init"] = distribution_shift(hists[i], self.init_hist[i], w)
            row["drift_prev"] = distribution_shift(hists[i], self.prev_hist[i], w)
            row["drift_floor"] = float(self.floor[i])
            if n in self.ref_hist:
                row["drift_reference"] = distribution_shift(hists[i], self.ref_hist[n], w)
            rows.append(row)
        self.layer_shift = pairwise_shift(hists, w)
        quarter = max(1, len(self.names) // 4)
        first, last = hists[:quarter], hists[-quarter:]
        counts = torch.tensor([float(len(filters[n])) for n in self.names], dtype=torch.float64)

        def pooled(h: Tensor, c: Tensor) -> Tensor:
            p = (h * c.view(-1, 1, 1)).sum(0) / c.sum()
            return p / p.sum(dim=1, keepdim=True)

        judged = [r for r in rows if r["n"] >= self.min_filters] or rows
        degenerate = [r["layer"] for r in judged if r["sparsity"] > self.degenerate_sparsity
                      or r["variance_entropy_norm"] < self.degenerate_entropy]
        near_random = [] if epoch < 0 else [r["layer"] for r in judged
                                            if r["drift_from_init"] < self.near_random_ratio * r["drift_floor"]]
        summary = {"epoch": epoch, "frac_degenerate": len(degenerate) / len(judged),
                   "frac_near_random": len(near_random) / len(judged),
                   "depth_drift": distribution_shift(pooled(first, counts[:quarter]), pooled(last, counts[-quarter:]), w),
                   "degenerate": degenerate, "near_random": near_random}
        self.prev_hist = hists
        self.history.extend(rows)
        self.summaries.append(summary)
        return rows

    # -- hooks --------------------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Refuse sharded strategies (the statistics need whole weights)."""
        refuse_sharded_strategy(trainer, "FilterDiagnostics", "reads every conv's whole weight")

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Select the layers; fit the PCA on the initial filters and record the initial state (or restore them)."""
        convs = conv3x3_layers(pl_module, self.layers, self.include_depthwise)
        if not convs:
            raise ValueError(f"FilterDiagnostics: {type(pl_module).__name__} has no 3x3 Conv2d layers to watch"
                             + (" (depthwise convs are skipped; set include_depthwise: true)." if
                                not self.include_depthwise else "."))
        self.names = list(convs)
        if self._loaded is not None:
            state, self._loaded = self._loaded, None
            if list(state["names"]) != self.names:
                raise ValueError("FilterDiagnostics: the checkpoint watched other layers than this model has; resume "
                                 "with the same architecture and `layers`.")
            self.pca = FilterPCA.from_state_dict(state["pca"])
            self.init_hist, self.prev_hist = state["init_hist"], state["prev_hist"]
            self.ref_hist, self.history = dict(state["ref_hist"]), list(state["history"])
            self.summaries, self.floor = list(state["summaries"]), state["floor"]
            return
        filters = self._filters(pl_module)
        self.pca = FilterPCA.fit(list(filters.values()), self.bins)
        self.init_hist = torch.stack([self.pca.histograms(filters[n]) for n in self.names])
        w = self.pca.explained_variance_ratio
        self.floor = torch.tensor([distribution_shift(self.pca.histograms(filters[n][0::2]),
                                                      self.pca.histograms(filters[n][1::2]), w) / 2
                                   for n in self.names], dtype=torch.float64)
        self.prev_hist, self.history, self.summaries = self.init_hist, [], []
        self.ref_hist = self._reference_histograms(trainer, pl_module)
        if trainer.is_global_zero:
            self.compute(pl_module, -1)

    def _reference_histograms(self, trainer: Trainer, pl_module: nn.Module) -> dict[str, Tensor]:
        if self.reference is None:
            return {}
        path = output_path(type("Root", (), {"log_dir": trainer.default_root_dir})(), self.reference)
        keys = [f"{n}.weight" for n in self.names]
        state = read_state_dict(str(path), reference_keys=keys, name="FilterDiagnostics reference")
        hists = {}
        for n in self.names:
            w = state.get(f"{n}.weight")
            if w is not None and w.shape == pl_module.get_submodule(n).weight.shape:
                hists[n] = self.pca.histograms(layer_filters(w))
        if not hists:
            raise ValueError(f"FilterDiagnostics: the reference {path} has no weight matching a watched layer "
                             f"({self.names[0]}.weight, ...); give weights of the same architecture.")
        return hists

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Every ``every_n_epochs``: compute, log, warn, plot."""
        if (trainer.current_epoch + 1) % self.every_n_epochs or trainer.sanity_checking:
            return
        if not trainer.is_global_zero:
            return
        rows = self.compute(pl_module, trainer.current_epoch)
        summary = self.summaries[-1]
        metrics = {f"filters/{k}": float(summary[k]) for k in ("frac_degenerate", "frac_near_random", "depth_drift")}
        if self.log_per_layer:
            for r in rows:
                for k in ("sparsity", "variance_entropy", "variance_entropy_norm", "drift_from_init", "drift_prev",
                          "drift_floor", "drift_reference"):
                    if k in r:
                        metrics[f"filters/{r['layer']}/{k}"] = float(r[k])
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, rank_zero_only=True)
        if summary["degenerate"]:
            rank_zero_warn(f"FilterDiagnostics (epoch {trainer.current_epoch}): degenerate filters (sparsity > "
                           f"{self.degenerate_sparsity} or normalised variance entropy < {self.degenerate_entropy}) "
                           f"in {', '.join(summary['degenerate'])}.")
        if summary["near_random"]:
            rank_zero_warn(f"FilterDiagnostics (epoch {trainer.current_epoch}): {', '.join(summary['near_random'])} "
                           f"cannot be told from their random initialisation (drift from init < {self.near_random_ratio}"
                           " x the layer's noise floor).")
        self._write(trainer)

    def _write(self, trainer: Trainer) -> None:
        table = output_path(trainer, self.table_path)
        if table is not None:
            keys = ["epoch", "layer", "n", "sparsity", "variance_entropy", "variance_entropy_norm",
                    "variance_entropy_clean", "drift_from_init", "drift_prev", "drift_floor", "drift_reference"]
            lines = [",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys) for r in self.history]
            atomic_write_text("\n".join(lines) + "\n", table)
        plot = output_path(trainer, self.plot_path)
        if plot is not None:
            plot_filter_diagnostics(self.history, self.layer_shift, self.names, plot)


def plot_filter_diagnostics(history: list[dict[str, Any]], layer_shift: Optional[Tensor], names: list[str],
                            path: Union[str, Any]) -> None:
    """Four panels: drift from init per layer over epochs, the latest normalised variance entropy and sparsity per
    layer, and the layer-by-layer shift matrix; written atomically as a PNG."""
    from lightning_ext.core.plotting import new_figure, save_figure

    fig, axes = new_figure(2, 2, figsize=(11, 8))
    epochs = sorted({r["epoch"] for r in history})
    cmap = [f"C{i % 10}" for i in range(len(names))]
    for i, n in enumerate(names):
        pts = [(r["epoch"] + 1, r["drift_from_init"]) for r in history if r["layer"] == n]
        axes[0, 0].plot(*zip(*pts), marker=".", color=cmap[i], label=n if len(names) <= 20 else None)
    axes[0, 0].set_xlabel("epoch (0 = initialisation)"), axes[0, 0].set_ylabel("drift from init D")
    axes[0, 0].set_yscale("symlog", linthresh=1e-4), axes[0, 0].grid(alpha=0.3)
    if len(names) <= 20:
        axes[0, 0].legend(fontsize=6, ncol=2)
    last = [r for r in history if r["epoch"] == epochs[-1]]
    xs = range(len(last))
    axes[0, 1].bar(xs, [r["variance_entropy_norm"] for r in last], color=cmap[: len(last)])
    axes[0, 1].axhline(1.0, color="k", lw=0.8, ls="--")
    axes[0, 1].set_ylabel("variance entropy / f(n)"), axes[0, 1].set_title(f"epoch {epochs[-1] + 1}")
    axes[1, 0].bar(xs, [r["sparsity"] for r in last], color=cmap[: len(last)])
    axes[1, 0].set_ylabel("sparsity")
    for ax in (axes[0, 1], axes[1, 0]):
        ax.set_xticks(list(xs), [r["layer"] for r in last], rotation=90, fontsize=6)
    if layer_shift is not None:
        im = axes[1, 1].imshow(layer_shift.numpy(), cmap="viridis")
        fig.colorbar(im, ax=axes[1, 1])
        axes[1, 1].set_title("D between layers")
        axes[1, 1].set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        axes[1, 1].set_yticks(range(len(names)), names, fontsize=6)
    save_figure(fig, path, dpi=100)
