"""AWQ (SPEC §3-4): per block, the scale search on the FP block, scales fused, then the clip search;
the weights so changed are rounded to nearest."""

from collections import defaultdict

from awqflow.stages.block import AWQ_OPTIONS, awq_search
from awqflow.stages.method import Method, round_linears


def awq_block(block, arch, inputs, opts):
    stats = awq_search(block, arch, inputs, opts).stats
    return round_linears(block, arch, opts.quant), stats


def _sig(x: float, digits: int = 4) -> float:
    """4 significant digits: a table that fits the UI's width (0.002151, not 0.0021507504861801863)."""
    return float(f"{x:.{digits}g}")


def scale_table(stats: dict) -> list[dict]:
    """One row per (block, scale group), then one summary row per layer type (seed 000's table)."""
    rows = []
    by_type = defaultdict(list)
    for block, block_stats in sorted(stats.items(), key=lambda kv: int(kv[0])):
        for group, s in block_stats["groups"].items():
            rows.append(
                {
                    "block": int(block),
                    "group": group,
                    "alpha": s["alpha"],
                    "loss_identity": _sig(s["loss_identity"]),
                    "loss": _sig(s["loss"]),
                    "scale_mean": round(s["scale_mean"], 4),
                    "max_over_mean": round(s["scale_max_over_mean"], 3),
                    "share_over_5x_mean": round(s["share_over_5x_mean"], 4),
                }
            )
            by_type[group.split("->")[1]].append(s)
    for group, items in by_type.items():
        n = len(items)
        rows.append(
            {
                "block": "all",
                "group": group,
                "alpha": None,
                "loss_identity": _sig(sum(s["loss_identity"] for s in items) / n),
                "loss": _sig(sum(s["loss"] for s in items) / n),
                "scale_mean": round(sum(s["scale_mean"] for s in items) / n, 4),
                "max_over_mean": round(max(s["scale_max_over_mean"] for s in items), 3),
                "share_over_5x_mean": round(sum(s["share_over_5x_mean"] for s in items) / n, 4),
            }
        )
    return rows


METHOD = Method("awq", awq_block, needs_inputs=True, options=AWQ_OPTIONS, table=scale_table)
