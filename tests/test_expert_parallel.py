"""Expert parallelism on torch.distributed (gloo, processes spawned on loopback).

The workers (moekit.parallel.testing) run the single-process layer on the concatenation of every
rank's tokens and the expert-parallel shard on each rank's own tokens, and record the largest
absolute difference of every compared quantity; fp32, tolerance 1e-5.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch.multiprocessing as mp

from moekit.parallel.testing import CASES, PADDED_CASES, checkpoint_worker, free_port, layer_worker, lifetime_worker

TOL = 1e-5
CASE_NAMES = [c[0] for c in CASES]
PADDED_NAMES = [c[0] for c in PADDED_CASES]
EP2_DP2_CASES = ["dropless", "capacity_probability", "sigmoid_bias", "padded_dropless",
                 "padded_capacity_probability"]


def _spawn(tmp_path_factory, world: int, plan: list) -> list[dict]:
    out = tmp_path_factory.mktemp(f"ep_world{world}")
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.spawn(layer_worker, args=(world, free_port(), str(out), plan), nprocs=world, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return _spawn(tmp_path_factory, 2, [(2, None)])


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    # EP=4 (every rank owns 2 experts), and EP=2 x DP=2 (expert gradients averaged over replicas).
    return _spawn(tmp_path_factory, 4, [(4, None), (2, EP2_DP2_CASES)])


def _check(results: list[dict], key: str) -> None:
    for rank, res in enumerate(results):
        errs = res[key]
        compared = {k: v for k, v in errs.items() if k not in ("rows_received", "any_dropped", "expert_rows",
                                                               "real_slots")}
        assert any(k.startswith("grad:experts.") for k in compared)
        bad = {k: v for k, v in compared.items() if not v <= TOL}
        assert not bad, f"rank {rank} {key}: differs from the single-process layer: {bad}"


@pytest.mark.parametrize("case", CASE_NAMES)
def test_ep2_matches_single_process(world2, case):
    _check(world2, f"ep2/{case}")


@pytest.mark.parametrize("case", PADDED_NAMES)
def test_ep2_padded_matches_single_process(world2, case):
    """token_mask under EP: real tokens' outputs, padding rows (shared experts only), every loss,
    gradient and statistic equal the single-process layer on the same padded batch."""
    _check(world2, f"ep2/{case}")


def test_ep2_lm_with_token_mask_matches_single_process(world2):
    """LM.forward(ids, token_mask=) on an expert-parallel LM (capacity 1.0, drops decided on the
    world's real tokens): logits at real tokens, balancing losses, every gradient and each layer's
    statistics equal the one-process LM on the same padded batch."""
    for rank, res in enumerate(world2):
        errs = dict(res["ep2/lm_padded"])
        assert errs.pop("any_dropped") > 0
        assert any(k.startswith("grad:") and ".experts." in k for k in errs)
        assert any(k.startswith("stats:") for k in errs)
        bad = {k: v for k, v in errs.items() if not v <= TOL}
        assert not bad, f"rank {rank}: the expert-parallel LM differs from the single-process LM: {bad}"


def test_padding_is_never_routed(world2):
    """The experts of both ranks together run exactly the real tokens' K slots each, less the slots
    the single-process layer drops (the drops themselves are compared in the cases above): no
    padding row is sent, dropless or not, even from a rank holding only padding."""
    for case in PADDED_NAMES:
        res = [r[f"ep2/{case}"] for r in world2]
        assert sum(r["expert_rows"] for r in res) == res[0]["real_slots"] - res[0]["any_dropped"] > 0, case
    assert world2[0]["ep2/padded_capacity_position_switch"]["any_dropped"] > 0
    assert world2[0]["ep2/padded_capacity_probability"]["any_dropped"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("case", CASE_NAMES + PADDED_NAMES)
def test_ep4_matches_single_process(world4, case):
    _check(world4, f"ep4/{case}")


@pytest.mark.slow
@pytest.mark.parametrize("case", EP2_DP2_CASES)
def test_ep2_dp2_matches_single_process(world4, case):
    _check(world4, f"ep2/{case}")


def test_cases_cover_idle_rank_and_drops(world2):
    """The awkward cases really happen: a rank receives no rows, and capacity drops slots."""
    last = world2[-1]
    assert last["ep2/dropless_idle_rank"]["rows_received"] == 0
    assert last["ep2/capacity_probability"]["rows_received"] == 0
    assert world2[0]["ep2/dropless_idle_rank"]["rows_received"] > 0
    assert world2[0]["ep2/capacity_probability"]["any_dropped"] > 0
    assert world2[0]["ep2/capacity_position_switch"]["any_dropped"] > 0
    assert "selection_bias" in world2[0]["ep2/sigmoid_bias"]


def test_checkpoint_recomputation_counts_nothing_under_ep(tmp_path):
    """Activation checkpointing re-runs the expert-parallel forward (collectives included) during
    backward: outputs, losses and gradients equal the plain run's, and the statistics count one
    forward, not two (MoE._record skips the recomputation on every rank alike)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.spawn(checkpoint_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        err = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert err.pop("passes") == 1, f"rank {rank}: statistics counted the recomputation"
        assert any(k.startswith("stats:tokens_E") for k in err) and any(k.startswith("grad:experts.") for k in err)
        bad = {k: v for k, v in err.items() if not v <= TOL}
        assert not bad, f"rank {rank}: the checkpointed run differs from the plain run: {bad}"


FAULT_TIMEOUT_S = 5


@pytest.fixture(scope="module")
def fault_drills():
    """Two 2-rank runs at once: in one rank 1 dies (SIGKILL) mid-training, in the other it stops
    answering. Returns {mode: (rank 0's exit code, seconds to exit, its stderr)}."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    code = "from moekit.parallel.testing import fault_main; raise SystemExit(fault_main())"
    runs = {}
    for mode in ("kill", "hang"):
        port = free_port()
        runs[mode] = [subprocess.Popen([sys.executable, "-c", code, str(r), "2", str(port), mode, str(FAULT_TIMEOUT_S)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
                      for r in range(2)]
    start = time.monotonic()
    results = {}
    try:
        for mode, procs in runs.items():
            rc = procs[0].wait(timeout=120)
            results[mode] = (rc, time.monotonic() - start, procs[0].stderr.read())
    finally:
        for procs in runs.values():
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
                p.stderr.close()
    return results


@pytest.mark.parametrize("mode", ["kill", "hang"])
def test_failed_rank_raises_on_others(fault_drills, mode):
    """Rank 0 exits with an error naming the rank, the collective and the cause, within the
    configured timeout plus process start-up (never a silent hang), through the teardown."""
    rc, elapsed, err = fault_drills[mode]
    assert rc == 3, err
    assert "error: rank 0/2: collective" in err
    assert "terminate called" not in err, err
    expected = (f"no answer from a peer rank within the {FAULT_TIMEOUT_S} s timeout" if mode == "hang"
                else "a peer rank died")
    assert expected in err, err
    assert elapsed < 90, f"rank 0 took {elapsed:.0f} s to fail"


@pytest.fixture(scope="module")
def lifetimes(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep_lifetime")
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.spawn(lifetime_worker, args=(2, [free_port() for _ in range(3)], str(out)), nprocs=2, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("mode, outcome", [("ok", 0), ("collective_error", 3),
                                           ("other_error", "ValueError: failed after the forward")])
def test_run_stops_gloo_threads_on_every_path(lifetimes, mode, outcome):
    """TrainerParallel.run joins gloo's threads before it returns or raises, even while the
    sharded model (and, on the ValueError path, a traceback with its autograd graph) is still alive:
    none is left for the interpreter's exit (issue 13's SIGABRT)."""
    for rank, res in enumerate(lifetimes):
        r = res[mode]
        assert r["outcome"] == outcome, (rank, r)
        assert r["threads_running"] >= 2, f"rank {rank}: no gloo threads seen while running: {r}"
        assert r["threads_after"] == 0, f"rank {rank} {mode}: gloo threads still running after the teardown: {r}"
        assert not r["initialized_after"]
        assert re.search(rf"rank {rank}/2: MoE forward needs the process groups, but they were destroyed",
                         r["later_forward"]), r["later_forward"]


def _groups(ep_size: int, world: int = 1, rank: int = 0):
    import torch

    from moekit.parallel import ParallelGroups

    return ParallelGroups(world_size=world, rank=rank, ep_size=ep_size, ep_group=None, dp_group=None,
                          ep_ranks=list(range(ep_size)), dp_ranks=[rank], backend="gloo",
                          device=torch.device("cpu"), timeout_s=10.0)


def test_bad_setups_name_the_problem():
    import torch

    from moekit import ConfigError, MoE
    from moekit.parallel import shard_batch, shard_moe

    with pytest.raises(ConfigError, match=r"num_experts=8 is not divisible by expert_parallel=3"):
        shard_moe(MoE(dim=8, num_experts=8, expert_hidden=8), _groups(3, world=3))
    with pytest.raises(ConfigError, match=r"token-choice router; router.kind='expert_choice'"):
        shard_moe(MoE(dim=8, num_experts=8, expert_hidden=8, router="expert_choice", capacity_factor=1.0), _groups(2))
    with pytest.raises(ValueError, match=r"batch_size=6 is not divisible by the world size 4"):
        shard_batch(torch.zeros(6, 3), _groups(2, world=4))


def test_shard_keeps_this_ranks_contiguous_experts():
    from moekit import MoE
    from moekit.parallel import shard_moe

    layer = MoE(dim=8, num_experts=8, expert_hidden=4)
    full = {name: p.detach().clone() for name, p in layer.experts.named_parameters()}
    router = layer.router
    shard = shard_moe(layer, _groups(4, world=4, rank=2))
    # A transform in place (as fully_shard): the same layer and router, its experts now a slice.
    assert shard is layer and shard.router is router
    assert shard.local_experts == range(4, 6)
    assert shard.experts.gate_up_proj.shape == (2, 8, 8)
    assert (shard.experts.gate_up_proj == full["gate_up_proj"][4:6]).all()
    assert (shard.experts.down_proj == full["down_proj"][4:6]).all()


def test_without_torchrun_the_error_says_how_to_launch(monkeypatch):
    from moekit import ConfigError
    from moekit.parallel import init_parallel

    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ConfigError, match="launch with torchrun"):
        init_parallel(2)
    with pytest.raises(ConfigError, match=r"timeout_s=0 must be a positive number"):
        init_parallel(2, timeout_s=0)
