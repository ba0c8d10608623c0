"""Arithmetic of the all-to-all cost model (moekit.parallel.cost_model), recomputed by hand."""

import pytest

from moekit.parallel.cost_model import (DEEPSEEK_V3, DEEPSEEK_V3_NO_NODE_LIMIT, MIXTRAL_8X7B, Cluster, LayerShape,
                                        all_to_all_estimate, format_table, scaling_table)


def test_mixtral_one_node():
    c = Cluster()
    est = all_to_all_estimate(MIXTRAL_8X7B, 8, tokens_per_gpu=4096, cluster=c)
    copy_bytes = 4096 * 2                      # dim * bf16
    intra = 4096 * 2 * copy_bytes * 7 / 8      # T * K copies, 7 of 8 destinations remote
    assert est["ep"] == 8
    assert est["intra_bytes"] == pytest.approx(intra)
    assert est["inter_bytes"] == 0
    assert est["comm_s"] == pytest.approx(2 * (intra / 150e9 + 20e-6))
    assert est["compute_s"] == pytest.approx(2 * 3 * 4096 * 14336 * 4096 * 2 / 400e12)
    assert est["comm_share"] == pytest.approx(est["comm_s"] / (est["comm_s"] + est["compute_s"]))


def test_ep_capped_by_experts_and_single_gpu_is_free():
    assert all_to_all_estimate(MIXTRAL_8X7B, 64)["ep"] == 8
    one = all_to_all_estimate(MIXTRAL_8X7B, 1)
    assert one["comm_s"] == 0 and one["bytes_per_gpu"] == 0


def test_node_limited_routing_crosses_infiniband_once_per_node():
    T, copy_bytes = 1000, 7168 * 2
    est = all_to_all_estimate(DEEPSEEK_V3, 16, tokens_per_gpu=T)    # 2 nodes: one remote node per token
    assert est["inter_bytes"] == pytest.approx(T * copy_bytes * 2 * (1 / 2))
    est = all_to_all_estimate(DEEPSEEK_V3, 256, tokens_per_gpu=T)   # 32 nodes, at most 4 reached
    assert est["inter_bytes"] == pytest.approx(T * copy_bytes * 4 * 31 / 32)
    free = all_to_all_estimate(DEEPSEEK_V3_NO_NODE_LIMIT, 256, tokens_per_gpu=T)
    assert free["inter_bytes"] == pytest.approx(T * 8 * copy_bytes * (256 - 8) / 256)
    assert est["inter_bytes"] < free["inter_bytes"]


def test_table_and_bad_input():
    rows = scaling_table(gpu_counts=(8, 16))
    assert [r["gpus"] for r in rows] == [8, 16] * 3
    assert format_table(rows).count("\n") == len(rows) + 1
    with pytest.raises(ValueError, match="top_k=9 exceeds num_experts=8"):
        LayerShape("bad", dim=8, num_experts=8, top_k=9, expert_hidden=8)
    with pytest.raises(ValueError, match="gpus=0"):
        all_to_all_estimate(MIXTRAL_8X7B, 0)


def test_scaling_doc_runs_and_shows_the_generated_table(capsys):
    """docs/scaling.md's python blocks run (one with a world-size-1 process group), and its cost
    table is the one ``format_table(scaling_table())`` prints."""
    from doc_blocks import ROOT, python_blocks

    path = ROOT / "docs" / "scaling.md"
    blocks = python_blocks(path)
    assert len(blocks) == 2
    for i, block in enumerate(blocks):  # each block in its own namespace
        exec(compile(block, f"scaling.md[block {i}]", "exec"), {})
    doc = path.read_text()
    assert format_table(scaling_table()) in doc
    assert "torchrun --standalone --nproc-per-node 2 -m moekit train" in doc
