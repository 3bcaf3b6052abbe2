"""Z-GCNETs: a time-aware graph-convolutional GRU whose every graph layer is gated by a zigzag persistence image.

Chen, Segovia-Dominguez & Gel, "Z-GCNETs: Time Zigzags at Graph Convolutional Networks for Time Series
Forecasting", ICML 2021, arXiv 2105.04100; reference code https://github.com/Z-GCNETs/Z-GCNETs (``model/ZGCN.py``
``TFLSGCNCNN``, ``model/ZGCNCELL.py``, ``model/ZGCNETs.py``, ``model/DNN.py``).

One graph layer of output width ``C`` on the step input ``x_t (B, N, C_in)``, the layer's input window
``X (B, W, N, C_w)``, learnable node embeddings ``E (N, e)`` and the image's feature ``ξ = CNN(ZPI) (B, C/2)``:

- adaptive graph ``S = softmax(ReLU(E Eᵀ))``, supports ``{I, S, S², ...}`` (``link_len`` of them);
- spatial ``X_G = Σ_k S_k x_t W_{n,k}`` with node-adaptive weights ``W_{n,k} = Σ_d E_{n,d} W_pool[d, k]``;
- temporal ``X_W = Σ_τ T_τ X[τ] W'_n`` with ``W'_n = E_n W'_pool`` and learnable ``T ∈ R^W``;
- output ``[X_G ⊙ ξ ‖ X_W ⊙ ξ] + E_n b_pool``.

A GRU cell uses two such layers: ``[z, r] = σ(Θ_g([x_t ‖ h]))``, ``ĥ = tanh(Θ_u([x_t ‖ z ⊙ h]))``,
``h' = r ⊙ h + (1 - r) ⊙ ĥ``; ``num_layers`` cells are stacked over the window and a ``Conv2d(1, H·D_out,
(1, hidden))`` maps the last hidden state to the ``horizon`` steps. With ``use_zpi=False`` the image branch is
removed (``ξ ≡ 1``): the "no topology" baseline, an AGCRN-like cell with the time-aware branch.

Differences from the reference, on purpose: the window width of each layer is passed explicitly (the reference
guesses it with ``(dim_in - 1) % 16 == 0``); the image CNN ends with a global max pool, so any ``resolution >= 31``
works (identical to the reference's ``MaxPool2d(5)`` at 100); the reference's revert-to-best-weights after every
epoch is not reproduced (use ``ModelCheckpoint``/``EarlyStopping``). Kept: parameters with ``dim <= 1`` (biases,
``T``) start from U(0, 1), the others Xavier-uniform (``Run_PEMS_model.py``); the loss is L1 on de-normalised
values (``real_value=True``); MAPE ignores true values ``<= 0``.

Example:
    >>> import torch
    >>> net = ZGCNNet(num_nodes=5, window_len=4, horizon=2, rnn_units=8, embed_dim=3, resolution=32)
    >>> net(torch.randn(2, 4, 5, 1), torch.rand(2, 1, 32, 32)).shape
    torch.Size([2, 2, 5, 1])
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from typing_extensions import override

from lightning_ext.core.guards import NonFiniteLoss, check_loss, check_nonfinite_policy, refuse_skip_under_ddp
from lightning_ext.core.validation import (
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    check_non_negative,
    check_number,
    check_positive,
    check_positive_int,
)


class ZPIEncoder(nn.Module):
    """The reference's CNN on a ``(B, 1, p, p)`` image -> ``(B, dim_out)``: Conv(1->8, k3, s2)-ReLU-MaxPool(3, s2)-
    Conv(8->dim_out, k3, s2)-ReLU-MaxPool(3, s2)-global max pool."""

    def __init__(self, dim_out: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.ReLU(), nn.MaxPool2d(3, 2),
                                      nn.Conv2d(8, dim_out, 3, stride=2), nn.ReLU(), nn.MaxPool2d(3, 2))

    @override
    def forward(self, zpi: torch.Tensor) -> torch.Tensor:
        """The image feature ``ξ``."""
        return torch.amax(self.features(zpi), dim=(2, 3))


class TimeAwareGraphConv(nn.Module):
    """One Z-GCNETs graph layer (``TFLSGCNCNN``): adaptive spatial convolution of ``x_t`` and a learned temporal
    weighting of the layer's input window, both scaled by the image feature ``ξ``."""

    def __init__(self, dim_in: int, dim_out: int, window_dim: int, window_len: int, link_len: int, embed_dim: int,
                 use_zpi: bool = True) -> None:
        super().__init__()
        if dim_out % 2:
            raise ValueError(f"dim_out must be even (got {dim_out}); it is split between the graph and window halves.")
        half = dim_out // 2
        self.link_len = link_len
        self.weights_pool = nn.Parameter(torch.empty(embed_dim, link_len, dim_in, half))
        self.weights_window = nn.Parameter(torch.empty(embed_dim, window_dim, half))
        self.bias_pool = nn.Parameter(torch.empty(embed_dim, dim_out))
        self.T = nn.Parameter(torch.empty(window_len))
        self.cnn = ZPIEncoder(half) if use_zpi else None

    def prepare(self, x_window: torch.Tensor, emb: torch.Tensor, zpi: Optional[torch.Tensor]) -> dict:
        """What does not change over the window's steps: supports, node weights, bias, ``ξ`` and the whole window
        branch ``X_W ⊙ ξ`` (it depends on the layer's input window, not on the step); computed once per forward
        (the reference recomputes them at every step: same values, ~4x the time)."""
        s = F.softmax(F.relu(emb @ emb.t()), dim=1)
        supports = [s]  # S, S², ... (the identity support is applied as x itself)
        for _ in range(2, self.link_len):
            supports.append(s @ supports[-1])
        w_window = torch.einsum("nd,dio->nio", emb, self.weights_window)
        x_w = torch.einsum("btni,nio->btno", x_window, w_window)
        x_wconv = torch.einsum("btno,t->bno", x_w, self.T)
        xi = self.cnn(zpi)[:, None, :] if self.cnn is not None else None
        return {"supports": torch.stack(supports), "bias": emb @ self.bias_pool,
                "weights": torch.einsum("nd,dkio->nkio", emb, self.weights_pool), "xi": xi,
                "x_wconv": x_wconv * xi if xi is not None else x_wconv}

    @override
    def forward(self, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        """``(B, N, dim_out)`` from the step input ``x (B, N, dim_in)`` and the window's :meth:`prepare` context."""
        x_g = torch.cat([x, *(torch.matmul(s, x) for s in ctx["supports"])], dim=-1)  # (B, N, K*dim_in)
        w = ctx["weights"]
        x_gconv = torch.bmm(x_g.transpose(0, 1), w.reshape(w.shape[0], -1, w.shape[-1])).transpose(0, 1)
        if ctx["xi"] is not None:
            x_gconv = x_gconv * ctx["xi"]
        return torch.cat([x_gconv, ctx["x_wconv"]], dim=-1) + ctx["bias"]


class ZGCNCell(nn.Module):
    """The GRU cell of Z-GCNETs with :class:`TimeAwareGraphConv` gates."""

    def __init__(self, dim_in: int, hidden: int, window_dim: int, window_len: int, link_len: int, embed_dim: int,
                 use_zpi: bool = True) -> None:
        super().__init__()
        self.hidden = hidden
        self.gate = TimeAwareGraphConv(dim_in + hidden, 2 * hidden, window_dim, window_len, link_len, embed_dim,
                                       use_zpi)
        self.update = TimeAwareGraphConv(dim_in + hidden, hidden, window_dim, window_len, link_len, embed_dim,
                                         use_zpi)

    def prepare(self, x_window: torch.Tensor, emb: torch.Tensor, zpi: Optional[torch.Tensor]) -> tuple[dict, dict]:
        """The gate's and the update's per-window contexts (:meth:`TimeAwareGraphConv.prepare`)."""
        return self.gate.prepare(x_window, emb, zpi), self.update.prepare(x_window, emb, zpi)

    @override
    def forward(self, x: torch.Tensor, h: torch.Tensor, ctx: tuple[dict, dict]) -> torch.Tensor:
        """The next hidden state ``(B, N, hidden)``."""
        z_r = torch.sigmoid(self.gate(torch.cat([x, h], -1), ctx[0]))
        z, r = z_r.split(self.hidden, dim=-1)
        h_cand = torch.tanh(self.update(torch.cat([x, z * h], -1), ctx[1]))
        return r * h + (1 - r) * h_cand


class ZGCNNet(nn.Module):
    """Z-GCNETs' network: stacked :class:`ZGCNCell` over the window, a convolutional head to ``horizon`` steps.

    ``forward(x (B, W, N, input_dim), zpi (B, 1, p, p) or None) -> (B, horizon, N, output_dim)``.
    """

    def __init__(self, num_nodes: int, input_dim: int = 1, output_dim: int = 1, embed_dim: int = 10,
                 rnn_units: int = 64, num_layers: int = 2, link_len: int = 2, window_len: int = 12,
                 horizon: int = 12, use_zpi: bool = True, resolution: int = 100) -> None:
        super().__init__()
        self.num_nodes, self.input_dim, self.output_dim = num_nodes, input_dim, output_dim
        self.horizon, self.window_len, self.use_zpi, self.resolution = horizon, window_len, use_zpi, resolution
        self.node_embeddings = nn.Parameter(torch.empty(num_nodes, embed_dim))
        self.cells = nn.ModuleList(
            ZGCNCell(input_dim if i == 0 else rnn_units, rnn_units, input_dim if i == 0 else rnn_units, window_len,
                     link_len, embed_dim, use_zpi) for i in range(num_layers))
        self.end_conv = nn.Conv2d(1, horizon * output_dim, kernel_size=(1, rnn_units))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference's initialisation: ``dim <= 1`` parameters U(0, 1), the others Xavier-uniform."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
            else:
                nn.init.uniform_(p)

    @override
    def forward(self, x: torch.Tensor, zpi: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Forecast ``(B, horizon, N, output_dim)`` from the normalised window ``x (B, W, N, input_dim)``."""
        if x.dim() != 4 or x.shape[1:] != (self.window_len, self.num_nodes, self.input_dim):
            raise ValueError(f"x must be (B, {self.window_len}, {self.num_nodes}, {self.input_dim}); got "
                             f"{tuple(x.shape)}.")
        if self.use_zpi and (zpi is None or zpi.dim() != 4 or zpi.shape[1:] != (1, self.resolution, self.resolution)):
            got = None if zpi is None else tuple(zpi.shape)
            raise ValueError(f"zpi must be (B, 1, {self.resolution}, {self.resolution}) for a model with use_zpi=True; "
                             f"got {got} (use zpi_mode 'real' or 'shuffled' in the data, or use_zpi=False).")
        b = x.shape[0]
        inputs = x
        for cell in self.cells:
            h = x.new_zeros(b, self.num_nodes, cell.hidden)
            ctx = cell.prepare(inputs, self.node_embeddings, zpi)
            states = []
            for t in range(self.window_len):
                h = cell(inputs[:, t], h, ctx)
                states.append(h)
            inputs = torch.stack(states, dim=1)
        out = self.end_conv(inputs[:, -1:])  # (B, H*D, N, 1)
        out = out.squeeze(-1).reshape(b, self.horizon, self.output_dim, self.num_nodes)
        return out.permute(0, 1, 3, 2)


def forecast_metrics(pred: torch.Tensor, true: torch.Tensor) -> dict[str, torch.Tensor]:
    """MAE, RMSE and MAPE (in %, over true values ``> 0``; NaN when there are none) of real-unit forecasts."""
    err = pred - true
    mask = true > 0
    mape = (err[mask].abs() / true[mask]).mean() * 100 if mask.any() else pred.new_tensor(float("nan"))
    return {"mae": err.abs().mean(), "rmse": err.pow(2).mean().sqrt(), "mape": mape}


class ZGCNETs(LightningModule):
    """Z-GCNETs graph time-series forecaster (ICML 2021), with the zigzag persistence image channel optional.

    Paper: https://arxiv.org/abs/2105.04100 ; reference code: https://github.com/Z-GCNETs/Z-GCNETs . Batches are
    dicts ``{"x": (B, W, N, D) normalised, "y": (B, H, N, D) real units, "zpi": (B, 1, p, p)}`` as yielded by
    :class:`~lightning_ext.graph.graph_time_series.GraphTimeSeriesDataModule`, which hands its training-part
    scaler to the module in ``setup`` (kept as buffers ``scale_mean``/``scale_std``, so checkpoints carry it).
    The loss is L1 (``loss="mae"``, the reference) or MSE on de-normalised forecasts; logs ``train_loss``,
    ``val_mae``/``val_rmse``/``val_mape`` and on test also per-horizon ``test_mae_h{k}``. Defaults are the
    reference's PeMS configuration (embed 10, 64 units, 2 layers, link_len 2, Adam lr 0.003, eps 1e-8).

    Equation and design: see the module docstring (:mod:`lightning_ext.graph.zgcnets`).

    Args:
        num_nodes: nodes ``N`` of the series (100 for the token networks).
        input_dim: channels ``D`` of the input series.
        output_dim: channels forecast.
        embed_dim: node embedding width ``e``.
        rnn_units: hidden width of each GRU cell (even).
        num_layers: stacked cells.
        link_len: supports ``{I, S, S², ...}`` of the adaptive graph (>= 2).
        window_len: input window ``W`` (the data's ``lag``).
        horizon: forecast steps ``H``.
        use_zpi: with the image channel (``False``: the no-topology baseline; the data must then have
            ``zpi_mode="none"``, and the other way round).
        resolution: the image side ``p`` (>= 31).
        lr: Adam learning rate.
        weight_decay: Adam weight decay (the reference: 0).
        loss: ``"mae"`` (L1, the reference) or ``"mse"``, on de-normalised values.
        nonfinite_loss: on a non-finite training loss, ``"error"``, ``"skip"`` the step or ``"warn"``.

    Example:
        >>> import torch
        >>> model = ZGCNETs(num_nodes=5, window_len=4, horizon=2, rnn_units=8, resolution=32)
        >>> batch = {"x": torch.randn(3, 4, 5, 1), "y": torch.rand(3, 2, 5, 1), "zpi": torch.rand(3, 1, 32, 32)}
        >>> model(batch["x"], batch["zpi"]).shape
        torch.Size([3, 2, 5, 1])
    """

    def __init__(self, num_nodes: PositiveInt = 100, input_dim: PositiveInt = 1, output_dim: PositiveInt = 1,
                 embed_dim: PositiveInt = 10, rnn_units: PositiveInt = 64, num_layers: PositiveInt = 2,
                 link_len: PositiveInt = 2, window_len: PositiveInt = 12, horizon: PositiveInt = 12,
                 use_zpi: bool = True, resolution: PositiveInt = 100, lr: PositiveFloat = 0.003,
                 weight_decay: NonNegativeFloat = 0.0, loss: Literal["mae", "mse"] = "mae",
                 nonfinite_loss: NonFiniteLoss = "error") -> None:
        super().__init__()
        for name, value in (("num_nodes", num_nodes), ("input_dim", input_dim), ("output_dim", output_dim),
                            ("embed_dim", embed_dim), ("num_layers", num_layers), ("window_len", window_len),
                            ("horizon", horizon)):
            check_positive_int(name, value)
        check_number("rnn_units", rnn_units, low=2, integer=True)
        if rnn_units % 2:
            raise ValueError(f"rnn_units must be even (got {rnn_units}); each layer splits it into two halves.")
        check_number("link_len", link_len, low=2, integer=True)
        check_number("resolution", resolution, low=31, integer=True)
        if not isinstance(use_zpi, bool):
            raise ValueError(f"use_zpi must be true or false (got {use_zpi!r}).")
        check_positive("lr", lr)
        check_non_negative("weight_decay", weight_decay)
        if loss not in ("mae", "mse"):
            raise ValueError(f"loss must be 'mae' or 'mse' (got {loss!r}).")
        check_nonfinite_policy(nonfinite_loss)
        self.save_hyperparameters()
        self.net = ZGCNNet(num_nodes, input_dim, output_dim, embed_dim, rnn_units, num_layers, link_len,
                           window_len, horizon, use_zpi, resolution)
        self.register_buffer("scale_mean", torch.zeros(()))
        self.register_buffer("scale_std", torch.ones(()))
        self.skipped_steps = 0

    @override
    def setup(self, stage: str) -> None:
        """Refuse ``nonfinite_loss='skip'`` under DDP; check the data's shape and channel; take its scaler."""
        refuse_skip_under_ddp(self, self.hparams.nonfinite_loss)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            return
        for attr, want in (("num_nodes", "num_nodes"), ("lag", "window_len"), ("horizon", "horizon"),
                           ("num_channels", "input_dim")):
            have = getattr(dm, attr, None)
            if have is not None and have != self.hparams[want]:
                raise ValueError(f"The model has {want}={self.hparams[want]} but the data has {attr}={have}; set "
                                 f"`model.init_args.{want}: {have}`.")
        mode = getattr(dm, "zpi_mode", None)
        if mode is not None and (mode != "none") != self.hparams.use_zpi:
            raise ValueError(f"The data has zpi_mode={mode!r} but the model has use_zpi={self.hparams.use_zpi}; "
                             f"set `model.init_args.use_zpi: {str(mode != 'none').lower()}`.")
        res = getattr(dm, "resolution", None)
        if self.hparams.use_zpi and res is not None and res != self.hparams.resolution:
            raise ValueError(f"The model has resolution={self.hparams.resolution} but the data's images are "
                             f"{res}x{res}; set `model.init_args.resolution: {res}`.")
        scaler = getattr(dm, "scaler", None)
        if scaler is not None:
            self.scale_mean.fill_(float(scaler[0]))
            self.scale_std.fill_(float(scaler[1]))

    @override
    def forward(self, x: torch.Tensor, zpi: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Real-unit forecast ``(B, horizon, N, output_dim)`` of a normalised window."""
        return self.net(x, zpi) * self.scale_std + self.scale_mean

    def _pred(self, batch: dict[str, Any]) -> torch.Tensor:
        return self(batch["x"], batch.get("zpi"))

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Optional[torch.Tensor]:
        """L1 (or MSE) of the de-normalised forecast."""
        pred = self._pred(batch)
        if self.hparams.loss == "mae":
            loss = F.l1_loss(pred, batch["y"])
        else:
            loss = F.mse_loss(pred, batch["y"])
        if not check_loss(self, loss, self.hparams.nonfinite_loss, batch):
            self.skipped_steps += 1
            return None
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=pred.shape[0])
        return loss

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        pred = self._pred(batch)
        n = pred.shape[0]
        for name, value in forecast_metrics(pred, batch["y"]).items():
            if not torch.isnan(value):
                self.log(f"{stage}_{name}", value, on_epoch=True, batch_size=n, prog_bar=name == "mae")
        if stage == "test":
            for k in range(pred.shape[1]):
                self.log(f"test_mae_h{k + 1}", (pred[:, k] - batch["y"][:, k]).abs().mean(), batch_size=n)

    @override
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """``val_mae``, ``val_rmse``, ``val_mape`` in real units."""
        self._evaluate(batch, "val")

    @override
    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Test metrics, also per horizon step."""
        self._evaluate(batch, "test")

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam (eps 1e-8) with the module's learning rate and weight decay."""
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, eps=1e-8,
                                weight_decay=self.hparams.weight_decay)
