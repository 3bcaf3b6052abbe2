"""FED-PUB on Lightning and Flower: subgraph clients, the masked-GCN module, the client and the server strategy.

The pure core (masked GCN, proxy graph, functional embeddings, similarity weights, penalties, Louvain split) is
:mod:`lightning_ext.federated.fedpub`. Here:

- :func:`subgraph_clients` / :class:`SubgraphClientDataModule`: a Planetoid graph (read by PyG, largest connected
  component, row-normalised features, random 20/40/40 train/val/test node split as the reference ``split_train``)
  cut into disjoint client subgraphs (Louvain, see :func:`~lightning_ext.federated.fedpub.louvain_partition`).
- :class:`FedPubModule`: a full-batch LightningModule over :class:`~lightning_ext.federated.fedpub.MaskedGCN`
  with the reference objective (mask L1 + unsquared proximal L2, effective here; ``official_inert=True`` for the
  reference's detached penalties).
- :class:`FedPubClient`: a :class:`~lightning_ext.federated.client.LightningClient` whose masks stay personal and
  whose reply carries the functional embedding on the server's proxy graph.
- :func:`fedpub_fedavg`: a Flower ``FedAvg`` that sends each node its own personalised model (and the proxy graph),
  computes the similarity weights from the replies' embeddings, keeps one model per node, and returns the
  size-weighted global mean. Its ``state_dict`` holds the personalised models, so a federation resumes.
"""

from __future__ import annotations

import functools
import io
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from typing_extensions import override

from lightning_ext.core.guards import check_loss, check_nonfinite_policy
from lightning_ext.core.paths import check_path_argument
from lightning_ext.core.validation import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    check_choice,
    check_number,
    check_positive_int,
)
from lightning_ext.federated.client import LightningClient
from lightning_ext.graph.full_graph_steps import FullGraphNodeSteps
from lightning_ext.federated.fedpub import (
    MaskedGCN,
    fedpub_penalty,
    functional_embedding,
    induced_subgraph,
    is_mask,
    louvain_partition,
    mask_sparsity,
    personalized_states,
    proxy_graph,
    similarity_weights,
)

#: keys of FED-PUB's entries in a round's ConfigRecord and a reply's MetricRecord
CONFIG_PROXY, METRIC_EMBEDDING = "fedpub-proxy", "fedpub-embedding"


@functools.lru_cache(maxsize=8)
def subgraph_clients(root: str, name: str = "Cora", num_clients: int = 10, partition_seed: int = 1234,
                     split_seed: int = 1234, cache_dir: Optional[str] = None) -> tuple:
    """Client subgraphs of a Planetoid graph: a tuple of PyG ``Data`` with ``x, edge_index, y`` and the
    ``train/val/test_mask`` of the global random 20/40/40 split (seeded by ``split_seed``); cached per process."""
    import shutil
    from pathlib import Path

    from torch_geometric.datasets import Planetoid
    from torch_geometric.transforms import LargestConnectedComponents, NormalizeFeatures

    from lightning_ext.core.paths import cache_root

    prefix = {"Cora": "cora", "CiteSeer": "citeseer", "PubMed": "pubmed"}[name]
    src = Path(root).expanduser() / name / "raw"
    files = [src / f"ind.{prefix}.{s}" for s in ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"Planetoid {name}: {', '.join(missing)} not found under {src}; pass root= a folder "
                                f"holding {name}/raw/ind.{prefix}.* (here ../shared/data/planetoid).")
    cache = Path(cache_dir).expanduser() if cache_dir else cache_root("planetoid")
    (cache / name / "raw").mkdir(parents=True, exist_ok=True)
    for f in files:  # PyG writes processed/ beside raw/: copy, so the source may stay read-only
        dst = cache / name / "raw" / f.name
        if not dst.exists() or dst.stat().st_size != f.stat().st_size:
            shutil.copyfile(f, dst)
    graph = LargestConnectedComponents()(Planetoid(str(cache), name, split="full", transform=NormalizeFeatures())[0])
    n = graph.num_nodes
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    n_train, n_test = int(0.2 * n), int(0.4 * n)
    masks = {}
    for stage, idx in (("train", perm[:n_train]), ("test", perm[n_train:n_train + n_test]),
                       ("val", perm[n_train + n_test:])):
        m = torch.zeros(n, dtype=torch.bool)
        m[idx] = True
        masks[stage] = m
    from torch_geometric.data import Data

    out = []
    for nodes in louvain_partition(graph.edge_index, n, num_clients, partition_seed):
        idx = torch.as_tensor(nodes)
        out.append(Data(x=graph.x[idx], edge_index=induced_subgraph(nodes, graph.edge_index, n), y=graph.y[idx],
                        **{f"{s}_mask": m[idx] for s, m in masks.items()}))
    return tuple(out)


def _single_graph(batch: list) -> Any:
    return batch[0]


class SubgraphClientDataModule(LightningDataModule):
    """One FED-PUB client's subgraph of a Planetoid graph (disjoint Louvain communities), full batch.

    Every loader yields the client's subgraph once (``train_mask``/``val_mask``/``test_mask`` pick the nodes).

    Args:
        root: folder holding ``<name>/raw`` (e.g. ``../shared/data/planetoid``).
        name: ``"Cora"``, ``"CiteSeer"`` or ``"PubMed"``.
        num_clients: number of subgraphs.
        partition_id: which subgraph.
        partition_seed: seed of the Louvain communities.
        split_seed: seed of the 20/40/40 node split.
        cache_dir: where PyG may write its processed files (see ``PlanetoidDataModule``).
    """

    #: the federation runner passes ``partition_id``/``num_clients`` to this class itself (no FederatedDataModule)
    federated_partitions = True

    def __init__(self, root: Optional[str] = None, name: Literal["Cora", "CiteSeer", "PubMed"] = "Cora",
                 num_clients: PositiveInt = 10, partition_id: NonNegativeInt = 0, partition_seed: int = 1234,
                 split_seed: int = 1234, cache_dir: Optional[str] = None) -> None:
        super().__init__()
        check_positive_int("num_clients", num_clients)
        check_number("partition_id", partition_id, low=0, integer=True)
        if partition_id >= num_clients:
            raise ValueError(f"partition_id={partition_id} must be below num_clients={num_clients}.")
        check_choice("name", name, ("Cora", "CiteSeer", "PubMed"))
        for arg, value in (("partition_seed", partition_seed), ("split_seed", split_seed)):
            check_number(arg, value, low=0, integer=True)
        check_path_argument("cache_dir", cache_dir)
        if root is None:
            raise ValueError("SubgraphClientDataModule needs root=<folder holding Cora/raw>, e.g. "
                             "../shared/data/planetoid.")
        self.root, self.name, self.num_clients, self.partition_id = root, name, num_clients, partition_id
        self.partition_seed, self.split_seed, self.cache_dir = partition_seed, split_seed, cache_dir

    graph = None

    def _loader(self) -> Any:
        from torch.utils.data import DataLoader

        if self.graph is None:
            raise RuntimeError("SubgraphClientDataModule: call setup() before asking for a dataloader.")
        return DataLoader([self.graph], batch_size=1, collate_fn=_single_graph)

    @override
    def train_dataloader(self) -> Any:
        """The client's subgraph, once per epoch."""
        return self._loader()

    @override
    def val_dataloader(self) -> Any:
        """The client's subgraph (the module uses ``val_mask``)."""
        return self._loader()

    @override
    def test_dataloader(self) -> Any:
        """The client's subgraph (the module uses ``test_mask``)."""
        return self._loader()

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        """Read and partition the graph once per process; keep this client's subgraph."""
        if self.graph is None:
            self.graph = subgraph_clients(self.root, self.name, self.num_clients, self.partition_seed,
                                          self.split_seed, self.cache_dir)[self.partition_id]


class FedPubModule(FullGraphNodeSteps, LightningModule):
    """FED-PUB's client model: a :class:`~lightning_ext.federated.fedpub.MaskedGCN` trained full-batch with
    ``CE + l1 sum ||M||_1 + loc_l2 sum ||theta - theta_received||_2`` (reference defaults 1e-3, 1e-3; Adam 0.01).

    ``theta_received`` is the model as it stands when ``fit`` starts (in a federation: the weights the server sent
    this round); ``proximal=False`` drops that term (the client sets it for the first round, as the reference).
    ``official_inert=True`` computes both penalties on detached tensors, as the reference code does, so they add no
    gradient. Logs ``{stage}_loss``/``{stage}_acc`` on each stage's mask and ``fedpub/mask_sparsity``; the step
    hooks are :class:`~lightning_ext.graph.full_graph_steps.FullGraphNodeSteps`' with this module's ``_step``.

    Args:
        num_features, num_classes, hidden, dropout: the GCN's sizes (Cora 1433, 7; reference 128, 0.5).
        masked: learn personal masks (``False``: the "no masks" ablation).
        l1_weight: weight of the mask L1 (also the evaluation pruning threshold).
        proximal_weight: weight of the (unsquared) L2 distance to the received weights.
        official_inert: the reference's inert penalties (value only).
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        nonfinite_loss: ``"error"``, ``"skip"`` or ``"warn"`` on a non-finite training loss.

    Example:
        >>> m = FedPubModule(num_features=8, num_classes=3, hidden=16)
        >>> sum(p.numel() for p in m.parameters())
        899
    """

    def __init__(self, num_features: PositiveInt = 1433, num_classes: PositiveInt = 7, hidden: PositiveInt = 128,
                 dropout: float = 0.5, masked: bool = True, l1_weight: NonNegativeFloat = 1e-3,
                 proximal_weight: NonNegativeFloat = 1e-3, official_inert: bool = False, lr: PositiveFloat = 0.01,
                 weight_decay: NonNegativeFloat = 0.0,
                 nonfinite_loss: Literal["error", "skip", "warn"] = "error") -> None:
        super().__init__()
        check_number("l1_weight", l1_weight, low=0)
        check_number("proximal_weight", proximal_weight, low=0)
        check_number("lr", lr, low=0, low_open=True)
        check_number("weight_decay", weight_decay, low=0)
        check_nonfinite_policy(nonfinite_loss)
        self.save_hyperparameters()
        self.net = MaskedGCN(num_features, num_classes, hidden, dropout, l1=max(l1_weight, 0.0), masked=masked)
        self.proximal = True
        self._received: Optional[dict] = None

    @override
    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """Logits of every node."""
        return self.net(x, edge_index)

    @override
    def on_fit_start(self) -> None:
        """Keep the weights the fit starts from (the received model) for the proximal term."""
        self._received = {f"net.{n}": p.detach().clone() for n, p in self.net.named_parameters() if not is_mask(n)}

    def _step(self, graph: Any, stage: str) -> Optional[torch.Tensor]:
        """The training loss adds FED-PUB's penalties; accuracy is computed per call (no metric state)."""
        for key in ("x", "edge_index", "y", f"{stage}_mask"):
            if getattr(graph, key, None) is None:
                raise ValueError(f"FedPubModule needs a PyG graph with `{key}` (SubgraphClientDataModule yields one).")
        mask = graph[f"{stage}_mask"]
        logits = self(graph.x, graph.edge_index)[mask]
        loss = F.cross_entropy(logits, graph.y[mask])
        n = max(int(mask.sum()), 1)
        if stage == "train":
            hp = self.hparams
            received = self._received if self.proximal else None
            loss = loss + fedpub_penalty(self.net, received, hp.l1_weight, hp.proximal_weight, hp.official_inert,
                                         prefix="net.")
            if not check_loss(self, loss, hp.nonfinite_loss, graph):
                return None
            self.log("fedpub/mask_sparsity", mask_sparsity(self.net, hp.l1_weight), batch_size=n)
        acc = (logits.argmax(-1) == graph.y[mask]).float().mean()
        self.log(f"{stage}_loss", loss, batch_size=n)
        self.log(f"{stage}_acc", acc, batch_size=n)
        return loss

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam (the reference optimiser; its state persists across rounds in a LightningClient)."""
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


class FedPubClient(LightningClient):
    """FED-PUB's client: masks stay personal, the proximal term is off in round 1, the reply carries the functional
    embedding of the trained model on the proxy graph the server sent (``fedpub-embedding``, a list of floats).

    The model must be a :class:`FedPubModule` (or expose ``net`` as a ``MaskedGCN``). ``personal`` gets the mask
    pattern added. Every other argument is :class:`~lightning_ext.federated.client.LightningClient`'s.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs["personal"] = [*list(kwargs.get("personal") or []), r"(^|\.)mask$"]
        super().__init__(**kwargs)
        self._round = 1

    @override
    def build_model(self) -> LightningModule:
        """The module, with its proximal term off in the first round."""
        module = super().build_model()
        if not isinstance(getattr(module, "net", None), MaskedGCN):
            raise TypeError(f"FedPubClient needs a module whose `net` is a MaskedGCN (FedPubModule); got "
                            f"{type(module).__name__}.")
        module.proximal = self._round > 1
        return module

    @override
    def train(self, arrays: dict, config: dict, state: Optional[bytes], partition_id: int,
              num_partitions: int) -> tuple[dict, dict, bytes]:
        """:meth:`LightningClient.train`, then the functional embedding of the trained model."""
        if CONFIG_PROXY not in config:
            raise ValueError("FedPubClient received no proxy graph; run it with the fedpub_fedavg strategy.")
        self._round = int(config.get("server-round", 1))
        reply, metrics, new_state = super().train(arrays, config, state, partition_id, num_partitions)
        proxy = torch.load(io.BytesIO(bytes(config[CONFIG_PROXY])), map_location="cpu", weights_only=True)
        model = self.build_model()
        weights = torch.load(io.BytesIO(new_state), map_location="cpu", weights_only=False)["state_dict"]
        model.load_state_dict(weights)
        metrics[METRIC_EMBEDDING] = [float(v) for v in functional_embedding(model.net, proxy["x"], proxy["edge_index"])]
        return reply, metrics, new_state


def fedpub_fedavg(num_features: int = 1433, tau: float = 10.0, proxy_blocks: int = 5, proxy_block_size: int = 100,
                  proxy_p_in: float = 0.1, proxy_seed: int = 1234, similarity: Literal["functional", "uniform"] = "functional",
                  **fedavg_kwargs: Any) -> Any:
    """A Flower ``FedAvg`` running FED-PUB's server: personalised models from functional-embedding similarity.

    ``configure_train``/``configure_evaluate`` send each node its own personalised arrays (the global ones until it
    has one) and the proxy graph (``torch.save`` bytes of ``{"x", "edge_index"}``, the same for every client).
    ``aggregate_train`` reads each reply's ``fedpub-embedding``, computes ``S = softmax(tau cos)`` (``similarity=
    "uniform"``: ``S_ij = 1/N``, the ablation), stores ``theta_i = sum_j S_ij theta_j`` per node and returns the
    size-weighted mean as the global model. ``state_dict``/``load_state_dict`` hold the personalised models and the
    last similarity matrix.
    """
    check_number("tau", tau, low=0)
    if similarity not in ("functional", "uniform"):
        raise ValueError(f"similarity={similarity!r} is unknown; choose 'functional' or 'uniform'.")
    x, edge_index = proxy_graph(num_features, proxy_blocks, proxy_block_size, proxy_p_in, proxy_seed)
    buffer = io.BytesIO()
    torch.save({"x": x, "edge_index": edge_index}, buffer)
    proxy_bytes = buffer.getvalue()

    from lightning_ext.federated._flwr import require_flwr

    require_flwr("fedpub_fedavg")
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg

    class FedPubFedAvg(FedAvg):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.personal: dict[int, dict] = {}
            self.similarity: Optional[torch.Tensor] = None

        def _personalise(self, messages, config):
            out = []
            for msg in messages:
                nid = int(msg.metadata.dst_node_id)
                arrays = msg.content[self.arrayrecord_key]
                if nid in self.personal:
                    arrays = ArrayRecord(self.personal[nid])
                content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
                out.append(Message(content, dst_node_id=nid, message_type=msg.metadata.message_type,
                                   group_id=msg.metadata.group_id))
            return out

        def configure_train(self, server_round, arrays, config, grid):
            config[CONFIG_PROXY] = proxy_bytes
            messages = list(super().configure_train(server_round, arrays, config, grid))
            return self._personalise(messages, messages[0].content[self.configrecord_key] if messages else config)

        def configure_evaluate(self, server_round, arrays, config, grid):
            messages = list(super().configure_evaluate(server_round, arrays, config, grid))
            return self._personalise(messages, messages[0].content[self.configrecord_key] if messages else config)

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            valid = [r for r in replies if not r.has_error()]
            states, embeddings, nodes = [], [], []
            for reply in valid:
                metrics = next(iter(reply.content.metric_records.values()))
                if METRIC_EMBEDDING not in metrics:
                    raise ValueError(f"a FED-PUB reply lacks `{METRIC_EMBEDDING}`: run the clients as FedPubClient.")
                states.append(reply.content[self.arrayrecord_key].to_torch_state_dict())
                embeddings.append(torch.as_tensor(list(metrics[METRIC_EMBEDDING]), dtype=torch.float64))
                nodes.append(int(reply.metadata.src_node_id))
            if states:
                if similarity == "uniform":
                    weights = torch.full((len(states), len(states)), 1.0 / len(states), dtype=torch.float64)
                else:
                    weights = similarity_weights(torch.stack(embeddings), tau)
                self.similarity = weights
                for nid, state in zip(nodes, personalized_states(states, weights)):
                    self.personal[nid] = state
            agg, metrics = super().aggregate_train(server_round, replies)
            if metrics is not None:
                metrics = MetricRecord({k: v for k, v in metrics.items() if k != METRIC_EMBEDDING})
            return agg, metrics

        def state_dict(self) -> dict:
            """The personalised models per node and the last similarity matrix."""
            return {"personal": {int(k): dict(v) for k, v in self.personal.items()}, "similarity": self.similarity}

        def load_state_dict(self, state: dict) -> None:
            """Continue from :meth:`state_dict`."""
            self.personal = {int(k): dict(v) for k, v in state["personal"].items()}
            self.similarity = state.get("similarity")

    return FedPubFedAvg(**fedavg_kwargs)
