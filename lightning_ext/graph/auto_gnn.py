"""Auto-GNN (AGNN) architecture search: the GraphNAS layer space, the reinforced conservative controller, constrained
parameter sharing (Zhou, Song, Huang and Hu, arXiv 1909.03184; Frontiers in Big Data 2022).

Pure core (plain torch + PyG, no Trainer): :data:`DEFAULT_SEARCH_SPACE`, :class:`GraphNASConv` (one message-passing
layer with a searchable attention, aggregation, activation, heads and width), :func:`build_gnn`,
:func:`homogeneous_layers` / :func:`inherit_homogeneous` (the sharing rule), :func:`train_child` (a full-batch fit
with early stopping on validation accuracy), :class:`ClassController` (one LSTM controller per action class) and
:class:`AutoGNNSearcher`, the stateful search itself. The Lightning wrappers are
:class:`~lightning_ext.graph.auto_gnn_search.AutoGNNSearch` and
:class:`~lightning_ext.graph.auto_gnn_search.SearchedGNN`.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lightning_ext.core.optional import require

#: The GraphNAS macro space AGNN searches, per layer (the width of the last layer is the number of classes).
#: GraphNAS's fourth aggregator ``"mlp"`` is not offered (it needs a fixed neighbourhood size).
DEFAULT_SEARCH_SPACE: dict[str, list] = {
    "attention": ["const", "gcn", "gat", "sym-gat", "cos", "linear", "generalized-linear"],
    "aggregation": ["sum", "mean", "max"],
    "activation": ["sigmoid", "tanh", "relu", "identity", "softplus", "leaky_relu", "relu6", "elu"],
    "heads": [1, 2, 4, 6, 8, 16],
    "hidden": [4, 8, 16, 32, 64, 128, 256],
}
ACTION_CLASSES = tuple(DEFAULT_SEARCH_SPACE)
_ACTIVATIONS = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": F.relu, "identity": lambda x: x,
                "softplus": F.softplus, "leaky_relu": F.leaky_relu, "relu6": F.relu6, "elu": F.elu}
_AGGR = {"sum": "add", "mean": "mean", "max": "max"}


def check_search_space(space: Optional[dict]) -> dict[str, list]:
    """The search space with its values checked: keys among :data:`ACTION_CLASSES`, every list non-empty and valid;
    a class left out keeps the default choices. Raises ``ValueError`` with one line naming what to change."""
    if space is None:
        return copy.deepcopy(DEFAULT_SEARCH_SPACE)
    if not isinstance(space, dict) or not space:
        raise ValueError("`search_space` is empty: give a dict of action class -> non-empty list of choices "
                         f"(classes {list(ACTION_CLASSES)}), or None for the GraphNAS space.")
    out = copy.deepcopy(DEFAULT_SEARCH_SPACE)
    for key, values in space.items():
        if key not in DEFAULT_SEARCH_SPACE:
            raise ValueError(f"`search_space` has an unknown action class {key!r}; use {list(ACTION_CLASSES)}.")
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"`search_space[{key!r}]` is empty; give at least one choice.")
        for v in values:
            if key in ("heads", "hidden"):
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(f"`search_space[{key!r}]` holds {v!r}; use positive integers.")
            elif v not in DEFAULT_SEARCH_SPACE[key]:
                raise ValueError(f"`search_space[{key!r}]` holds {v!r}; choose among {DEFAULT_SEARCH_SPACE[key]}.")
        if len(set(values)) != len(values):
            raise ValueError(f"`search_space[{key!r}]` repeats a choice; list each once.")
        out[key] = list(values)
    return out


def check_architecture(architecture: Any) -> list[dict]:
    """A list of per-layer dicts (``attention``, ``aggregation``, ``activation``, ``heads``; ``hidden`` on every
    layer but the last), checked against the full space; returns a normalised copy."""
    if not isinstance(architecture, (list, tuple)) or not architecture:
        raise ValueError("`architecture` must be a non-empty list of per-layer dicts, e.g. [{attention: gcn, "
                         "aggregation: sum, activation: relu, heads: 1, hidden: 16}, {attention: gcn, ...}].")
    out = []
    for i, layer in enumerate(architecture):
        last = i == len(architecture) - 1
        need = [k for k in ACTION_CLASSES if not (last and k == "hidden")]
        if not isinstance(layer, dict) or any(k not in layer for k in need):
            raise ValueError(f"`architecture[{i}]` must be a dict with keys {need}, got {layer!r}.")
        extra = set(layer) - set(ACTION_CLASSES)
        if extra:
            raise ValueError(f"`architecture[{i}]` has unknown keys {sorted(extra)}; use {list(ACTION_CLASSES)}.")
        check_search_space({k: [layer[k]] for k in need})
        out.append({k: layer[k] for k in need})
    return out


class GraphNASConv(nn.Module):
    """One GraphNAS/AGNN layer: ``h_i' = act(agg_{j ∈ N(i) ∪ {i}} α_ij^k W^k h_j + b)``, heads concatenated
    (averaged in the output layer); α from ``attention``:

    - ``const``: 1; ``gcn``: 1/√(d_i d_j) (self loops counted);
    - softmax over ``N(i)`` of: ``gat`` LeakyReLU(a_lᵀWh_i + a_rᵀWh_j); ``sym-gat`` e_ij + e_ji of gat;
      ``cos`` ⟨a_l⊙Wh_i, a_r⊙Wh_j⟩; ``linear`` tanh(a_rᵀWh_j); ``generalized-linear`` gᵀ tanh(a_l⊙Wh_i + a_r⊙Wh_j).

    Dropout ``dropout`` on the attention coefficients while training (GraphNAS's ``GeoLayer``).
    """

    def __init__(self, in_channels: int, out_channels: int, heads: int = 1, attention: str = "gat",
                 aggregation: str = "sum", concat: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        require("torch_geometric", "GraphNASConv")
        self.heads, self.out_channels, self.attention, self.concat, self.dropout = (
            heads, out_channels, attention, concat, dropout)
        self.aggr = _AGGR[aggregation]
        self.lin = nn.Linear(in_channels, heads * out_channels, bias=False)
        self.att_l = nn.Parameter(torch.empty(1, heads, out_channels))
        self.att_r = nn.Parameter(torch.empty(1, heads, out_channels))
        self.gen = nn.Linear(out_channels, 1, bias=False) if attention == "generalized-linear" else None
        self.bias = nn.Parameter(torch.zeros(heads * out_channels if concat else out_channels))
        nn.init.xavier_uniform_(self.lin.weight)
        nn.init.xavier_uniform_(self.att_l)
        nn.init.xavier_uniform_(self.att_r)

    def coefficients(self, h: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """α of every edge ``(j -> i)`` and head, shape ``(E, heads)``; ``h`` is ``W x`` as ``(N, heads, C)``."""
        from torch_geometric.utils import degree, softmax

        src, dst = edge_index
        n = h.size(0)
        if self.attention == "const":
            return h.new_ones(src.numel(), self.heads)
        if self.attention == "gcn":
            deg = degree(dst, n, dtype=h.dtype).clamp(min=1).pow(-0.5)
            return (deg[src] * deg[dst]).unsqueeze(-1).expand(-1, self.heads)
        hi, hj = h[dst], h[src]
        if self.attention == "gat":
            e = F.leaky_relu((hi * self.att_l).sum(-1) + (hj * self.att_r).sum(-1), 0.2)
        elif self.attention == "sym-gat":
            e = F.leaky_relu((hi * self.att_l).sum(-1) + (hj * self.att_r).sum(-1), 0.2) + F.leaky_relu(
                (hj * self.att_l).sum(-1) + (hi * self.att_r).sum(-1), 0.2)
        elif self.attention == "cos":
            e = (hi * self.att_l * hj * self.att_r).sum(-1)
        elif self.attention == "linear":
            e = torch.tanh((hj * self.att_r).sum(-1))
        else:  # generalized-linear
            e = self.gen(torch.tanh(hi * self.att_l + hj * self.att_r)).squeeze(-1)
        return softmax(e, dst, num_nodes=n)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """New node features: ``(N, heads·C)`` when concatenating, else ``(N, C)``."""
        from torch_geometric.utils import add_self_loops, remove_self_loops, scatter

        n = x.size(0)
        edge_index, _ = add_self_loops(remove_self_loops(edge_index)[0], num_nodes=n)
        h = (torch.sparse.mm(x, self.lin.weight.t()) if x.is_sparse else self.lin(x)).view(n, self.heads, -1)
        alpha = F.dropout(self.coefficients(h, edge_index), self.dropout, self.training)
        src, dst = edge_index
        out = scatter(h[src] * alpha.unsqueeze(-1), dst, dim=0, dim_size=n, reduce=self.aggr)
        out = out.reshape(n, -1) if self.concat else out.mean(1)
        return out + self.bias


def _sparse_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout on the stored values of a sparse COO tensor (the zeros stay zero, as in dense dropout)."""
    if not training or p == 0:
        return x
    x = x.coalesce()
    return torch.sparse_coo_tensor(x.indices(), F.dropout(x.values(), p, True), x.shape)


def sparse_features(x: torch.Tensor, max_density: float = 0.1) -> torch.Tensor:
    """``x`` as a sparse COO tensor when at most ``max_density`` of it is non-zero (bag-of-words features: the
    first layer's product then costs O(nnz·width) instead of O(N·F·width)), else unchanged."""
    if x.is_sparse or x.numel() == 0 or float((x != 0).float().mean()) > max_density:
        return x
    return x.to_sparse().coalesce()


class SearchedGNNNet(nn.Module):
    """The GNN an architecture describes: dropout, ``GraphNASConv``, the layer's activation, per layer."""

    def __init__(self, architecture: Sequence[dict], in_channels: int, num_classes: int, dropout: float = 0.6):
        super().__init__()
        self.architecture, self.dropout = check_architecture(architecture), dropout
        self.convs = nn.ModuleList()
        width = in_channels
        for i, layer in enumerate(self.architecture):
            last = i == len(self.architecture) - 1
            out = num_classes if last else layer["hidden"]
            self.convs.append(GraphNASConv(width, out, layer["heads"], layer["attention"], layer["aggregation"],
                                           concat=not last, dropout=dropout))
            width = out * layer["heads"]

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """Logits of every node."""
        for layer, conv in zip(self.architecture, self.convs):
            x = _sparse_dropout(x, self.dropout, self.training) if x.is_sparse else F.dropout(x, self.dropout,
                                                                                               self.training)
            x = _ACTIVATIONS[layer["activation"]](conv(x, edge_index))
        return x


def build_gnn(architecture: Sequence[dict], in_channels: int, num_classes: int, dropout: float = 0.6) -> SearchedGNNNet:
    """The :class:`SearchedGNNNet` of ``architecture``."""
    return SearchedGNNNet(architecture, in_channels, num_classes, dropout)


def homogeneous_layers(child: Sequence[dict], parent: Sequence[dict]) -> list[int]:
    """Indices of the layers a child may inherit from its parent (AGNN's constrained parameter sharing): hidden
    layers (never the output layer) with the same attention, activation, heads and width, whose input width is
    the same too (every earlier layer has the same ``heads·hidden``). Aggregation does not change the weights."""
    shared = []
    for i in range(min(len(child), len(parent)) - 1):
        if i > 0 and any(child[k]["heads"] * child[k]["hidden"] != parent[k]["heads"] * parent[k]["hidden"]
                         for k in range(i)):
            break
        if all(child[i][k] == parent[i][k] for k in ("attention", "activation", "heads", "hidden")):
            shared.append(i)
    return shared


@torch.no_grad()
def inherit_homogeneous(child: SearchedGNNNet, parent_state: dict, parent_arch: Sequence[dict]) -> list[int]:
    """Copy the parent's weights into the child's homogeneous layers; returns their indices."""
    shared = homogeneous_layers(child.architecture, parent_arch)
    for i in shared:
        prefix = f"convs.{i}."
        child.convs[i].load_state_dict({k[len(prefix):]: v for k, v in parent_state.items() if k.startswith(prefix)})
    return shared


def train_child(net: nn.Module, graph: Any, epochs: int = 200, patience: int = 20, lr: float = 0.005,
                weight_decay: float = 5e-4) -> dict:
    """Full-batch Adam on ``graph.train_mask``; validation accuracy every epoch; stop after ``patience`` epochs
    without a better one. Returns ``val_acc`` (best), ``best_epoch``, ``epochs`` run and the best ``state``
    (the net is left holding it, in eval mode). Sparse bag-of-words features are multiplied as a sparse tensor
    (:func:`sparse_features`). A non-finite loss ends the fit (the child scores its best so far)."""
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    x, ei, y = sparse_features(graph.x), graph.edge_index, graph.y
    best, best_epoch, state, epoch = -1.0, -1, None, 0
    for epoch in range(epochs):
        net.train()
        opt.zero_grad()
        loss = F.cross_entropy(net(x, ei)[graph.train_mask], y[graph.train_mask])
        if not torch.isfinite(loss):
            break
        loss.backward()
        opt.step()
        net.eval()
        with torch.no_grad():
            acc = float((net(x, ei).argmax(-1)[graph.val_mask] == y[graph.val_mask]).float().mean())
        if acc > best:
            best, best_epoch, state = acc, epoch, {k: v.detach().clone() for k, v in net.state_dict().items()}
        elif epoch - best_epoch >= patience:
            break
    if state is not None:
        net.load_state_dict(state)
    net.eval()
    return {"val_acc": max(best, 0.0), "best_epoch": best_epoch, "epochs": epoch + 1, "state": state}


class ClassController(nn.Module):
    """The RNN controller of one action class: an LSTM cell run over the layers, a softmax over the class's
    choices per layer (GraphNAS/ENAS logits ``c·tanh(z/T)``, T = 5, c = 2.5), sampled from a given generator."""

    def __init__(self, num_choices: int, hidden: int = 100, temperature: float = 5.0, tanh_c: float = 2.5):
        super().__init__()
        self.hidden, self.temperature, self.tanh_c = hidden, temperature, tanh_c
        self.embed = nn.Embedding(num_choices + 1, hidden)  # index num_choices: the start token
        self.cell = nn.LSTMCell(hidden, hidden)
        self.decoder = nn.Linear(hidden, num_choices)
        for p in self.parameters():
            nn.init.uniform_(p, -0.1, 0.1)

    def forward(self, num_layers: int, generator: Optional[torch.Generator] = None,
                actions: Optional[Sequence[int]] = None) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """Sample (or score the given) choice indices for ``num_layers`` layers; returns the indices, the sum of
        their log-probabilities and the sum of the distributions' entropies."""
        h = c = torch.zeros(1, self.hidden, device=self.decoder.weight.device)
        token = torch.full((1,), self.embed.num_embeddings - 1, device=h.device)
        out, logp, ent = [], h.new_zeros(()), h.new_zeros(())
        for i in range(num_layers):
            h, c = self.cell(self.embed(token), (h, c))
            logits = self.tanh_c * torch.tanh(self.decoder(h)[0] / self.temperature)
            log_probs = F.log_softmax(logits, -1)
            if actions is None:
                a = int(torch.multinomial(log_probs.exp().detach().cpu(), 1, generator=generator))
            else:
                a = int(actions[i])
            out.append(a)
            logp = logp + log_probs[a]
            ent = ent - (log_probs.exp() * log_probs).sum()
            token = torch.full((1,), a, device=h.device)
        return out, logp, ent


def _layers_of(cls: str, num_layers: int) -> list[int]:
    return list(range(num_layers - 1)) if cls == "hidden" else list(range(num_layers))


class AutoGNNSearcher:
    """AGNN's search as a plain object: ``step(graph)`` proposes, trains and scores one child; stateful.

    ``strategy="conservative"`` (RCNAS): child 0 is uniform at random; then the action classes with more than one
    choice take turns (in :data:`ACTION_CLASSES` order); class ``c``'s :class:`ClassController` re-samples only ``c``
    in every layer of the best architecture so far; the child inherits the best architecture's trained weights in
    its homogeneous layers (``share_parameters``), is trained to early stopping, and its controller takes one
    REINFORCE step, ``-(r - b_c) Σ log π_c(a) - β H(π_c)`` with ``r`` the child's validation accuracy and ``b_c``
    the class's moving average (decay 0.95); a better child becomes the best. ``strategy="random"``: every child
    uniform at random, no sharing, no controller (the control at equal child budget).

    Every random draw comes from a generator seeded by ``(seed, child index)``, and each child trains under
    ``torch.random.fork_rng`` with such a seed, so a search resumed from :meth:`state_dict` ends identical to an
    uninterrupted one, and the global RNG is untouched.
    """

    def __init__(self, in_channels: int, num_classes: int, search_space: Optional[dict] = None, num_layers: int = 2,
                 strategy: str = "conservative", share_parameters: bool = True, child_epochs: int = 200,
                 child_patience: int = 20, child_lr: float = 0.005, child_weight_decay: float = 5e-4,
                 dropout: float = 0.6, controller_lr: float = 3.5e-4, entropy_weight: float = 1e-4,
                 baseline_decay: float = 0.95, seed: int = 0) -> None:
        self.space = check_search_space(search_space)
        self.in_channels, self.num_classes, self.num_layers = in_channels, num_classes, num_layers
        self.strategy, self.share_parameters, self.seed = strategy, share_parameters, seed
        self.child_kwargs = dict(epochs=child_epochs, patience=child_patience, lr=child_lr,
                                 weight_decay=child_weight_decay)
        self.dropout, self.entropy_weight, self.baseline_decay = dropout, entropy_weight, baseline_decay
        with torch.random.fork_rng(devices=[]):  # the controllers' initial weights depend on the seed only
            torch.manual_seed(seed)
            self.controllers = nn.ModuleDict({k: ClassController(len(v)) for k, v in self.space.items()})
        self.optimizer = torch.optim.Adam(self.controllers.parameters(), lr=controller_lr)
        #: what steps :attr:`optimizer` (a Lightning wrapper sets its ``LightningOptimizer.step`` to count steps)
        self.optimizer_step: Optional[Any] = None
        self.baselines: dict[str, Optional[float]] = {k: None for k in ACTION_CLASSES}
        self.history: list[dict] = []
        self.best_architecture: Optional[list[dict]] = None
        self.best_val_acc = -1.0
        self.best_state: Optional[dict] = None

    @property
    def children(self) -> int:
        """Children evaluated so far."""
        return len(self.history)

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.children)

    def random_architecture(self, generator: torch.Generator) -> list[dict]:
        """Every decision uniform over its choices (the output layer has no ``hidden``)."""
        arch = []
        for i in range(self.num_layers):
            layer = {}
            for k in ACTION_CLASSES:
                if i in _layers_of(k, self.num_layers):
                    layer[k] = self.space[k][int(torch.randint(len(self.space[k]), (1,), generator=generator))]
            arch.append(layer)
        return arch

    def propose(self) -> tuple[list[dict], Optional[str], Optional[list[int]]]:
        """The next child: its architecture, the action class changed (None for a random child) and the choice
        indices the controller sampled."""
        g = self._generator()
        if self.strategy == "random" or self.best_architecture is None:
            return self.random_architecture(g), None, None
        searchable = [k for k in ACTION_CLASSES if len(self.space[k]) > 1]
        if not searchable:  # a space of one architecture: nothing to change
            return copy.deepcopy(self.best_architecture), None, None
        cls = searchable[(self.children - 1) % len(searchable)]
        layers = _layers_of(cls, self.num_layers)
        with torch.no_grad():
            actions, _, _ = self.controllers[cls](len(layers), g)
        arch = copy.deepcopy(self.best_architecture)
        for i, a in zip(layers, actions):
            arch[i][cls] = self.space[cls][a]
        return arch, cls, actions

    def step(self, graph: Any) -> dict:
        """Propose one child, train it on ``graph`` (``x``, ``edge_index``, ``y``, ``train_mask``, ``val_mask``),
        update the controller and the best architecture; returns the child's record (also in ``history``)."""
        arch, cls, actions = self.propose()
        index = self.children
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + index + 7)
            net = build_gnn(arch, self.in_channels, self.num_classes, self.dropout).to(graph.x.device)
            shared = []
            if self.share_parameters and self.strategy == "conservative" and self.best_state is not None:
                shared = inherit_homogeneous(net, self.best_state, self.best_architecture)
            fit = train_child(net, graph, **self.child_kwargs)
        if cls is not None:
            self._reinforce(cls, actions, fit["val_acc"])
        record = {"index": index, "architecture": arch, "changed": cls, "shared_layers": shared,
                  "val_acc": fit["val_acc"], "best_epoch": fit["best_epoch"], "epochs": fit["epochs"],
                  "params": sum(p.numel() for p in net.parameters())}
        self.history.append(record)
        if fit["val_acc"] > self.best_val_acc:
            self.best_val_acc, self.best_architecture = fit["val_acc"], copy.deepcopy(arch)
            self.best_state = fit["state"]
        return record

    def _reinforce(self, cls: str, actions: list[int], reward: float) -> None:
        b = self.baselines[cls]
        b = reward if b is None else self.baseline_decay * b + (1 - self.baseline_decay) * reward
        self.baselines[cls] = b
        _, logp, ent = self.controllers[cls](len(actions), actions=actions)
        loss = -(reward - b) * logp - self.entropy_weight * ent
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        (self.optimizer_step or self.optimizer.step)()

    def best_so_far(self) -> list[float]:
        """The best validation accuracy after each child."""
        out, best = [], -math.inf
        for r in self.history:
            best = max(best, r["val_acc"])
            out.append(best)
        return out

    def state_dict(self) -> dict:
        """Everything a resumed search needs: controllers, their optimiser, baselines, history, the best child."""
        return {"controllers": self.controllers.state_dict(), "optimizer": self.optimizer.state_dict(),
                "baselines": dict(self.baselines), "history": copy.deepcopy(self.history),
                "best_architecture": copy.deepcopy(self.best_architecture), "best_val_acc": self.best_val_acc,
                "best_state": self.best_state}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output."""
        self.controllers.load_state_dict(state["controllers"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.baselines = dict(state["baselines"])
        self.history = copy.deepcopy(state["history"])
        self.best_architecture = copy.deepcopy(state["best_architecture"])
        self.best_val_acc = float(state["best_val_acc"])
        self.best_state = state["best_state"]
