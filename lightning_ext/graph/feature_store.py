"""PyG feature stores for sampled training: counted array reads and a zero-copy (GPU-oriented) gather.

PyG's loaders accept ``data=(feature_store, graph_store)`` and, once per batch, call
``feature_store.multi_get_tensor([TensorAttr(group, attr, index=n_id), ...])``; that call is where these stores
differ from plain indexing.

- :class:`ArrayFeatureStore`: in-memory tensors or ``numpy.memmap`` files (features larger than memory). Reads
  are sorted by row (sequential access on disk), then put back in the requested order; every read is counted
  in :class:`IOStats` (rows, bytes, distinct 4 KiB pages touched), which is what DiskGNN's read amplification is
  measured in.
- :class:`ZeroCopyFeatureStore`: Min et al., "Large Graph Convolutional Network Training with GPU-Oriented Data
  Communication Architecture" (PVLDB 14(11), 2021, arXiv 2103.03330; reference code
  https://github.com/K-Wu/pytorch-direct_dgl, a patched PyTorch 1.8). The feature table stays in pinned host
  memory and the GPU gathers the requested rows itself over PCIe, ``out = X_host[idx]`` with no host-side gather
  and no staging copy. Rows are stored with their stride padded to ``pad_to_bytes`` (128 B: one warp's aligned
  request) and the padding is sliced off after the gather -- the paper's address alignment without per-warp
  shifting. On stock PyTorch the pinned buffer is exposed to CUDA through ``__cuda_array_interface__`` (unified
  virtual addressing); the mode is checked against a CPU gather once, and ``mode="auto"`` falls back to the
  staged path (gather on the CPU into a pinned buffer, asynchronous copy) or, without CUDA, to a CPU gather.

Both are bit-exact against ``x[index]`` (tests). Use a CUDA store with ``filter_per_worker=False`` in PyG's
loaders: by default they fetch features in worker processes for ``(FeatureStore, GraphStore)`` inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
from torch import Tensor

from lightning_ext.core.optional import require
from lightning_ext.core.validation import check_choice, check_number

PAGE_BYTES = 4096


@dataclass
class IOStats:
    """Reads counted by a store: rows, bytes, distinct 4 KiB pages touched, calls, and cache hits."""

    rows: int = 0
    bytes: int = 0
    pages: int = 0
    calls: int = 0
    cache_hits: int = 0
    extra: dict = field(default_factory=dict)

    def reset(self) -> None:
        """Zero every counter."""
        self.rows = self.bytes = self.pages = self.calls = self.cache_hits = 0
        self.extra.clear()

    def as_dict(self) -> dict:
        """The counters as a plain dict (for logging)."""
        return {"rows": self.rows, "bytes": self.bytes, "pages": self.pages, "calls": self.calls,
                "cache_hits": self.cache_hits, **self.extra}


def pages_touched(rows: Tensor, row_bytes: int, page_bytes: int = PAGE_BYTES) -> int:
    """Distinct ``page_bytes`` pages that reading ``rows`` (row ids of ``row_bytes`` each) touches.

    Example:
        >>> pages_touched(torch.tensor([0, 1, 7, 8]), row_bytes=512)  # 8 rows share a 4 KiB page
        2
    """
    if rows.numel() == 0:
        return 0
    rows = rows.long().unique()
    first = rows * row_bytes // page_bytes
    last = ((rows + 1) * row_bytes - 1) // page_bytes
    span = last - first
    if int(span.max()) == 0:
        return int(first.unique().numel())
    pages = torch.cat([first + k for k in range(int(span.max()) + 1)])
    keep = torch.cat([torch.full_like(first, k) <= span for k in range(int(span.max()) + 1)])
    return int(pages[keep].unique().numel())


def _check_index(index: Any, num_rows: int, where: str) -> Optional[Tensor]:
    if index is None:
        return None
    if isinstance(index, slice):
        index = torch.arange(num_rows)[index]
    index = torch.as_tensor(index)
    if index.dtype == torch.bool:
        index = index.nonzero().flatten()
    if index.is_floating_point():
        raise ValueError(f"{where}: the index must hold integer row ids, got dtype {index.dtype}")
    index = index.long().flatten()
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= num_rows):
        raise IndexError(f"{where}: row ids must lie in [0, {num_rows}), got [{int(index.min())}, {int(index.max())}]")
    return index


class _TableStore:
    """The bookkeeping every store here shares: tables keyed by (group, attr), PyG's abstract methods."""

    def _init_tables(self) -> None:
        self._tables: dict[tuple, Any] = {}

    @staticmethod
    def _key(attr: Any) -> tuple:
        return (attr.group_name, attr.attr_name)

    def _put_tensor(self, tensor: Any, attr: Any) -> bool:
        if attr.index is not None:
            raise ValueError("put the whole table (index=None); these stores do not update rows in place")
        self._tables[self._key(attr)] = self._prepare(tensor)
        return True

    def _get_tensor(self, attr: Any) -> Optional[Tensor]:
        table = self._tables.get(self._key(attr))
        if table is None:
            return None
        return self._gather(table, _check_index(attr.index, self._rows(table), f"{attr.group_name}.{attr.attr_name}"))

    def _remove_tensor(self, attr: Any) -> bool:
        return self._tables.pop(self._key(attr), None) is not None

    def _get_tensor_size(self, attr: Any) -> Optional[tuple]:
        table = self._tables.get(self._key(attr))
        return None if table is None else self._size(table)

    def get_all_tensor_attrs(self) -> list:
        from torch_geometric.data import TensorAttr

        return [TensorAttr(group_name=g, attr_name=a) for g, a in self._tables]

    # per-store hooks
    def _prepare(self, tensor: Any) -> Any:
        return tensor

    def _rows(self, table: Any) -> int:
        return int(table.shape[0])

    def _size(self, table: Any) -> tuple:
        return tuple(table.shape)


_BOUND: dict = {}


def _new_store(cls: type) -> Any:
    """Instantiate ``cls`` as a subclass of PyG's ``FeatureStore``, bound lazily (PyG is the [graph] extra:
    importing this module needs no PyG; constructing a store does, and says how to install it)."""
    require("torch_geometric", cls.__name__)
    from torch_geometric.data import FeatureStore

    if cls not in _BOUND:
        _BOUND[cls] = type(cls.__name__, (cls, FeatureStore), {"__module__": cls.__module__,
                                                               "__doc__": cls.__doc__, "__reduce__": _reduce})
    return object.__new__(_BOUND[cls])


def _reduce(self: Any) -> tuple:  # pickles (spawned loader workers) rebuild the bound class by its public base
    return (_rebuild, (type(self).__mro__[1], self.__dict__))


def _rebuild(cls: type, state: dict) -> Any:
    obj = _new_store(cls)
    obj.__dict__.update(state)
    return obj


class ArrayFeatureStore(_TableStore):
    """A PyG `FeatureStore` over tensors or ``numpy.memmap`` files, with every read counted in :class:`IOStats`.

    Reads gather the requested rows in ascending row order (one sequential pass over a memory-mapped file), then
    restore the requested order; duplicated ids are read once. ``stats`` counts rows, bytes and distinct 4 KiB
    pages touched, the unit of read amplification on disk.

    Example:
        >>> store = ArrayFeatureStore()
        >>> store.put_tensor(torch.arange(12.0).view(6, 2), group_name="paper", attr_name="x", index=None)
        True
        >>> store.get_tensor(group_name="paper", attr_name="x", index=torch.tensor([4, 1, 4])).tolist()
        [[8.0, 9.0], [2.0, 3.0], [8.0, 9.0]]
        >>> store.stats.rows
        2
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> "ArrayFeatureStore":
        return _new_store(cls)

    def __init__(self) -> None:
        super().__init__()
        self._init_tables()
        self.stats = IOStats()

    def _prepare(self, tensor: Any) -> Any:
        table = tensor if isinstance(tensor, np.ndarray) else torch.as_tensor(tensor)
        if table.ndim not in (1, 2):
            raise ValueError(f"a feature table must be 1-D (rows) or 2-D (rows, features), got shape "
                             f"{tuple(table.shape)}")
        return table

    def _gather(self, table: Any, index: Optional[Tensor]) -> Tensor:
        if index is None:
            index = torch.arange(self._rows(table))
        uniq, inverse = torch.unique(index, sorted=True, return_inverse=True)
        width = int(table.shape[1]) if table.ndim == 2 else 1
        row_bytes = width * (table.dtype.itemsize if isinstance(table, np.ndarray) else table.element_size())
        self.stats.calls += 1
        self.stats.rows += int(uniq.numel())
        self.stats.bytes += int(uniq.numel()) * row_bytes
        self.stats.pages += pages_touched(uniq, row_bytes)
        if isinstance(table, np.ndarray):
            rows = torch.from_numpy(np.ascontiguousarray(table[uniq.numpy()]))
        else:
            rows = table.index_select(0, uniq)
        return rows.index_select(0, inverse) if index.numel() else rows[:0]


ZeroCopyMode = Literal["auto", "zero_copy", "staged", "cpu"]


class _HostView:
    """Exposes a pinned host tensor to CUDA through ``__cuda_array_interface__`` (unified virtual addressing)."""

    def __init__(self, host: Tensor) -> None:
        self._host = host  # the host tensor owns the memory: keep it alive as long as the view
        typestr = {torch.float32: "<f4", torch.float16: "<f2", torch.float64: "<f8", torch.int64: "<i8",
                   torch.int32: "<i4", torch.uint8: "|u1", torch.bfloat16: "<V2"}[host.dtype]
        self.__cuda_array_interface__ = {"shape": tuple(host.shape), "typestr": typestr,
                                         "data": (host.data_ptr(), False), "version": 2,
                                         "strides": tuple(s * host.element_size() for s in host.stride())}


class ZeroCopyFeatureStore(_TableStore):
    """A PyG `FeatureStore` whose tables stay in pinned host memory and are gathered by index on the GPU.

    Modes (``mode``):
      - ``"zero_copy"``: the GPU reads the requested rows straight from pinned host memory (PyTorch-Direct's
        unified tensor): ``index_select`` on a CUDA view of the host buffer; no host gather, no staging copy.
      - ``"staged"``: the conventional path, overlapped: ``index_select`` on the CPU into a pinned staging buffer,
        then a non-blocking copy to the GPU.
      - ``"cpu"``: ``index_select`` on the CPU, returned on the CPU (no CUDA needed).
      - ``"auto"``: ``zero_copy`` if CUDA is available and a one-off check of it matches a CPU gather bit for
        bit, else ``staged`` with CUDA, else ``cpu``. The chosen mode is ``resolved_mode``.
    Rows are stored with a stride padded to a multiple of ``pad_to_bytes`` (``0`` = no padding), so every row
    starts on an aligned address; gathers return unpadded rows of the original dtype.

    Args:
        mode: the gather path (above).
        pad_to_bytes: row stride alignment in bytes (128 = a warp's aligned PCIe request); a multiple of the
            element size, or 0.
        device: where gathered rows go for the CUDA modes (default ``"cuda"``).

    Example:
        >>> store = ZeroCopyFeatureStore(mode="cpu")
        >>> store.put_tensor(torch.arange(6.0).view(3, 2), group_name="n", attr_name="x", index=None)
        True
        >>> store.get_tensor(group_name="n", attr_name="x", index=torch.tensor([2, 0])).tolist()
        [[4.0, 5.0], [0.0, 1.0]]
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> "ZeroCopyFeatureStore":
        return _new_store(cls)

    def __init__(self, mode: ZeroCopyMode = "auto", pad_to_bytes: int = 128, device: str = "cuda") -> None:
        super().__init__()
        check_choice("mode", mode, ("auto", "zero_copy", "staged", "cpu"))
        check_number("pad_to_bytes", pad_to_bytes, low=0, integer=True)
        cuda = torch.cuda.is_available()
        if mode in ("zero_copy", "staged") and not cuda:
            raise ValueError(f"mode={mode!r} needs a CUDA device and none is available here: use mode='cpu' "
                             "(or 'auto', which picks the best path this machine has)")
        self.mode, self.pad_to_bytes, self.device = mode, int(pad_to_bytes), torch.device(device)
        self.resolved_mode: str = mode if mode != "auto" else ("zero_copy" if cuda else "cpu")
        self._checked = mode == "cpu"
        self._init_tables()
        self.stats = IOStats()

    def _prepare(self, tensor: Any) -> Any:
        x = torch.as_tensor(tensor)
        if x.dim() not in (1, 2):
            raise ValueError(f"a feature table must be 1-D (rows) or 2-D (rows, features), got shape "
                             f"{tuple(x.shape)}")
        flat = x.dim() == 1
        x = x.detach().cpu().reshape(x.shape[0], -1).contiguous()
        width, elem = x.shape[1], x.element_size()
        if self.pad_to_bytes and self.pad_to_bytes % elem:
            raise ValueError(f"pad_to_bytes={self.pad_to_bytes} is not a multiple of the {x.dtype} element size "
                             f"({elem} B): use a multiple of {elem}, or 0 for no padding")
        per_row = self.pad_to_bytes // elem if self.pad_to_bytes else 1
        stride = -(-width // per_row) * per_row if width else per_row
        pin = self.resolved_mode != "cpu"
        buf = torch.zeros(x.shape[0], stride, dtype=x.dtype, pin_memory=pin)
        buf[:, :width] = x
        return (buf, width, flat)

    def _rows(self, table: Any) -> int:
        return int(table[0].shape[0])

    def _size(self, table: Any) -> tuple:
        return (int(table[0].shape[0]),) if table[2] else (int(table[0].shape[0]), table[1])

    def row_stride_bytes(self, group_name: Any, attr_name: str) -> int:
        """The padded row stride of a stored table, in bytes."""
        buf = self._tables[(group_name, attr_name)][0]
        return int(buf.stride(0) * buf.element_size())

    def _gather(self, table: Any, index: Optional[Tensor]) -> Tensor:
        buf, width, flat = table
        out = self._gather_rows(buf, width, index)
        return out[:, 0] if flat else out

    def _gather_rows(self, buf: Tensor, width: int, index: Optional[Tensor]) -> Tensor:
        if index is None:
            index = torch.arange(buf.shape[0])
        self.stats.calls += 1
        self.stats.rows += int(index.numel())
        self.stats.bytes += int(index.numel()) * width * buf.element_size()
        if self.resolved_mode == "zero_copy" and not self._checked:
            self._check_zero_copy(buf, width)
        if self.resolved_mode == "zero_copy":
            view = torch.as_tensor(_HostView(buf), device=self.device)
            return view.index_select(0, index.to(self.device))[:, :width]
        rows = buf.index_select(0, index)[:, :width]
        if self.resolved_mode == "staged":
            staging = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
            staging.copy_(rows)
            return staging.to(self.device, non_blocking=True)
        return rows.contiguous()

    def _check_zero_copy(self, buf: Tensor, width: int) -> None:
        probe = torch.randint(0, max(int(buf.shape[0]), 1), (min(64, int(buf.shape[0])),))
        try:
            view = torch.as_tensor(_HostView(buf), device=self.device)
            ok = torch.equal(view.index_select(0, probe.to(self.device)).cpu(), buf.index_select(0, probe))
        except Exception:  # noqa: BLE001 -- any failure of the unified view means: not available here
            ok = False
        self._checked = True
        if not ok:
            if self.mode == "zero_copy":
                raise RuntimeError("zero-copy gathers from pinned host memory do not work on this device "
                                   "(no unified virtual addressing): use mode='staged' or 'auto'")
            self.resolved_mode = "staged"
        self.stats.extra["zero_copy_checked"] = ok


def feature_store_from_data(data: Any, store: Union[ArrayFeatureStore, ZeroCopyFeatureStore, None] = None,
                            attrs: tuple = ("x",)) -> Any:
    """Put the node attributes ``attrs`` of a PyG ``Data``/``HeteroData`` into ``store`` (default: a CPU-mode
    :class:`ZeroCopyFeatureStore` on CPU machines) and return it; pair it with a graph store for PyG's loaders."""
    from torch_geometric.data import HeteroData

    store = store if store is not None else ZeroCopyFeatureStore(mode="auto")
    groups = [(t, data[t]) for t in data.node_types] if isinstance(data, HeteroData) else [(None, data)]
    for group, node_store in groups:
        for attr in attrs:
            if attr in node_store:
                store.put_tensor(node_store[attr], group_name=group, attr_name=attr, index=None)
    return store
