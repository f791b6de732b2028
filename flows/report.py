"""What a run shows in the Prefect UI: per-layer scale statistics and the run report."""

from collections import defaultdict


def _sig(x: float, digits: int = 4) -> float:
    """4 significant digits: a table that fits the UI's width (0.002151, not 0.0021507504861801863)."""
    return float(f"{x:.{digits}g}")


def scale_table(stats: dict) -> list[dict]:
    """One row per (block, scale group), then one summary row per layer type (seed 000's table)."""
    rows = []
    by_type = defaultdict(list)
    for block, block_stats in sorted(stats.items(), key=lambda kv: int(kv[0])):
        for group, s in block_stats["groups"].items():
            rows.append({"block": int(block), "group": group, "alpha": s["alpha"],
                         "loss_identity": _sig(s["loss_identity"]), "loss": _sig(s["loss"]),
                         "scale_mean": round(s["scale_mean"], 4),
                         "max_over_mean": round(s["scale_max_over_mean"], 3),
                         "share_over_5x_mean": round(s["share_over_5x_mean"], 4)})
            by_type[group.split("->")[1]].append(s)
    for group, items in by_type.items():
        n = len(items)
        rows.append({"block": "all", "group": group, "alpha": None,
                     "loss_identity": _sig(sum(s["loss_identity"] for s in items) / n),
                     "loss": _sig(sum(s["loss"] for s in items) / n),
                     "scale_mean": round(sum(s["scale_mean"] for s in items) / n, 4),
                     "max_over_mean": round(max(s["scale_max_over_mean"] for s in items), 3),
                     "share_over_5x_mean": round(sum(s["share_over_5x_mean"] for s in items) / n, 4)})
    return rows


def markdown_report(model: str, out: str, opts, size_before: int, size_after: int, timings: dict,
                    table: dict, pictures: dict | None = None, work: tuple[str, int] | None = None) -> str:
    """pictures: {title: image URL or path} (flows/plots.py), shown after the perplexity table;
    work: (work dir, bytes it holds: activation store + block cache)."""
    lines = [f"# AWQ run: `{model}` -> `{out}`", "",
             f"method **{opts.method}**, w{opts.w_bit}, group {opts.group_size}, zero point {opts.zero_point}, "
             f"mode {opts.mode}, format {opts.format}", "",
             f"size {size_before / 2**20:.1f} MiB -> {size_after / 2**20:.1f} MiB "
             f"({size_before / max(size_after, 1):.2f}x smaller)", ""]
    if work:
        lines += [f"work dir `{work[0]}` (activations + block cache, reused by reruns): {work[1] / 2**20:.1f} MiB", ""]
    if table:
        first = next(iter(table.values()))
        lines += [f"## Perplexity ({first['windows']} windows x {first['seqlen']} tokens)", "",
                  "| model | ppl |", "|---|---|"]
        lines += [f"| {label} | {r['ppl']:.3f} |" for label, r in table.items()]
        lines.append("")
    if pictures:
        lines += ["## Plots", ""]
        lines += [f"![{title}]({src})\n" for title, src in pictures.items()]
    lines += ["## Time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    return "\n".join(lines) + "\n"
