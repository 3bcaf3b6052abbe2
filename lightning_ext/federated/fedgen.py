"""FedGen (Zhu, Hong, Zhou, ICML 2021): data-free knowledge distillation with a server-side generator.

Paper: "Data-Free Knowledge Distillation for Heterogeneous Federated Learning", Zhuangdi Zhu, Junyuan Hong and
Jiayu Zhou, ICML 2021, arXiv 2105.10056. Reference code: https://github.com/zhuangdizhu/FedGen
(``FLAlgorithms/servers/serverpFedGen.py``, ``FLAlgorithms/users/userpFedGen.py``,
``FLAlgorithms/trainmodel/generator.py``); the defaults below are its ``'mnist'`` configuration.

The server learns a label-conditional generator ``G(eps, y)`` of the *latent* input of the clients' last layer
(their "heads" ``h_k``) from the heads alone, with no data. After the clients trained, with ``w_{y,k} = n_{k,y} /
sum_k' n_{k',y}`` (label counts of the batches client ``k`` drew this round, each initialised to 1)::

    L_G = teacher_weight * sum_k mean_i [ w_{y_i,k} CE(h_k(G(eps_i, y_i)), y_i) ] + diversity_weight * L_div
    L_div = exp(- mean_{i,j} [ mean_l |G_i - G_j|_l * mean_l (eps_i - eps_j)_l^2 ])

(``eps ~ U[0, 1)^d``, labels ``y`` drawn from those some client holds more than once), then FedAvg. Each client
``k`` then trains with the received, frozen generator (from round 2; ``alpha_t = beta_t = max(1e-4, 10 * 0.98^(t-1))``
in round ``t``)::

    L_k = CE(f(x), y) + (B_g / B) alpha_t CE(h(G(eps, y_hat)), y_hat)
          + beta_t KL(softmax(h(G(eps, y))) || softmax(f(x)))

with ``y_hat`` uniform over the labels the server reports, ``B_g`` the generated batch size and the KL target
detached (``nn.KLDivLoss(reduction="batchmean")`` of the log-probabilities).

On Flower: :func:`fedgen_fedavg` is a ``FedAvg`` whose ``configure_train`` sends the generator (bytes) and the
round's ``alpha_t``/``beta_t`` in the config and whose ``aggregate_train`` reads each reply's head and label counts,
trains the generator, then averages. :class:`FedGenClient` is a :class:`~lightning_ext.federated.client.LightningClient`
that adds :class:`FedGenRegularizer` (a callback that adds the two terms to the user's loss) each round and replies
its label counts. The counts disclose each client's label distribution to the server, as in the paper.

Example:
    >>> import torch
    >>> g = FedGenGenerator(num_classes=10)
    >>> sum(p.numel() for p in g.parameters())  # the reference 'mnist' generator
    19744
    >>> z, eps = g(torch.tensor([0, 1, 2, 3]))
    >>> z.shape, eps.shape
    (torch.Size([4, 32]), torch.Size([4, 32]))
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from typing_extensions import override

from lightning_ext.core.step_wrapper import loss_of, unwrap_training_step, with_loss, wrap_training_step
from lightning_ext.core.validation import check_number, check_positive_int
from lightning_ext.federated.client import LightningClient

#: the keys of FedGen's entries in a round's train ConfigRecord and in a reply's MetricRecord
CONFIG_GENERATOR, CONFIG_DIMS, CONFIG_LABELS = "fedgen-generator", "fedgen-dims", "fedgen-labels"
CONFIG_ALPHA, CONFIG_BETA, METRIC_COUNTS = "fedgen-alpha", "fedgen-beta", "fedgen-label-counts"


class FedGenCNN(nn.Module):
    """FedGen's 'mnist' classifier: two stride-2 conv-BN-ReLU blocks, ``encode_fc1`` (784 -> 32), ``decode_fc2`` (head).

    No activation between the two linear layers, as in the reference ``models.py`` (config
    ``([6, 16, 'F'], 1, 10, 784, 32)``); the head ``decode_fc2`` is what the server distils into.

    Args:
        in_chans: input channels.
        num_classes: outputs of the head.
        image_size: input side (28 for MNIST: 16 x 7 x 7 = 784 features).
        latent_dim: width of the head's input.

    Example:
        >>> FedGenCNN()(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_chans: int = 1, num_classes: int = 10, image_size: int = 28, latent_dim: int = 32) -> None:
        super().__init__()
        for name, value in (("in_chans", in_chans), ("num_classes", num_classes), ("image_size", image_size),
                            ("latent_dim", latent_dim)):
            check_positive_int(name, value)
        side = (((image_size + 1) // 2) + 1) // 2
        self.features = nn.Sequential(nn.Conv2d(in_chans, 6, 3, 2, 1), nn.BatchNorm2d(6), nn.ReLU(),
                                      nn.Conv2d(6, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten())
        self.encode_fc1 = nn.Linear(16 * side * side, latent_dim)
        self.decode_fc2 = nn.Linear(latent_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits."""
        return self.decode_fc2(self.encode_fc1(self.features(x)))


class FedGenGenerator(nn.Module):
    """FedGen's label-conditional generator of the head's input: ``[eps || onehot(y)] -> FC-BN-ReLU -> FC``.

    ``eps`` is uniform on ``[0, 1)`` (the reference code's ``torch.rand``). The 'mnist' sizes (noise 32, hidden 256,
    latent 32) give 19,744 parameters.

    Args:
        num_classes: number of labels.
        noise_dim: width of ``eps``.
        hidden_dim: hidden width.
        latent_dim: output width (the head's input width).
    """

    def __init__(self, num_classes: int = 10, noise_dim: int = 32, hidden_dim: int = 256, latent_dim: int = 32) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("noise_dim", noise_dim), ("hidden_dim", hidden_dim),
                            ("latent_dim", latent_dim)):
            check_positive_int(name, value)
        self.num_classes, self.noise_dim = num_classes, noise_dim
        self.fc = nn.Sequential(nn.Linear(noise_dim + num_classes, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU())
        self.out = nn.Linear(hidden_dim, latent_dim)

    def dims(self) -> list[int]:
        """``[num_classes, noise_dim, hidden_dim, latent_dim]`` (what a client needs to rebuild it)."""
        return [self.num_classes, self.noise_dim, self.fc[0].out_features, self.out.out_features]

    def forward(self, labels: torch.Tensor, eps: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(G(eps, y), eps)``; ``eps`` is drawn uniform when not given."""
        if eps is None:
            eps = torch.rand(len(labels), self.noise_dim, generator=generator)
        onehot = F.one_hot(labels.long(), self.num_classes).to(eps.dtype)
        return self.out(self.fc(torch.cat([eps, onehot], dim=1))), eps


def diversity_loss(eps: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``exp(-mean_{i,j}[mean_l |z_i - z_j| * mean_l (eps_i - eps_j)^2])``: small when distinct noises give distinct
    outputs (the reference ``DiversityLoss``: L1 between outputs, squared L2 between noises)."""
    z = z.reshape(len(z), -1)
    z_dist = (z[None, :, :] - z[:, None, :]).abs().mean(dim=2)
    eps_dist = (eps[None, :, :] - eps[:, None, :]).pow(2).mean(dim=2)
    return torch.exp(-(eps_dist * z_dist).mean())


def label_weights(counts: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """From ``counts[k, y]`` (clients x labels): ``w[y, k] = n_{k,y} / sum_k n_{k,y}`` and the qualified labels.

    A label qualifies when some client counted it more than once (counts start at 1, so it was seen).
    """
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if counts.ndim != 2 or bool((counts <= 0).any()):
        raise ValueError("label counts must be a (clients x labels) table of positive numbers (they start at 1).")
    weights = (counts / counts.sum(dim=0, keepdim=True)).T
    qualified = [int(y) for y in torch.nonzero(counts.max(dim=0).values > 1).flatten()]
    return weights.float(), qualified


def generator_loss(z: torch.Tensor, eps: torch.Tensor, y: torch.Tensor, heads: Sequence[tuple[torch.Tensor, Any]],
                   weights: torch.Tensor, teacher_weight: float = 1.0,
                   diversity_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(L_G, teacher term, L_div)`` for generated ``z = G(eps, y)``, heads ``(W_k, b_k)`` and ``weights[y, k]``."""
    teacher = z.new_zeros(())
    for k, (w, b) in enumerate(heads):
        ce = F.cross_entropy(F.linear(z, w, b), y, reduction="none")
        teacher = teacher + (ce * weights[y, k].to(z.dtype)).mean()
    div = diversity_loss(eps, z)
    return teacher_weight * teacher + diversity_weight * div, teacher, div


def fedgen_regularizer(logits: torch.Tensor, y: torch.Tensor, head: nn.Module, generator: FedGenGenerator,
                       sampled_y: torch.Tensor, alpha: float, beta: float,
                       generator_rng: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The client's two extra terms ``((B_g/B) alpha CE(h(G(eps, y_hat)), y_hat), beta KL(p_G(y) || p_f(x)))``.

    ``logits = f(x)`` of the real batch with labels ``y``; ``sampled_y`` the generated labels ``y_hat`` (its
    length is ``B_g``). The generator is frozen (evaluated under ``no_grad`` in eval mode); gradients reach
    ``head`` through both terms' heads and the model through ``logits``.
    """
    was_training = generator.training
    generator.eval()
    with torch.no_grad():
        z_real, _ = generator(y, generator=generator_rng)
        z_hat, _ = generator(sampled_y, generator=generator_rng)
    generator.train(was_training)
    target = F.softmax(head(z_real), dim=1).detach()
    latent = beta * F.kl_div(F.log_softmax(logits, dim=1), target, reduction="batchmean")
    teacher = (len(sampled_y) / len(y)) * alpha * F.cross_entropy(head(z_hat), sampled_y)
    return teacher, latent


def _resolve_head(module: nn.Module, head: str) -> nn.Linear:
    try:
        layer = module.get_submodule(head)
    except AttributeError:
        names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(f"head={head!r} is not a submodule of {type(module).__name__}; its Linear layers are "
                         f"{names[-4:]}.") from None
    if not isinstance(layer, nn.Linear):
        raise ValueError(f"head={head!r} is a {type(layer).__name__}; FedGen's head must be the model's last "
                         "nn.Linear.")
    return layer


class FedGenRegularizer(Callback):
    """Client side of FedGen: adds the generator's two terms to the user's training loss and counts the labels seen.

    Wraps the module's ``training_step`` (``core.step_wrapper``); the logits of the real batch are read by a forward
    hook on ``head`` during the user's own step, so no second forward pass runs. Batches must be ``(x, y, ...)``.
    With ``alpha = beta = 0`` (FedGen's first round) it only counts labels.

    Args:
        head: name of the model's last ``nn.Linear`` (e.g. ``"net.decode_fc2"``).
        generator: the server's generator (frozen here).
        labels: labels ``y_hat`` is drawn from (uniformly).
        alpha: weight of the generated-sample cross-entropy.
        beta: weight of the KL to the generator's prediction for the real labels.
        generated_batch_size: ``B_g``.
        num_classes: length of the label-count vector.
    """

    def __init__(self, head: str, generator: Optional[FedGenGenerator], labels: Sequence[int], alpha: float = 0.0,
                 beta: float = 0.0, generated_batch_size: int = 32, num_classes: int = 10) -> None:
        check_number("alpha", alpha, low=0)
        check_number("beta", beta, low=0)
        check_positive_int("generated_batch_size", generated_batch_size)
        check_positive_int("num_classes", num_classes)
        if (alpha > 0 or beta > 0) and (generator is None or not list(labels)):
            raise ValueError("FedGenRegularizer with alpha or beta > 0 needs a generator and a non-empty label list.")
        self.head, self.generator, self.labels = head, generator, torch.as_tensor(list(labels), dtype=torch.long)
        self.alpha, self.beta, self.generated_batch_size = float(alpha), float(beta), generated_batch_size
        self.counts = torch.ones(num_classes, dtype=torch.long)  # the reference code starts every count at 1
        self._hook, self._logits, self._capture = None, None, False
        self.last_terms: tuple[float, float] = (0.0, 0.0)

    def _store(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        if self._capture:
            self._logits = output

    def _around(self, step, args, kwargs):
        pl_module = self._module
        batch = args[0] if args else kwargs["batch"]
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError("FedGenRegularizer needs (x, y) batches to count labels and distil.")
        y = batch[1]
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= len(self.counts)):
            raise ValueError(f"labels must lie in [0, {len(self.counts)}); got {int(y.min())}..{int(y.max())}.")
        self.counts += torch.bincount(y.detach().cpu().long(), minlength=len(self.counts))
        self._capture, self._logits = True, None
        try:
            out = step(*args, **kwargs)
        finally:
            self._capture = False
        loss = loss_of(out, pl_module, "FedGenRegularizer")
        if loss is None or (self.alpha == 0 and self.beta == 0):
            return out
        if self._logits is None:
            raise RuntimeError(f"head {self.head!r} was not called in training_step; name the layer producing the "
                               "logits.")
        sampled = self.labels[torch.randint(len(self.labels), (self.generated_batch_size,))].to(y.device)
        teacher, latent = fedgen_regularizer(self._logits, y, self._head_module, self.generator.to(y.device), sampled,
                                             self.alpha, self.beta)
        self.last_terms = (float(teacher), float(latent))
        return with_loss(out, loss + teacher + latent)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Find the head, hook it and wrap ``training_step``."""
        if stage != "fit":
            return
        self._module, self._head_module = pl_module, _resolve_head(pl_module, self.head)
        self._hook = self._head_module.register_forward_hook(self._store)
        wrap_training_step(pl_module, self, self._around,
                           drop_stale=lambda owner: isinstance(owner, FedGenRegularizer))

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Remove the hook and the wrapper."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
            unwrap_training_step(pl_module, self)


class FedGenClient(LightningClient):
    """A :class:`~lightning_ext.federated.client.LightningClient` for FedGen: regularised by the server's generator.

    Each round it rebuilds the generator the :func:`fedgen_fedavg` server sent in the config, adds a
    :class:`FedGenRegularizer` on the model's ``head`` to the round's Trainer, and replies the round's label
    counts (``fedgen-label-counts``) beside the weights. Every other argument is :class:`LightningClient`'s.

    Args:
        head: name of the model's last ``nn.Linear`` (a ``state_dict`` prefix the server reads, e.g.
            ``"net.decode_fc2"`` for ``Classifier(FedGenCNN())``); it must be shared, not personal.
        generated_batch_size: ``B_g``, generated samples per local step.
        **kwargs: :class:`LightningClient`'s arguments.
    """

    def __init__(self, head: str = "net.decode_fc2", generated_batch_size: int = 32, **kwargs: Any) -> None:
        from lightning_ext.federated._flwr import require_flwr

        require_flwr("FedGenClient")
        super().__init__(**kwargs)
        if not isinstance(head, str) or not head:
            raise ValueError("head must name the model's last nn.Linear, e.g. 'net.decode_fc2'.")
        check_positive_int("generated_batch_size", generated_batch_size)
        if self.is_personal(f"{head}.weight"):
            raise ValueError(f"head {head!r} is personal; FedGen's server needs every client's head, so share it.")
        self.head, self.generated_batch_size = head, generated_batch_size
        self._regularizer: Optional[FedGenRegularizer] = None

    @override
    def round_callbacks(self, config: dict, arrays: dict) -> list[Callback]:
        """The round's :class:`FedGenRegularizer`, built from the generator in the config."""
        if CONFIG_DIMS not in config:
            raise ValueError("FedGenClient received no FedGen config; run it with the fedgen_fedavg strategy.")
        dims = [int(d) for d in config[CONFIG_DIMS]]
        alpha, beta = float(config.get(CONFIG_ALPHA, 0.0)), float(config.get(CONFIG_BETA, 0.0))
        generator = None
        if CONFIG_GENERATOR in config:
            generator = FedGenGenerator(*dims)
            state = torch.load(io.BytesIO(bytes(config[CONFIG_GENERATOR])), map_location="cpu", weights_only=True)
            generator.load_state_dict(state)
        self._regularizer = FedGenRegularizer(self.head, generator, list(config.get(CONFIG_LABELS, [])), alpha, beta,
                                              self.generated_batch_size, dims[0])
        return [self._regularizer]

    @override
    def train(self, arrays: dict, config: dict, state: Optional[bytes], partition_id: int,
              num_partitions: int) -> tuple[dict, dict, bytes]:
        """:meth:`LightningClient.train` plus the label counts and the regulariser's last terms in the metrics."""
        reply, metrics, new_state = super().train(arrays, config, state, partition_id, num_partitions)
        metrics[METRIC_COUNTS] = [int(c) for c in self._regularizer.counts]
        metrics["fedgen-teacher"], metrics["fedgen-latent"] = self._regularizer.last_terms
        return reply, metrics, new_state


def fedgen_fedavg(head: str = "net.decode_fc2", num_classes: int = 10, noise_dim: int = 32, hidden_dim: int = 256,
                  latent_dim: int = 32, alpha: float = 10.0, beta: float = 10.0, decay: float = 0.98,
                  generator_lr: float = 3e-4, generator_weight_decay: float = 1e-2, generator_gamma: float = 0.98,
                  generator_steps: int = 50, generator_batch_size: int = 32, teacher_weight: float = 1.0,
                  diversity_weight: float = 1.0, seed: int = 0, **fedavg_kwargs: Any) -> Any:
    """A Flower ``FedAvg`` that trains FedGen's generator from the clients' heads and sends it with each round.

    ``configure_train`` adds the generator (``torch.save`` bytes), its sizes, the qualified labels and the round's
    ``alpha_t = max(1e-4, alpha decay^(t-1))`` (``beta_t`` alike; both 0 in round 1) to the config.
    ``aggregate_train`` reads each valid reply's head (``{head}.weight``/``.bias``) and ``fedgen-label-counts``,
    runs ``generator_steps`` Adam steps on :func:`generator_loss`, steps the generator's ExponentialLR, then
    averages like FedAvg. ``state_dict``/``load_state_dict`` hold the generator, its optimizer and scheduler and
    the labels (:class:`~lightning_ext.federated.simulation.FederatedSimulation` saves them every round).
    """
    for name, value in (("alpha", alpha), ("beta", beta), ("generator_weight_decay", generator_weight_decay),
                        ("teacher_weight", teacher_weight), ("diversity_weight", diversity_weight)):
        check_number(name, value, low=0)
    for name, value in (("decay", decay), ("generator_gamma", generator_gamma)):
        check_number(name, value, low=0, high=1, low_open=True)
    check_number("generator_lr", generator_lr, low=0, low_open=True)
    check_positive_int("generator_steps", generator_steps)
    check_positive_int("generator_batch_size", generator_batch_size)
    check_number("seed", seed, integer=True)
    if not isinstance(head, str) or not head:
        raise ValueError("head must name the model's last nn.Linear, e.g. 'net.decode_fc2'.")
    from lightning_ext.federated._flwr import require_flwr

    require_flwr("fedgen_fedavg")
    from flwr.app import MetricRecord
    from flwr.serverapp.strategy import FedAvg

    class FedGenFedAvg(FedAvg):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            with torch.random.fork_rng(devices=[]):  # the generator's initial weights depend on `seed` only
                torch.manual_seed(seed)
                generator = FedGenGenerator(num_classes, noise_dim, hidden_dim, latent_dim)
            self.generator, self.labels = generator, list(range(num_classes))
            self.optimizer = torch.optim.Adam(generator.parameters(), lr=generator_lr, betas=(0.9, 0.999), eps=1e-8,
                                              weight_decay=generator_weight_decay)
            self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=generator_gamma)
            self.last_losses: dict = {}

        def configure_train(self, server_round, arrays, config, grid):
            t = max(server_round - 1, 0)
            on = server_round > 1
            buffer = io.BytesIO()
            torch.save(self.generator.state_dict(), buffer)
            config[CONFIG_GENERATOR] = buffer.getvalue()
            config[CONFIG_DIMS] = self.generator.dims()
            config[CONFIG_LABELS] = list(self.labels)
            config[CONFIG_ALPHA] = max(1e-4, alpha * decay ** t) if on and alpha > 0 else 0.0
            config[CONFIG_BETA] = max(1e-4, beta * decay ** t) if on and beta > 0 else 0.0
            return super().configure_train(server_round, arrays, config, grid)

        def train_generator(self, heads: list, counts: torch.Tensor, server_round: int) -> dict:
            """``generator_steps`` steps of :func:`generator_loss` on the given heads and label counts."""
            weights, qualified = label_weights(counts)
            if not qualified:
                return {}
            self.labels = qualified
            rng = torch.Generator().manual_seed(seed * 1_000_003 + server_round)
            pool = torch.as_tensor(qualified)
            self.generator.train()
            totals = torch.zeros(2)
            for _ in range(generator_steps):
                y = pool[torch.randint(len(pool), (generator_batch_size,), generator=rng)]
                z, eps = self.generator(y, generator=rng)
                loss, teacher, div = generator_loss(z, eps, y, heads, weights, teacher_weight, diversity_weight)
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
                totals += torch.stack([teacher.detach(), div.detach()])
            self.scheduler.step()
            totals /= generator_steps
            return {"fedgen-generator-teacher": float(totals[0]), "fedgen-generator-diversity": float(totals[1])}

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            heads, counts = [], []
            for reply in replies:
                if reply.has_error():
                    continue
                arrays = reply.content["arrays"].to_torch_state_dict()
                metrics = next(iter(reply.content.metric_records.values()))
                if f"{head}.weight" not in arrays or METRIC_COUNTS not in metrics:
                    raise ValueError(f"a FedGen reply lacks `{head}.weight` or `{METRIC_COUNTS}`: use FedGenClient "
                                     f"with head={head!r} (a shared, not personal, nn.Linear).")
                w = arrays[f"{head}.weight"].float()
                b = arrays[f"{head}.bias"].float() if f"{head}.bias" in arrays else None
                if w.shape[0] != num_classes or w.shape[1] != latent_dim:
                    raise ValueError(f"head {head!r} is {tuple(w.shape)}, the generator needs ({num_classes}, "
                                     f"{latent_dim}); set num_classes/latent_dim to the model's head.")
                heads.append((w, b))
                counts.append(torch.as_tensor(list(metrics[METRIC_COUNTS]), dtype=torch.float64))
            losses = self.train_generator(heads, torch.stack(counts), server_round) if heads else {}
            self.last_losses = losses
            agg, metrics = super().aggregate_train(server_round, replies)
            if metrics is not None:
                metrics = MetricRecord({k: v for k, v in metrics.items() if k != METRIC_COUNTS} | losses)
            return agg, metrics

        def state_dict(self) -> dict:
            """Generator, optimizer, scheduler and labels."""
            return {"generator": self.generator.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "labels": list(self.labels)}

        def load_state_dict(self, state: dict) -> None:
            """Continue from :meth:`state_dict`."""
            self.generator.load_state_dict(state["generator"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.labels = list(state["labels"])

    return FedGenFedAvg(**fedavg_kwargs)
