"""One error type for every failed or timed-out collective, naming the rank and the operation."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

R = TypeVar("R")


class MoekitDistributedError(RuntimeError):
    """A collective failed on this rank (a peer died, hung past the timeout, or the group broke)."""


def guarded(op: str, fn: Callable[[], R], timeout_s: float | None = None) -> R:
    """Run one collective; a torch/gloo/NCCL failure becomes a MoekitDistributedError naming the
    rank, the operation and the configured timeout."""
    if not dist.is_initialized():
        raise MoekitDistributedError(f"collective {op}: torch.distributed is not initialised (never started, or "
                                     f"torn down by destroy_parallel)")
    try:
        return fn()
    except MoekitDistributedError:
        raise
    except (RuntimeError, ValueError) as err:
        rank = dist.get_rank() if dist.is_initialized() else "?"
        world = dist.get_world_size() if dist.is_initialized() else "?"
        text = str(err)
        limit = f"{timeout_s:g} s" if timeout_s is not None else "process group's"
        if "timed out" in text.lower() or "timeout" in text.lower():
            cause = f"no answer from a peer rank within the {limit} timeout (a rank hung or is far behind)"
        elif "connection" in text.lower() or "closed" in text.lower() or "reset" in text.lower():
            cause = "a peer rank died (its connection closed)"
        else:
            cause = f"a peer rank died, hung past the {limit} timeout or left the group"
        first = text.splitlines()[0] if text else ""
        raise MoekitDistributedError(f"rank {rank}/{world}: collective {op} failed: {cause} "
                                     f"({type(err).__name__}: {first})") from err
