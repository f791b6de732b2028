"""Pictures of a run's search statistics (PNG, matplotlib's Agg canvas; pyplot and its global state unused).

  scales.png        the AWQ scale distribution of every (block, scale group) as a box plot, one panel per
                    layer type (q/k/v, o, gate/up, down): seed 000's per-layer-type table as a picture.
  block-error.png   each block's output MSE against the FP block, quantized plainly (RTN) and after AWQ.

`stats` is the flow's per-block dict: {block: {"groups": {name: {..., "scale_quantiles": [q0, q1, q25, q50,
q75, q99, q100]}}, "output_mse_rtn": float, "output_mse_awq": float}}; block keys may be ints or strings
(after a JSON round trip). Entries without the needed fields (an RTN run, an old cache entry) are skipped.
"""

import base64
import os

from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, NullFormatter

# A scale group's type, from the leaf name of its first linear (all architectures in stages/architectures.py).
LAYER_TYPES = {
    "q/k/v": ("q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "Wqkv", "c_attn"),
    "o": ("o_proj", "out_proj", "dense", "c_proj"),
    "gate/up": ("gate_proj", "up_proj", "gate_up_proj", "fc1", "dense_h_to_4h", "w1", "w3", "c_fc"),
    "down": ("down_proj", "fc2", "dense_4h_to_h", "w2"),
}
COLORS = {"q/k/v": "#4C72B0", "o": "#55A868", "gate/up": "#DD8452", "down": "#C44E52", "other": "#8172B3"}
DPI = 100


def layer_type(group: str) -> str:
    """'input_layernorm->self_attn.q_proj,self_attn.k_proj,...' -> 'q/k/v'; unknown linears -> 'other'."""
    first = group.split("->")[-1].split(",")[0].rpartition(".")[2]
    return next((t for t, leaves in LAYER_TYPES.items() if first in leaves), "other")


def _blocks(stats: dict) -> list[tuple[int, dict]]:
    return sorted(((int(b), s or {}) for b, s in stats.items()), key=lambda kv: kv[0])


def _log_y(ax) -> None:
    """Log y axis (call after plotting) labelled 0.8, 1, 2 rather than 8x10^-1; minor ticks labelled too
    where the data spans little more than a decade."""
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    lo, hi = ax.get_ylim()
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain if hi / lo < 20 else NullFormatter())


def _save(fig: Figure, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def scale_boxplot(stats: dict, path: str) -> str | None:
    """Box (q25..q75, median), whiskers q1..q99, dots at min and max; one panel per layer type, a box per
    block (several side by side where a block has several groups of a type, e.g. MoE experts)."""
    by_type: dict[str, dict[int, list]] = {}
    for block, s in _blocks(stats):
        for group, g in (s.get("groups") or {}).items():
            q = g.get("scale_quantiles")
            if q and len(q) == 7:
                by_type.setdefault(layer_type(group), {}).setdefault(block, []).append((group, g, q))
    if not by_type:
        return None
    order = [t for t in (*LAYER_TYPES, "other") if t in by_type]
    blocks = sorted({b for per_block in by_type.values() for b in per_block})
    width = min(20.0, max(7.0, 2.0 + 0.4 * len(blocks)))
    fig = Figure(figsize=(width, 1.0 + 2.1 * len(order)), dpi=DPI, layout="constrained")
    axes = fig.subplots(len(order), 1, sharex=True, squeeze=False)[:, 0]
    for ax, t in zip(axes, order):
        boxes, positions, widths = [], [], []
        for block, items in sorted(by_type[t].items()):
            n = len(items)
            for k, (_group, g, q) in enumerate(items):
                boxes.append(
                    {
                        "whislo": q[1],
                        "q1": q[2],
                        "med": q[3],
                        "q3": q[4],
                        "whishi": q[5],
                        "fliers": [q[0], q[6]],
                        "mean": g.get("scale_mean", q[3]),
                    }
                )
                positions.append(block + (k - (n - 1) / 2) * 0.8 / n)
                widths.append(0.6 / n)
        color = COLORS[t]
        ax.bxp(
            boxes,
            positions=positions,
            widths=widths,
            showmeans=True,
            patch_artist=True,
            manage_ticks=False,
            boxprops={"facecolor": color, "alpha": 0.55, "edgecolor": color},
            medianprops={"color": "black"},
            whiskerprops={"color": color},
            capprops={"color": color},
            flierprops={"marker": ".", "markersize": 4, "markeredgecolor": color},
            meanprops={"marker": "^", "markersize": 4, "markerfacecolor": "white", "markeredgecolor": "black"},
        )
        _log_y(ax)
        ax.axhline(1.0, color="grey", lw=0.6, ls=":")
        ax.set_ylabel("scale")
        linears = sorted({group.split("->")[-1] for per_block in by_type[t].values() for group, _, _ in per_block})
        label = linears[0] if len(linears) == 1 else f"{len(linears)} groups"
        ax.set_title(f"{t}  ({label})", loc="left", fontsize=9)
        ax.grid(axis="y", which="both", alpha=0.25)
    axes[-1].set_xticks(blocks)
    axes[-1].set_xlim(min(blocks) - 0.6, max(blocks) + 0.6)
    axes[-1].set_xlabel("block")
    fig.legend(
        handles=[Patch(facecolor=COLORS[t], alpha=0.55, label=t) for t in order],
        loc="outside upper right",
        ncols=len(order),
        fontsize=8,
        title="box q25-q75, whiskers q1-q99, dots min/max, ^ mean",
        title_fontsize=8,
    )
    fig.suptitle("AWQ scales per block and layer type", x=0.01, ha="left", fontsize=11)
    return _save(fig, path)


def block_error_plot(stats: dict, path: str) -> str | None:
    """Bars per block: output MSE vs the FP block, RTN and AWQ (log scale), with AWQ's ratio to RTN."""
    rows = [
        (b, s["output_mse_rtn"], s["output_mse_awq"])
        for b, s in _blocks(stats)
        if s.get("output_mse_rtn") is not None and s.get("output_mse_awq") is not None
    ]
    if not rows:
        return None
    blocks = [r[0] for r in rows]
    width = min(20.0, max(6.0, 2.0 + 0.45 * len(rows)))
    fig = Figure(figsize=(width, 3.8), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    floor = min(v for r in rows for v in r[1:] if v > 0) if any(v > 0 for r in rows for v in r[1:]) else 1e-12
    rtn = [max(r[1], floor) for r in rows]
    awq = [max(r[2], floor) for r in rows]
    ax.bar([b - 0.2 for b in blocks], rtn, width=0.4, color="#999999", label="RTN")
    ax.bar([b + 0.2 for b in blocks], awq, width=0.4, color="#4C72B0", label="AWQ")
    if len(rows) <= 40:
        for b, (_, r, a) in zip(blocks, rows):
            if r > 0:
                ax.annotate(
                    f"{a / r:.2g}x",
                    (b + 0.2, max(a, floor)),
                    xytext=(0, 2),
                    textcoords="offset points",
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
    _log_y(ax)
    ax.set_xticks(blocks)
    ax.set_xlabel("block")
    ax.set_ylabel("output MSE vs FP block")
    ax.grid(axis="y", which="both", alpha=0.25)
    ax.legend(fontsize=8)
    ax.set_title("Block output error before (RTN) and after AWQ (label: AWQ / RTN)", loc="left", fontsize=10)
    return _save(fig, path)


def write_plots(stats: dict, folder: str) -> dict[str, str]:
    """Both pictures into `folder`; {title: path} of those that had data."""
    made = {
        "AWQ scales per block and layer type": scale_boxplot(stats, os.path.join(folder, "scales.png")),
        "Block output error, RTN vs AWQ": block_error_plot(stats, os.path.join(folder, "block-error.png")),
    }
    return {title: path for title, path in made.items() if path}


def report_dir(out: str) -> str:
    """The run's pictures go beside the checkpoint, not into it: <out>.report/"""
    return out.rstrip("/") + ".report"


def data_uri(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")
