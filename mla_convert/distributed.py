"""Running under a launcher (``torchrun``, ``accelerate launch``): which process this is, and the
few collective steps the commands need.

A launcher starts one process per device and tells each its place through the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` / ``MASTER_PORT``). Without one, every
function here gives the one-process answer and no process group is made, so single-process runs
are untouched. The process group uses NCCL on CUDA and gloo on the CPU.

A rank that fails raises as usual: the command prints its one-line error (naming the rank) and
exits non-zero, and the launcher then stops every other rank (``torchrun`` tears the whole group
down on the first failed worker), so a failure never leaves the others waiting in a collective.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: the CLI names ranks in errors without it
    import torch


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def is_distributed() -> bool:
    return world_size() > 1


def is_main() -> bool:
    return rank() == 0


def device_for_rank(device: torch.device) -> torch.device:
    """A rank's own device: ``cuda`` becomes ``cuda:LOCAL_RANK`` under a launcher."""
    import torch

    if is_distributed() and device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank())
    return device


def init_process_group(device: torch.device) -> None:
    """Join the launcher's process group once (a no-op without a launcher)."""
    import torch

    if not is_distributed() or not torch.distributed.is_available():
        return
    if torch.distributed.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device_for_rank(device))
    torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def _active() -> bool:
    if not is_distributed() or "torch" not in sys.modules:  # no group without torch imported
        return False
    import torch

    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    if _active():
        import torch

        torch.distributed.barrier()


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a chosen file name, a decision)."""
    if not _active():
        return value
    import torch

    holder = [value]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


def gather(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not _active():
        return [value]
    import torch

    values: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def sum_over_ranks(value: float) -> float:
    """The sum of every rank's ``value`` (counters kept per rank: utterances seen, skipped)."""
    return sum(gather(value))


def shutdown() -> None:
    """Leave the process group once every rank is done: a rank that exits while a peer still holds
    its connection can make the peer's gloo transport abort at exit."""
    if _active():
        import torch

        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def is_sharded(module: Any) -> bool:
    """Whether ``module``'s parameters are split across ranks by FSDP (``fully_shard`` or the FSDP1
    wrapper): its forward is then a collective, so every rank must call it equally often."""
    if not _active():
        return False
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return isinstance(module, (FSDPModule, FullyShardedDataParallel))


@contextlib.contextmanager
def own_class(module: Any) -> Iterator[None]:
    """``module`` seen as its own class while it is saved. FSDP2's ``fully_shard`` swaps a model's
    class for a generated ``FSDP<Name>`` subclass defined in torch, and ``save_pretrained`` copies
    the source files of the class's module beside a remote-code model's weights (it would copy
    torch's instead of the model's). Nothing runs forward inside this block."""
    if not is_sharded(module):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    sharded = type(module)
    module.__class__ = next(cls for cls in sharded.__mro__[1:] if not issubclass(cls, FSDPModule))
    try:
        yield
    finally:
        module.__class__ = sharded


def rank_label() -> str:
    """``"rank 1/2: "`` under a launcher (the prefix of a rank's error line), else empty."""
    return f"rank {rank()}/{world_size()}: " if is_distributed() else ""
