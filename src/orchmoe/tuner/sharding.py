"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for a `RoutedModel`: sharding, full tensors, state dicts.

Why our own wrapping rather than accelerate's FSDP plugin: accelerate turns FSDP on only for GPU-like
distributed types (a CPU/gloo run silently becomes DDP), and its FSDP1 default rejects units that mix
frozen and trainable parameters, which every adapted layer does. FSDP2 shards each parameter on its own
(frozen and trainable alike, any dtype mix in a unit), on CPU/gloo and GPU/NCCL the same way.

Units: every transformer block (the classes the base model names in ``_no_split_modules``) and the
`RoutedModel` as the root (embeddings, LM head, final norm and the model router: tied embeddings stay
in one unit). The root is lazily initialised at once, so whatever runs first (a training forward, or
`RoutedModel.generate` calling the embedding outside any forward) sees the same structure.

What sharding changes for the caller, and the helpers here that handle it:

* parameters are `DTensor` shards: build the optimizer after `shard_model`;
* reading them whole (saving, diagnostics) is a collective: every rank enters `unsharded(...)`;
* writing them (loading an adapter) goes through `copy_into` (each rank keeps its own shard);
* the optimizer state is gathered and restored by `torch.distributed.checkpoint.state_dict`
  (`full_optimizer_state`, `load_full_optimizer_state`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = [
    "block_modules",
    "copy_into",
    "full_optimizer_state",
    "full_tensor",
    "generation_context",
    "is_sharded",
    "load_full_optimizer_state",
    "local_parameter_count",
    "set_gradient_sync",
    "shard_model",
    "unsharded",
]


def _fsdp_module_class() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed support
        return None
    return FSDPModule


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` is itself an FSDP2 unit (the root after `shard_model`)."""
    cls = _fsdp_module_class()
    return cls is not None and isinstance(module, cls)


def _units(module: nn.Module) -> list[nn.Module]:
    cls = _fsdp_module_class()
    return [] if cls is None else [m for m in module.modules() if isinstance(m, cls)]


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a transformers model: instances of the classes in ``_no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def shard_model(routed: nn.Module, mesh: Any = None, **fully_shard_kwargs: Any) -> nn.Module:
    """Shard a `RoutedModel` in place across the processes of ``mesh`` (default: every process).

    Args:
        routed: the `RoutedModel`, on this process's device, with its adapter initialised identically
            on every process (FSDP keeps each rank's slice of the current values).
        mesh: a 1-D `DeviceMesh`; default: all processes on this device type.
        **fully_shard_kwargs: passed to every ``fully_shard`` call (``mp_policy``, ``offload_policy``, ...).
    Returns:
        ``routed`` itself, now an FSDP2 module whose parameters are `DTensor` shards.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "FSDP sharding needs an initialised process group: launch with torchrun (or accelerate "
            "launch) with several processes"
        )
    if _units(routed):
        raise ValueError("this model is already sharded (fully_shard was applied to it or to one of its modules)")
    if mesh is None:
        device = next(routed.parameters()).device
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in block_modules(routed.get_base_model()):
        fully_shard(block, mesh=mesh, **fully_shard_kwargs)
    fully_shard(routed, mesh=mesh, **fully_shard_kwargs)
    routed._get_fsdp_state()._lazy_init()  # the root is the RoutedModel, whichever unit runs first
    return routed


@contextlib.contextmanager
def unsharded(module: nn.Module, *, recurse: bool = True) -> Iterator[nn.Module]:
    """Within the block the FSDP units of ``module`` hold whole, plain parameters (read-only: changes made to
    them are not written back to the shards). A collective: every rank must enter it. Without FSDP units
    it does nothing.

    Args:
        module: a sharded model (or any module: then a no-op).
        recurse: every unit under ``module`` (default), or only ``module``'s own (for a sharded root: the
            embeddings, head and model router, not the blocks).
    """
    units = _units(module) if recurse else ([module] if is_sharded(module) else [])
    for unit in units:
        unit.unshard()
    try:
        yield module
    finally:
        for unit in units:
            unit.reshard()


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return False
    return isinstance(t, DTensor)


def local_parameter_count(module: nn.Module) -> int:
    """Parameters this process holds: all of them without sharding, about 1/N of them sharded over N processes."""
    return sum((p.to_local() if _is_dtensor(p) else p).numel() for p in module.parameters())


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A `DTensor` gathered whole (a collective), any other tensor as it is."""
    return t.full_tensor() if _is_dtensor(t) else t


def copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """``param.copy_(value)`` for a whole ``value``: a `DTensor` parameter takes its own slice (no communication,
    every rank holds ``value``)."""
    if _is_dtensor(param):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(
            value.to(device=param.device, dtype=param.dtype), param.device_mesh, param.placements, src_data_rank=None
        )
    param.copy_(value)


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """FSDP2's ``no_sync``: gradient accumulation without a reduce-scatter per micro-batch."""
    if is_sharded(model):
        model.set_requires_gradient_sync(sync)


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


def full_optimizer_state(model: nn.Module, optimizer: Any) -> dict:
    """The optimizer state gathered whole and keyed by parameter name, on the main process (others get ``{}``).
    A collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(
        model, _inner(optimizer), options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def load_full_optimizer_state(model: nn.Module, optimizer: Any, state: dict) -> None:
    """Restore `full_optimizer_state`'s output (read by every rank) into a sharded model's optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, _inner(optimizer), state, options=StateDictOptions(full_state_dict=True))


@contextlib.contextmanager
def generation_context(model: nn.Module) -> Iterator[dict]:
    """Around ``generate`` of a sharded `RoutedModel`: the root unit (embeddings, head, model router) whole, since
    the routing and the wrapped model's decoding steps call them outside the root's forward, and the extra
    ``generate`` arguments a sharded model needs (``synced_gpus``: every rank runs as many decoding steps as the
    longest, or the blocks' all-gathers would wait for a rank that stopped). Without sharding: nothing, ``{}``."""
    if not is_sharded(model):
        yield {}
        return
    import torch.distributed as dist

    with unsharded(model, recurse=False):
        yield {"synced_gpus": dist.get_world_size() > 1}
