"""Multi-process checks of the expert-parallel layer against the single-process layer, run by
tests/test_expert_parallel.py in processes it spawns on loopback (gloo).

Each worker builds the same reference layer (same seed), runs it on the concatenation of every
rank's tokens, runs its expert-parallel shard on its own tokens, and writes the largest
differences per quantity to ``out_dir/rank<r>.json``; the test asserts on them.

Objective compared: J = sum_r <out_r, g_r> + N * aux, with gradients averaged over the N ranks
(so parameter gradients are compared with dJ/dtheta / N, input gradients with dJ/dx).
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..layer import MoE
from ..model_ops import aux_loss as model_aux_loss
from .errors import MoekitDistributedError
from .expert_parallel import shard_model, shard_moe
from .groups import ParallelGroups, build_groups, destroy_parallel
from .data_parallel import replicate
from .training import TrainerParallel

# Cases: (name, MoE keywords, experts to mask, input batch shape per rank (B, S)).
CASES: list[tuple[str, dict[str, Any], list[int], tuple[int, int]]] = [
    ("dropless", dict(top_k=2, aux_loss_coef=0.01, z_loss_coef=1e-3, seq_aux_loss_coef=0.1, shared_experts=1),
     [], (2, 5)),
    ("dropless_idle_rank", dict(top_k=2, aux_loss_coef=0.01), "last_rank+1", (2, 4)),
    ("capacity_probability", dict(top_k=2, capacity_factor=1.0, drop_policy="probability", aux_loss_coef=0.01,
                                  cv_loss_coef=0.01), "last_rank+1", (2, 6)),
    ("capacity_position_switch", dict(router="switch", capacity_factor=0.8, drop_policy="position",
                                      aux_loss_convention="switch", aux_loss_coef=0.01), [], (3, 4)),
    ("sigmoid_bias", dict(router="sigmoid_topk", top_k=2, bias_update_rate=0.01, aux_loss_coef=0.01,
                          aux_loss_convention="megatron",
                          seq_aux_loss_coef=0.05), [], (2, 5)),
    # Per-sequence (switch_group) and pooled over layers (mixtral, in model_ops.aux_loss) under the reduce hook.
    ("switch_group", dict(top_k=2, aux_loss_convention="switch_group", aux_loss_coef=0.01), [], (2, 5)),
    ("mixtral", dict(top_k=2, aux_loss_convention="mixtral", aux_loss_coef=0.01), [], (2, 5)),
]
# Padded cases (``token_mask``): (name, case of CASES whose layer and input they take, padding). Padding
# "random": right padding, each sequence of random length 0..S; "last_rank_empty": the same, with every
# token of the last rank padding (it joins the collectives with zero rows).
PADDED_CASES: list[tuple[str, str, str]] = [
    ("padded_dropless", "dropless", "random"),
    ("padded_capacity_probability", "capacity_probability", "random"),
    ("padded_capacity_position_switch", "capacity_position_switch", "last_rank_empty"),
    ("padded_mixtral", "mixtral", "last_rank_empty"),
]
DIM, EXPERTS, HIDDEN = 8, 8, 12


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_loopback(rank: int, world: int, port: int, timeout_s: float = 60.0) -> None:
    """Initialise a gloo process group on 127.0.0.1 with one thread per process."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def _masked(spec: Any, ep_size: int) -> list[int]:
    if spec == "last_rank+1":
        per = EXPERTS // ep_size
        # Every expert of the last EP rank (that rank receives no rows) and expert 1 (zero tokens).
        return sorted(set(range(EXPERTS - per, EXPERTS)) | {1})
    return list(spec)


def _token_mask(padding: str | None, N: int, B: int, S: int) -> torch.Tensor | None:
    """(N*B, S) bool, True at real tokens (right padding), the same on every rank; None: no padding."""
    if padding is None:
        return None
    lengths = torch.randint(0, S + 1, (N * B,), generator=torch.Generator().manual_seed(7))
    lengths[0] = S  # at least one real token
    if padding == "last_rank_empty":
        lengths[(N - 1) * B:] = 0
    return torch.arange(S)[None, :] < lengths[:, None]


def run_case(name: str, kwargs: dict[str, Any], mask_spec: Any, bs: tuple[int, int], groups: ParallelGroups,
             padding: str | None = None) -> dict[str, float]:
    """The compared quantities of one case; with ``padding``, both layers get the same token mask and
    the objective reads real tokens' outputs only (padding rows' outputs are compared on their own:
    under EP they are the shared experts' output alone, no routed expert ran on them)."""
    N, rank, ep_size = groups.world_size, groups.rank, groups.ep_size
    torch.manual_seed(1234)
    ref = MoE(dim=DIM, num_experts=EXPERTS, expert_hidden=HIDDEN, **kwargs)
    masked = _masked(mask_spec, ep_size)
    if masked:
        if len(masked) > EXPERTS - ref.top_k:
            masked = masked[:EXPERTS - ref.top_k]
        ref.mask_experts(masked)
    ep = shard_moe(copy.deepcopy(ref), groups)
    B, S = bs
    x_all = torch.randn(N * B, S, DIM, requires_grad=True)
    g_all = torch.randn(N * B, S, DIM)
    mask_all = _token_mask(padding, N, B, S)
    real_all = torch.ones(N * B, S, 1) if mask_all is None else mask_all[..., None].float()
    out_ref = ref(x_all, mask_all)
    aux_ref = model_aux_loss(ref)  # the layer's losses, plus its pooled mixtral loss where configured
    J = (out_ref * real_all * g_all).sum() + N * aux_ref
    J.backward()

    rows = slice(rank * B, (rank + 1) * B)
    x = x_all.detach()[rows].clone().requires_grad_(True)
    mask = None if mask_all is None else mask_all[rows]
    expert_rows = []
    counting = ep.experts.register_forward_hook(lambda m, args, out: expert_rows.append(args[0].shape[0]))
    # Gradients averaged by DistributedDataParallel during backward (world and expert-DP wrappers).
    wrapper = replicate(ep, groups)
    out = wrapper(x) if mask is None else wrapper(x, mask)
    counting.remove()
    aux_ep = model_aux_loss(ep)
    ((out * real_all[rows] * g_all[rows]).sum() + aux_ep).backward()

    ids = groups.experts_of(EXPERTS)
    err = {
        "output": _max_err(out * real_all[rows], out_ref[rows] * real_all[rows]),
        "input_grad": _max_err(x.grad, x_all.grad[rows]),
        "aux_loss": _max_err(ep.aux_loss, ref.aux_loss),
        "model_aux_loss": _max_err(aux_ep, aux_ref),
    }
    for key, value in ref.last_losses.items():
        err[f"loss_{key}"] = _max_err(ep.last_losses[key], value)
    ep_params = dict(ep.named_parameters())
    for pname, p in ref.named_parameters():
        expected = p.grad / N
        if pname.startswith("experts."):
            expected = expected[ids.start:ids.stop]
        got = ep_params[pname].grad
        err[f"grad:{pname}"] = _max_err(got, expected) if got is not None else float("inf")
    rep_ref, rep_ep = ref.report(), ep.report()
    for field in ("tokens_per_expert", "coactivation"):
        err[f"stats:{field}"] = _max_err(torch.tensor(getattr(rep_ep, field)), torch.tensor(getattr(rep_ref, field)))
    for field in ("assignments", "dropped", "mean_entropy", "mean_router_z"):
        err[f"stats:{field}"] = abs(getattr(rep_ep, field) - getattr(rep_ref, field))
    if ref.router.selection_bias is not None:
        ref.update_selection_bias()
        ep.update_selection_bias()
        err["selection_bias"] = _max_err(ep.router.selection_bias, ref.router.selection_bias)
        err["selection_bias_moved"] = 0.0 if bool(ref.router.selection_bias.abs().sum() > 0) else float("inf")
    full = ep.state_dict()
    err["state_dict_full"] = max(_max_err(full[k], v) for k, v in ref.state_dict().items())
    fresh = shard_moe(copy.deepcopy(MoE(dim=DIM, num_experts=EXPERTS, expert_hidden=HIDDEN, **kwargs)), groups)
    fresh.load_state_dict(ref.state_dict())
    err["state_dict_load_slice"] = max(_max_err(p, ep_params[k]) for k, p in fresh.named_parameters())
    # The groups are the dims of a ("dp", "ep") DeviceMesh: EP groups of contiguous ranks.
    mesh = groups.mesh
    P = groups.ep_size
    layout_ok = (mesh is not None and mesh.mesh_dim_names == ("dp", "ep") and tuple(mesh.mesh.shape) == (N // P, P)
                 and groups.ep_ranks == list(range(rank - rank % P, rank - rank % P + P))
                 and groups.dp_ranks == list(range(rank % P, N, P)))
    err["mesh_layout"] = 0.0 if layout_ok else float("inf")
    err["rows_received"] = float(sum(ep.stats.tokens_E[ids.start:ids.stop]))
    err["any_dropped"] = float(ref.report().dropped)
    err["expert_rows"] = float(sum(expert_rows))
    if mask is not None:
        with torch.no_grad():
            pad = ~mask
            shared = ep.shared_experts(x[pad]) if ep.shared_experts is not None else torch.zeros_like(x[pad])
            err["padding_output"] = _max_err(out.detach()[pad], shared)
        err["real_slots"] = float(mask_all.sum() * ref.top_k)
    return err


def run_lm_padded(groups: ParallelGroups) -> dict[str, float]:
    """A two-layer MoE LM (capacity 1.0, so padding would take capacity if it counted) on a
    right-padded batch with ``token_mask``: the expert-parallel LM on each rank's rows against the
    LM on the world's rows; objective: the masked next-token cross-entropy sum plus the balancing
    losses (gradients averaged over the ranks, as in ``run_case``). Logits compared at real tokens."""
    from ..config import moe_config
    from ..lm import LM, LMConfig

    N, rank = groups.world_size, groups.rank
    V, B, S = 32, 2, 6
    torch.manual_seed(5)
    moe = moe_config(dim=DIM, num_experts=EXPERTS, expert_hidden=HIDDEN, top_k=2, capacity_factor=1.0,
                     aux_loss_coef=0.01, z_loss_coef=1e-3)
    ref = LM(LMConfig(vocab_size=V, dim=DIM, n_layers=2, n_heads=2, ffn_hidden=16, max_seq_len=S, moe=moe))
    ep = shard_model(copy.deepcopy(ref), groups)
    ids_all = torch.randint(0, V, (N * B, S), generator=torch.Generator().manual_seed(3))
    mask_all = _token_mask("random", N, B, S)
    assert mask_all is not None

    def objective(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1),
                                               reduction="none")
        return (ce * mask[:, 1:].reshape(-1)).sum()

    logits_ref = ref(ids_all, token_mask=mask_all)
    aux_ref = model_aux_loss(ref)
    (objective(logits_ref, ids_all, mask_all) + N * aux_ref).backward()
    rows = slice(rank * B, (rank + 1) * B)
    wrapper = replicate(ep, groups)
    logits = wrapper(ids_all[rows], token_mask=mask_all[rows])
    aux_ep = model_aux_loss(ep)
    (objective(logits, ids_all[rows], mask_all[rows]) + aux_ep).backward()
    real = mask_all[rows][..., None]
    err = {"output": _max_err(logits * real, logits_ref[rows] * real), "aux_loss": _max_err(aux_ep, aux_ref)}
    ep_params = dict(ep.named_parameters())
    for pname, p in ref.named_parameters():
        expected = p.grad / N
        if ".experts." in pname:
            ids = groups.experts_of(EXPERTS)
            expected = expected[ids.start:ids.stop]
        got = ep_params[pname].grad
        err[f"grad:{pname}"] = _max_err(got, expected) if got is not None else float("inf")
    for (name, a), (_, b) in zip(_moe_layers(ep), _moe_layers(ref)):
        err[f"stats:{name}"] = _max_err(torch.tensor(a.report().tokens_per_expert),
                                        torch.tensor(b.report().tokens_per_expert))
    err["any_dropped"] = float(sum(layer.report().dropped for _, layer in _moe_layers(ref)))
    return err


def _moe_layers(model: torch.nn.Module) -> list[tuple[str, MoE]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoE)]


def layer_worker(rank: int, world: int, port: int, out_dir: str, plan: list[tuple[int, list[str] | None]]) -> None:
    """Entry point for torch.multiprocessing.spawn: for each (EP size, case names or None for
    all cases) of ``plan``, run those cases."""
    init_loopback(rank, world, port)
    results: dict[str, dict[str, float]] = {}
    start = time.perf_counter()
    built = []
    for ep_size, names in plan:
        built.append(build_groups(ep_size, timeout_s=60.0))
        for name, kwargs, mask_spec, bs in CASES:
            if names is None or name in names:
                results[f"ep{ep_size}/{name}"] = run_case(name, kwargs, mask_spec, bs, built[-1])
        cases = {c[0]: c for c in CASES}
        for name, base, padding in PADDED_CASES:
            if names is None or name in names:
                _, kwargs, mask_spec, bs = cases[base]
                results[f"ep{ep_size}/{name}"] = run_case(name, kwargs, mask_spec, bs, built[-1], padding)
        if names is None or "lm_padded" in names:
            results[f"ep{ep_size}/lm_padded"] = run_lm_padded(built[-1])
    destroy_parallel(*built)
    results["_time_s"] = {"total": time.perf_counter() - start}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def fault_main(argv: list[str] | None = None) -> int:
    """One rank of a fault drill: ``RANK WORLD PORT MODE TIMEOUT_S``. Every rank trains an
    expert-parallel layer under ``TrainerParallel.run``; at step 2 rank 1 kills itself (MODE=kill)
    or stops answering (MODE=hang). The other ranks must print one error line and return 3 within
    the timeout, through the teardown (the exit code for ``sys.exit``)."""
    import signal
    import sys

    rank, world, port, mode, timeout_s = sys.argv[1:6] if argv is None else argv
    rank, world, port, timeout_s = int(rank), int(world), int(port), float(timeout_s)
    init_loopback(rank, world, port, timeout_s)
    parallel = TrainerParallel(build_groups(world, timeout_s=timeout_s))

    def train() -> int:
        torch.manual_seed(0)
        layer = parallel.setup_model(MoE(dim=DIM, num_experts=EXPERTS, expert_hidden=HIDDEN, top_k=2))
        for step in range(1000):
            if rank == 1 and step == 2:
                if mode == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(3600)
            out = parallel.train_module(torch.randn(4, DIM))
            (out.square().sum() + layer.aux_loss).backward()
        return 0

    return parallel.run(train)


GLOO_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop")


def gloo_threads() -> int:
    """How many of gloo's threads (worker loops and transport loops, by name) this process runs (Linux)."""
    count = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            count += (task / "comm").read_text().strip() in GLOO_THREADS
        except FileNotFoundError:  # the thread ended while we looked
            continue
    return count


def lifetime_worker(rank: int, world: int, ports: list[int], out_dir: str) -> None:
    """Entry point for torch.multiprocessing.spawn: three ``TrainerParallel.run`` calls, each on fresh
    process groups, whose step (forward and backward through the DistributedDataParallel wrappers,
    clipping, full state-dict gathers, a barrier) returns 0, raises a MoekitDistributedError, or raises a ValueError after the forward
    (its autograd graph, which holds the EP group, still alive in the traceback). Records gloo's
    thread count before and after each run, what ``run`` gave, and the error a later forward raises."""
    results: dict[str, dict[str, Any]] = {}
    for mode, port in zip(("ok", "collective_error", "other_error"), ports):
        init_loopback(rank, world, port)
        parallel = TrainerParallel(build_groups(world, timeout_s=60.0))
        torch.manual_seed(0)
        model = parallel.setup_model(MoE(dim=DIM, num_experts=EXPERTS, expert_hidden=HIDDEN, top_k=2))

        def step() -> int:
            # Through the DistributedDataParallel wrappers, whose reducers hold the groups too.
            out = parallel.train_module(torch.randn(4, DIM))
            if mode == "other_error":
                raise ValueError("failed after the forward")
            (out.square().sum() + model.aux_loss).backward()
            parallel.clip(model, list(model.parameters()), 1.0)
            model.state_dict()
            dist.barrier()
            if mode == "collective_error":
                raise MoekitDistributedError("drill")
            return 0

        running = gloo_threads()
        try:
            outcome: Any = parallel.run(step)
            after = gloo_threads()
        except ValueError as err:
            outcome, after = f"ValueError: {err}", gloo_threads()
        try:
            model(torch.randn(4, DIM))
            later = ""
        except MoekitDistributedError as err:
            later = str(err)
        results[mode] = {"threads_running": running, "threads_after": after, "outcome": outcome,
                         "initialized_after": dist.is_initialized(), "later_forward": later}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def checkpoint_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Entry point for torch.multiprocessing.spawn: the same expert-parallel layer run plainly and
    under activation checkpointing (non-reentrant: its recomputation runs the forward, collectives
    included, a second time during backward). Records the largest differences of the outputs, the
    losses, every gradient and every statistics buffer, and the number of counted forwards."""
    from torch.utils.checkpoint import checkpoint

    init_loopback(rank, world, port)
    groups = build_groups(world, timeout_s=60.0)
    torch.manual_seed(0)
    base = MoE(dim=DIM, num_experts=EXPERTS, expert_hidden=HIDDEN, top_k=2, aux_loss_coef=0.01, z_loss_coef=1e-3,
               capacity_factor=1.0)
    plain, ckpt = shard_moe(copy.deepcopy(base), groups), shard_moe(copy.deepcopy(base), groups)
    torch.manual_seed(100 + rank)
    x = torch.randn(2, 5, DIM)
    out_p = plain(x)
    (out_p.square().sum() + plain.aux_loss).backward()
    out_c = checkpoint(ckpt, x, use_reentrant=False)
    (out_c.square().sum() + ckpt.aux_loss).backward()
    err = {"output": _max_err(out_c, out_p), "aux_loss": _max_err(ckpt.aux_loss, plain.aux_loss)}
    grads_p = dict(plain.named_parameters())
    for name, p in ckpt.named_parameters():
        err[f"grad:{name}"] = _max_err(p.grad, grads_p[name].grad)
    bufs_p = dict(plain.stats.named_buffers())
    for name, buf in ckpt.stats.named_buffers():
        err[f"stats:{name}"] = _max_err(buf.double(), bufs_p[name].double())
    err["passes"] = float(ckpt.stats.passes)
    destroy_parallel(groups)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(err))


def dcp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Entry point for torch.multiprocessing.spawn: train an EP=world layer one step (AdamW), save it
    with ``save_dcp``, then load the folder into a fresh layer under EP=1 (world x 1 mesh) with
    ``load_dcp_parallel``. Rank 0 writes the gathered reference (model state, full expert moments)
    to ``out_dir/reference.pt``; every rank records its largest difference after the reload."""
    from .dcp import load_dcp_parallel, save_dcp
    from .expert_parallel import gather_experts

    init_loopback(rank, world, port)
    ep_groups = build_groups(world, timeout_s=60.0)
    torch.manual_seed(0)
    kwargs = dict(dim=DIM, num_experts=EXPERTS, expert_hidden=HIDDEN, top_k=2, aux_loss_coef=0.01)
    layer = shard_model(MoE(**kwargs), ep_groups)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    wrapper = replicate(layer, ep_groups)
    torch.manual_seed(100 + rank)
    (wrapper(torch.randn(6, DIM)).square().sum() + layer.aux_loss).backward()
    optimizer.step()
    del wrapper
    folder = save_dcp(Path(out_dir), 1, layer, optimizer, {"note": "dcp test"}, ep_groups)
    full = layer.state_dict()
    moments = {f"{n}.{k}": (gather_experts(v, ep_groups) if n.startswith("experts.") else v)
               for n, p in layer.named_parameters() for k, v in optimizer.state[p].items() if k != "step"}
    if rank == 0:
        torch.save({"model": full, "moments": moments}, Path(out_dir, "reference.pt"))

    dp_groups = build_groups(1, timeout_s=60.0)
    torch.manual_seed(1)
    fresh = shard_model(MoE(**kwargs), dp_groups, sync=False)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=5.0)
    record = load_dcp_parallel(folder, fresh, fresh_opt, dp_groups)
    err = {"model": max(_max_err(v, full[k]) for k, v in fresh.state_dict().items()),
           "moments": max(_max_err(fresh_opt.state[p][k], moments[f"{n}.{k}"])
                          for n, p in fresh.named_parameters() for k in ("exp_avg", "exp_avg_sq")),
           "step": abs(float(fresh_opt.state[next(fresh.parameters())]["step"]) - 1.0),
           "lr": abs(fresh_opt.param_groups[0]["lr"] - 1e-2),
           "meta": 0.0 if record["meta"] == {"note": "dcp test"} and record["step"] == 1 else float("inf"),
           "expert_rows_here": float(fresh.experts.gate_up_proj.shape[0])}
    destroy_parallel(ep_groups, dp_groups)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(err))
