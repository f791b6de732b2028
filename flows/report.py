"""The run report: what was quantized, sizes, perplexity and KL, plots, time per stage."""

import math


def _size_line(opts, size_before: int, size_after: int) -> str:
    sizes = f"size {size_before / 2**20:.1f} MiB -> {size_after / 2**20:.1f} MiB"
    if opts.w_bit != 4:  # the GEMM layout holds 4-bit codes only: 3-bit weights are stored dequantized
        return f"{sizes} (3-bit weights stored dequantized: a fake-quant checkpoint, no smaller than the source)"
    return f"{sizes} ({size_before / max(size_after, 1):.2f}x smaller)"


def _score_row(label: str, r: dict) -> str:
    ppl = "inf (the mean NLL overflowed: the model is broken)" if math.isinf(r["ppl"]) else f"{r['ppl']:.3f}"
    return f"| {label} | {ppl} | {r['kl']:.5f} |" if "kl" in r else f"| {label} | {ppl} | |"


def markdown_report(
    model: str,
    out: str,
    opts,
    size_before: int,
    size_after: int,
    timings: dict,
    table: dict,
    pictures: dict | None = None,
    work: tuple[str, int] | None = None,
) -> str:
    """pictures: {title: image URL or path} (flows/plots.py), shown after the perplexity table;
    work: (work dir, bytes it holds: activation store + block cache)."""
    layout = opts.format if opts.w_bit == 4 else "fake-quant"
    lines = [
        f"# AWQ run: `{model}` -> `{out}`",
        "",
        f"method **{opts.method}**, w{opts.w_bit}, group {opts.group_size}, zero point {opts.zero_point}, "
        f"mode {opts.block_mode}, format {layout}",
        "",
        _size_line(opts, size_before, size_after),
        "",
    ]
    if work:
        lines += [f"work dir `{work[0]}` (activations + block cache, reused by reruns): {work[1] / 2**20:.1f} MiB", ""]
    if table:
        first = next(iter(table.values()))
        lines += [
            f"## Perplexity and KL to FP ({first['windows']} windows x {first['seqlen']} tokens)",
            "",
            "| model | ppl | mean KL to FP |",
            "|---|---|---|",
        ]
        lines += [_score_row(label, r) for label, r in table.items()]
        lines.append("")
    if pictures:
        lines += ["## Plots", ""]
        lines += [f"![{title}]({src})\n" for title, src in pictures.items()]
    lines += ["## Time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    return "\n".join(lines) + "\n"
