"""Count the aten operators a piece of code dispatches, and the ones that make the host wait.

A GPU running a small model is launch-bound: the number of operators per step, not their FLOPs,
sets the step time, and one host sync (the CPU waiting for a device result: ``.item()``,
``bool(tensor)``, boolean-mask indexing, ``nonzero``) drains the launch queue. Both can be
counted on a CPU with a dispatch hook below autograd, so regressions show without a GPU::

    with OpCounter() as c:
        model(**batch).loss.backward()
    c.total, c.kernels, c.host_syncs  # ints
    c.sync_sites  # [(operator, "innermost caller outside torch <- its callers")], to find each one
    c.syncs_from("/orchmoe/")  # the syncs whose innermost caller outside torch is in this path

``tensors_from_data`` counts tensors built from Python data (``torch.tensor(...)``): on an
accelerator each is a blocking host-to-device copy. Used by ``benchmarks/ops_count.py`` and
``tests/test_host_sync.py``.
"""

from __future__ import annotations

import traceback
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HOST_SYNC_OPS", "OpCounter"]

_aten = torch.ops.aten

#: operators whose result the host must read (or whose output size depends on the data)
HOST_SYNC_OPS = frozenset(
    {
        _aten._local_scalar_dense.default,  # .item(), int()/float()/bool() of a tensor
        _aten.is_nonzero.default,  # `if tensor:`
        _aten.equal.default,  # torch.equal
        _aten.nonzero.default,  # nonzero, torch.where(cond), boolean-mask indexing
        _aten.masked_select.default,
        _aten._unique2.default,
        _aten.unique_consecutive.default,
        _aten.unique_dim.default,
    }
)
_INDEX_OPS = frozenset(
    {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default, _aten._index_put_impl_.default}
)


def _is_sync(func, args, kwargs) -> bool:
    if func in HOST_SYNC_OPS:
        return True
    if func in _INDEX_OPS:  # a boolean (mask) index hides a nonzero
        indices = args[1] if len(args) > 1 else ()
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())
    if func is _aten.repeat_interleave.Tensor:  # tensor repeats without output_size: summed on the host
        return kwargs.get("output_size") is None
    return False


class OpCounter(TorchDispatchMode):
    """A dispatch mode counting every aten operator that runs inside it, forward and backward.

    Args:
        stacks: keep a short Python stack of each host sync (``sync_sites``), to find where it came from.
        exclude: names of Python functions whose syncs are counted in ``excluded`` instead of ``syncs``:
            checks documented to read a tensor on the host only when it already lives there
            (``RoutedModel._task_ids`` validates CPU task ids on the host, device ones with
            ``torch._assert_async``); on a CPU-only machine every tensor is such a tensor.
    """

    def __init__(self, stacks: bool = True, exclude: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.counts: Counter = Counter()
        self.syncs: Counter = Counter()
        self.excluded: Counter = Counter()
        self.sync_sites: list[tuple[str, str]] = []
        self.stacks, self.exclude = stacks, frozenset(exclude)

    @property
    def total(self) -> int:
        """Every aten operator dispatched, views included."""
        return sum(self.counts.values())

    @property
    def views(self) -> int:
        """Operators that only re-describe memory (no kernel on an accelerator)."""
        return sum(n for f, n in self.counts.items() if f.is_view)

    @property
    def kernels(self) -> int:
        """Operators that are not views: an upper bound on the kernels an accelerator launches."""
        return self.total - self.views

    @property
    def host_syncs(self) -> int:
        return sum(self.syncs.values())

    @property
    def tensors_from_data(self) -> int:
        return self.counts[_aten.lift_fresh.default]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.counts[func] += 1
        if _is_sync(func, args, kwargs):
            if self.exclude and any(f.name in self.exclude for f in traceback.extract_stack()):
                self.excluded[str(func)] += 1
            else:
                self.syncs[str(func)] += 1
                if self.stacks:
                    self.sync_sites.append((str(func), _caller()))
        return func(*args, **kwargs)

    def syncs_from(self, path_fragment: str) -> int:
        """Host syncs whose innermost caller outside torch lives in a file whose path contains this
        (recorded with ``stacks=True``, the default)."""
        return sum(1 for _, site in self.sync_sites if path_fragment in site.split(" <- ")[0].split(":")[0])

    def by_name(self, top: int = 20) -> list[tuple[str, int]]:
        """The most frequent operators (by overload packet), to read where a count comes from."""
        packets: Counter = Counter()
        for f, n in self.counts.items():
            packets[str(f.overloadpacket)] += n
        return packets.most_common(top)


def _caller(depth: int = 4) -> str:
    """The innermost frames outside torch (full path of the first, file names after): who asked for the sync."""
    frames = [
        f
        for f in traceback.extract_stack()
        if "/torch/" not in f.filename.replace("\\", "/") and f.filename != __file__
    ]
    inner = list(reversed(frames[-depth:]))
    return " <- ".join(
        f"{f.filename if i == 0 else f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for i, f in enumerate(inner)
    )
