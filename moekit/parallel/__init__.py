"""Expert parallelism on torch.distributed: experts sharded over an EP process group, tokens
exchanged by all-to-all (GShard, Lepikhin et al. 2020; the layout of DeepSpeed-MoE and
Megatron-Core), composed with data parallelism (DistributedDataParallel on the mesh's dimensions), sharded
checkpoints (``parallel.dcp``: torch.distributed.checkpoint, loadable under any EP size and in one
process) and bounded timeouts.

Nothing here initialises a process group at import; see ``init_parallel``.
"""

from .errors import MoekitDistributedError
from .groups import ParallelGroups, build_groups, destroy_parallel, init_parallel
from .expert_parallel import ExpertParallelMoE, shard_model, shard_moe
from .data_parallel import replicate
from .training import clip_grad_norm, shard_batch

__all__ = ["MoekitDistributedError", "ParallelGroups", "build_groups", "init_parallel", "destroy_parallel",
           "ExpertParallelMoE", "shard_moe", "shard_model", "replicate", "clip_grad_norm",
           "shard_batch"]
