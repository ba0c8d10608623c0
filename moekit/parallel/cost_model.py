"""A back-of-the-envelope model of expert-parallel all-to-all volume and time.

Shape legend: T tokens per GPU per micro-batch, D model dim, K top-k, F expert hidden,
E routed experts, P GPUs, EP = min(P, E) expert-parallel ranks, G GPUs per node, b bytes per
element, M nodes a token may reach (node-limited routing, DeepSeek-V3).

Per MoE layer and GPU, one forward pass moves, in each of the two all-to-alls (dispatch, combine):
    bytes = T * K * D * b * (EP - 1) / EP            (a routed copy leaves the GPU unless its expert is local)
split into NVLink (destinations in the same node) and InfiniBand (other nodes):
    intra = T * K * D * b * (min(EP, G) - 1) / EP,   inter = T * K * D * b * (EP - min(EP, G)) / EP.
With node-limited routing and per-node deduplication (a token crosses InfiniBand once per
destination node, then fans out over NVLink, as DeepSeek-V3's dispatch does), the inter-node
copies per token are min(M, n) * (n - 1) / n with n = EP / G nodes instead of K * (EP - G) / EP,
and the NVLink fan-out inside the destination nodes is K * (G - 1) / G copies per token.
Time of one all-to-all = max(intra / NVLink bandwidth, inter / InfiniBand bandwidth) (the two
links work in parallel), plus a fixed latency. The backward pass repeats both all-to-alls.
Expert compute per GPU does not depend on P: each GPU runs T * K routed rows on average,
2 * 3 * D * F FLOPs each (gate, up, down), plus the shared experts on its own T tokens.
Uniform routing is assumed; skewed routing makes the busiest GPU slower than this.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class LayerShape:
    name: str
    dim: int
    num_experts: int
    top_k: int
    expert_hidden: int
    shared_experts: int = 0
    # Nodes a token may be routed to (node-limited routing); None: unlimited.
    max_nodes: int | None = None

    def __post_init__(self) -> None:
        for field in ("dim", "num_experts", "top_k", "expert_hidden"):
            if getattr(self, field) < 1:
                raise ValueError(f"{self.name}: {field}={getattr(self, field)} must be >= 1")
        if self.top_k > self.num_experts:
            raise ValueError(f"{self.name}: top_k={self.top_k} exceeds num_experts={self.num_experts}")


@dataclass(frozen=True)
class Cluster:
    """Assumed per-GPU, per-direction effective bandwidths (bytes/s) and compute rate (FLOP/s)."""

    gpus_per_node: int = 8
    nvlink_bytes_per_s: float = 150e9
    ib_bytes_per_s: float = 45e9
    latency_s: float = 20e-6
    flops_per_s: float = 400e12
    bytes_per_elem: int = 2


MIXTRAL_8X7B = LayerShape("Mixtral-8x7B", dim=4096, num_experts=8, top_k=2, expert_hidden=14336)
DEEPSEEK_V3 = LayerShape("DeepSeek-V3", dim=7168, num_experts=256, top_k=8, expert_hidden=2048, shared_experts=1,
                         max_nodes=4)
DEEPSEEK_V3_NO_NODE_LIMIT = LayerShape("DeepSeek-V3, no node limit", dim=7168, num_experts=256, top_k=8,
                                       expert_hidden=2048, shared_experts=1)


def all_to_all_estimate(layer: LayerShape, gpus: int, tokens_per_gpu: int = 4096,
                        cluster: Cluster = Cluster()) -> dict[str, float]:
    """Per-GPU bytes and seconds of one MoE layer's forward all-to-alls and expert compute."""
    if gpus < 1 or tokens_per_gpu < 1:
        raise ValueError(f"gpus={gpus} and tokens_per_gpu={tokens_per_gpu} must be >= 1")
    EP = min(gpus, layer.num_experts)
    G = min(EP, cluster.gpus_per_node)
    per_copy = layer.dim * cluster.bytes_per_elem
    copies = tokens_per_gpu * layer.top_k
    nodes = EP / G
    if layer.max_nodes is not None and nodes > 1:
        # One InfiniBand copy per remote destination node, then NVLink fan-out to the K experts.
        inter = tokens_per_gpu * per_copy * min(layer.max_nodes, nodes) * (nodes - 1) / nodes
        intra = copies * per_copy * (G - 1) / G
    else:
        inter = copies * per_copy * (EP - G) / EP
        intra = copies * per_copy * (G - 1) / EP
    one = max(intra / cluster.nvlink_bytes_per_s, inter / cluster.ib_bytes_per_s)
    comm = 2 * (one + cluster.latency_s) if EP > 1 else 0.0
    flops = 2 * 3 * layer.dim * layer.expert_hidden * (copies + tokens_per_gpu * layer.shared_experts)
    compute = flops / cluster.flops_per_s
    return {"gpus": gpus, "ep": EP, "intra_bytes": intra, "inter_bytes": inter,
            "bytes_per_gpu": 2 * (intra + inter), "comm_s": comm, "compute_s": compute,
            "comm_share": comm / (comm + compute)}


def scaling_table(layers: tuple[LayerShape, ...] = (MIXTRAL_8X7B, DEEPSEEK_V3, DEEPSEEK_V3_NO_NODE_LIMIT),
                  gpu_counts: tuple[int, ...] = (8, 16, 32, 64, 128, 256), tokens_per_gpu: int = 4096,
                  cluster: Cluster = Cluster()) -> list[dict[str, float | str]]:
    """One row per (layer, GPU count) with ``all_to_all_estimate``'s fields."""
    return [{"layer": layer.name, **all_to_all_estimate(layer, p, tokens_per_gpu, cluster)}
            for layer in layers for p in gpu_counts]


def format_table(rows: list[dict[str, float | str]]) -> str:
    """Markdown table: GB moved per GPU per layer (forward), milliseconds, communication share."""
    out = ["| layer | GPUs | EP | NVLink MB | IB MB | all-to-all ms | expert ms | comm share |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        out.append(f"| {r['layer']} | {r['gpus']} | {r['ep']} | {2 * r['intra_bytes'] / 1e6:.0f} | "
                   f"{2 * r['inter_bytes'] / 1e6:.0f} | {r['comm_s'] * 1e3:.2f} | {r['compute_s'] * 1e3:.2f} | "
                   f"{r['comm_share']:.0%} |")
    return "\n".join(out)


def assumptions(cluster: Cluster = Cluster()) -> dict[str, float]:
    return asdict(cluster)
