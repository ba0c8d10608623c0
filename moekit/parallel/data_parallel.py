"""Data parallelism for an expert-parallel model: ``DistributedDataParallel`` on the ("dp", "ep")
device mesh, one wrapper per parameter set, as torchtitan applies FSDP2 per dimension.

Convention (as ``DistributedDataParallel`` alone): every rank's loss is its local objective (mean
over its own tokens, plus the global balancing losses) and gradients are *averaged* over the N
ranks of the world.

  * Non-expert parameters are replicated on all N ranks: one DDP over the world (the default
    process group, the whole mesh) averages them, with the expert shards ignored.
  * An expert shard is replicated only over its expert-DP group (the mesh's "dp" dimension, N/P
    ranks). Its gradient already holds the contributions of every rank of its EP group (the
    all-to-all's backward brought them), so the average over the world is its sum over the dp
    dimension divided by N, not by N/P: a DDP over the dp group wraps each layer's experts module,
    with a communication hook that sums and divides by N.

With equal per-rank batches this is the single-process gradient of the mean loss over the whole
batch (tests/test_expert_parallel.py checks it at 1e-5 for EP=2, EP=4 and EP=2 x DP=2).

Lifetime. A DDP's reducer holds its process group, and gloo joins its threads only when the last
reference to a group goes (``groups.destroy_parallel``). The wrappers are therefore reachable only
from moekit objects that ``ParallelGroups.close`` clears: the returned world wrapper (keep it in
``TrainerParallel``, not in a long-lived variable of your own) and each layer's experts wrapper,
which ``close`` drops. A second, hidden holder: importing ``torch._dynamo`` (DDP's constructor
does) *after* a process group exists keeps references to that group for the life of the process;
this module imports it first, so import ``moekit.parallel`` before ``init_process_group``
(``init_parallel`` and the test workers do).
"""

# No ``from __future__ import annotations``: DDP checks the communication hook's annotations as objects.
import contextlib
from collections.abc import Iterator

# Before any process group exists: see "Lifetime" above.
import torch._dynamo  # noqa: F401
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .expert_parallel import ExpertParallelMoE
from .groups import ParallelGroups


def _sum_then_scale_hook(state: tuple[dist.ProcessGroup, float],
                         bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: all-reduce (sum) the bucket over ``group``, then multiply by ``scale``."""
    group, scale = state
    buffer = bucket.buffer()
    work = dist.all_reduce(buffer, group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0].mul_(scale))


def replicate(model: nn.Module, groups: ParallelGroups) -> DistributedDataParallel:
    """Make the gradients of an expert-parallel ``model`` (``shard_model``) average over the world:
    wrap each layer's experts in a DDP over the expert-DP group and return a DDP over the world for
    the rest. Run training forwards through the returned wrapper; ``model`` keeps its state-dict keys.

    Collective (DDP checks shapes and broadcasts rank 0's parameters and buffers); every rank calls
    it in the same order. The experts wrappers look for unused parameters (a rank whose EP group
    sends it no rows may give its experts no gradient); the world wrapper expects every trainable
    non-expert parameter to get a gradient on every step (DDP raises on the next step otherwise).
    """
    groups.require_open("replicate (data parallelism)")
    ignored: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, ExpertParallelMoE):
            ignored += [f"{name}.experts.{p}" if name else f"experts.{p}" for p, _ in module.experts.named_parameters()]
            if getattr(module, "_dp_experts", None) is not None:
                continue
            inner = DistributedDataParallel(module.experts, process_group=groups.dp_group, forward_sync_buffers=False,
                                            find_unused_parameters=True)
            inner.register_comm_hook((groups.dp_group, 1.0 / groups.world_size), _sum_then_scale_hook)
            # A plain attribute, not a submodule: the layer's state-dict keys stay the same.
            object.__setattr__(module, "_dp_experts", inner)
            groups.on_close(lambda module=module: module.__dict__.pop("_dp_experts", None))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    return DistributedDataParallel(model, forward_sync_buffers=False)


@contextlib.contextmanager
def no_sync(wrapper: DistributedDataParallel) -> Iterator[None]:
    """Accumulate gradients locally (no communication) in both the world wrapper and every experts
    wrapper inside it: for all micro-batches of a step but the last."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(wrapper.no_sync())
        for module in wrapper.module.modules():
            inner = module.__dict__.get("_dp_experts")
            if inner is not None:
                stack.enter_context(inner.no_sync())
        yield
