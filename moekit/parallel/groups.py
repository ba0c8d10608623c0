"""Process groups for expert parallelism (EP) combined with data parallelism (DP).

World size N, EP size P (P divides N and the number of experts E). The groups are the dimensions
of a ``torch.distributed.device_mesh.DeviceMesh`` of shape (N/P, P) named ("dp", "ep"), as
torchtitan lays out its parallel dimensions: rank r sits at (r // P, r % P). Ranks are thus split
into N/P EP groups of P contiguous ranks, ``[0..P-1], [P..2P-1], ...``; within an EP group, rank ``j`` holds
experts ``[j*E/P, (j+1)*E/P)``. Ranks holding the same experts (same EP index in different EP
groups) form an expert-DP group: they average their expert gradients. Non-expert parameters are
replicated on all N ranks and averaged over the world.

The backend follows the device: gloo on CPU, NCCL on CUDA. Every collective runs under the
process group's ``timeout``; a dead or hung peer raises ``MoekitDistributedError`` on the others.

Lifetime: ``destroy_process_group()`` alone does not stop gloo's worker threads; they stop when the
last reference to their process group goes. ``ParallelGroups`` holds the only references moekit
keeps (the sharded layers, the state-dict hooks and ``TrainerParallel`` all reach the groups
through one ``ParallelGroups``; the data-parallel wrappers, whose reducers hold groups too, are
dropped by its ``on_close`` callbacks), so ``destroy_parallel`` closes it, destroys the default
group and collects cycles: the threads are joined there and then, while the interpreter is fully
alive. ``torch._dynamo`` must be imported before the first group is made (``moekit.parallel``
does it on import; see ``data_parallel``).
"""

from __future__ import annotations

import datetime
import gc
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..config import ConfigError
from .errors import MoekitDistributedError


@dataclass
class ParallelGroups:
    """This rank's place in the world, EP group and expert-DP group."""

    world_size: int
    rank: int
    ep_size: int
    ep_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None
    ep_ranks: list[int]
    dp_ranks: list[int]
    backend: str
    device: torch.device
    timeout_s: float
    closed: bool = False
    # The ("dp", "ep") device mesh the groups come from (None for groups built by hand, as in tests).
    mesh: DeviceMesh | None = None
    # Callbacks that drop other holders of the groups (the data-parallel wrappers), run by ``close``.
    closers: list[Callable[[], object]] = field(default_factory=list, repr=False)

    def on_close(self, drop: Callable[[], object]) -> None:
        """Have ``close`` call ``drop`` (which releases some other reference to a process group)."""
        self.closers.append(drop)

    def close(self) -> None:
        """Drop this object's references to the mesh and its EP and expert-DP process groups, and
        run the ``on_close`` callbacks (see ``destroy_parallel``); collectives on a closed object
        raise a ``MoekitDistributedError``."""
        closers, self.closers = self.closers, []
        for drop in closers:
            drop()
        self.ep_group = self.dp_group = None
        self.mesh = None
        self.closed = True

    def require_open(self, op: str) -> None:
        """Raise a ``MoekitDistributedError`` naming ``op`` if ``close`` was called."""
        if self.closed:
            raise MoekitDistributedError(f"rank {self.rank}/{self.world_size}: {op} needs the process groups, "
                                         f"but they were destroyed (destroy_parallel / TrainerParallel.close)")

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    @property
    def dp_size(self) -> int:
        return self.world_size // self.ep_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def experts_of(self, num_experts: int, ep_rank: int | None = None) -> range:
        """The global ids of the experts held by ``ep_rank`` (default: this rank)."""
        per = num_experts // self.ep_size
        j = self.ep_rank if ep_rank is None else ep_rank
        return range(j * per, (j + 1) * per)


def default_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _mesh_options(backend: str, timeout: datetime.timedelta) -> dist.ProcessGroup.Options | object:
    """Process-group options carrying ``timeout`` (DeviceMesh passes only these on to new groups)."""
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return options
    return torch._C._distributed_c10d.Backend.Options(backend, timeout)


def build_groups(ep_size: int, timeout_s: float | None = None) -> ParallelGroups:
    """Build the ("dp", "ep") device mesh and its EP and expert-DP groups on an initialised default
    process group; a dimension smaller than the world gets a group with ``timeout_s``.

    Every rank must call this (group creation is collective), in the same order.
    """
    if not dist.is_initialized():
        raise RuntimeError("build_groups needs torch.distributed initialised first (see init_parallel)")
    world, rank = dist.get_world_size(), dist.get_rank()
    if not isinstance(ep_size, int) or ep_size < 1 or world % ep_size != 0:
        raise ConfigError(f"expert_parallel={ep_size!r} must be an int >= 1 dividing the world size {world}")
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    dp = world // ep_size
    override = None
    if timeout_s is not None:
        # A dimension spanning the world uses the default group (and its timeout) as it is.
        options = _mesh_options(backend, datetime.timedelta(seconds=timeout_s))
        override = {name: (backend, options) for name, size in (("dp", dp), ("ep", ep_size)) if size < world}
    mesh = init_device_mesh(device.type, (dp, ep_size), mesh_dim_names=("dp", "ep"), backend_override=override)
    return ParallelGroups(world_size=world, rank=rank, ep_size=ep_size, ep_group=mesh["ep"].get_group(),
                          dp_group=mesh["dp"].get_group(), ep_ranks=mesh["ep"].mesh.tolist(),
                          dp_ranks=mesh["dp"].mesh.tolist(), backend=backend, device=device,
                          timeout_s=timeout_s if timeout_s is not None else 1800.0, mesh=mesh)


def init_parallel(ep_size: int, timeout_s: float = 300.0, backend: str | None = None,
                  init_method: str | None = None, rank: int | None = None,
                  world_size: int | None = None) -> ParallelGroups:
    """Initialise torch.distributed (if needed) and build the groups.

    Under ``torchrun`` the rank, world size and rendezvous come from the environment
    (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). ``backend`` defaults to NCCL when CUDA is
    available (one GPU per local rank) and gloo otherwise. ``timeout_s`` bounds every collective.
    """
    if not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
        raise ConfigError(f"timeout_s={timeout_s!r} must be a positive number of seconds")
    created = not dist.is_initialized()
    if created:
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            # Make a hung NCCL collective raise (on the watchdog) instead of blocking forever.
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        if init_method is None and "MASTER_ADDR" not in os.environ:
            raise ConfigError("no rendezvous for expert parallelism: launch with torchrun (it sets RANK, WORLD_SIZE, MASTER_ADDR, "
                               "MASTER_PORT) or pass init_method='tcp://host:port', rank and world_size")
        kwargs = {} if init_method is None else {"init_method": init_method, "rank": rank, "world_size": world_size}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    try:
        return build_groups(ep_size, timeout_s)
    except BaseException:
        if created:
            destroy_parallel()
        raise


def destroy_parallel(*groups: ParallelGroups) -> None:
    """Tear down torch.distributed on this rank: close ``groups``, destroy every process group and
    collect reference cycles, so that gloo's worker threads are joined now.

    Call it on every path (normal return and error) before the process exits, after the last
    collective has returned. Without it the threads outlive ``destroy_process_group()`` until the
    interpreter finalises; a worker that then frees a tensor still owned by Python (a finished
    all-gather held by a barrier's work list) needs the GIL, which a finalising interpreter no
    longer hands out, and the process aborts ("terminate called without an active exception").
    Idempotent; needs no peer, so it is safe after a peer died.
    """
    for g in groups:
        g.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    # Cycles (modules with hooks, autograd graphs kept by a traceback) may still reach a group.
    gc.collect()
