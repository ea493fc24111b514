"""Plots of ``bench/attention_sweep.py`` results; needs matplotlib (imported when plotting).

    python bench/plot_results.py bench/results/attention_<device>_<date>.json [out.png]
    python bench/plot_results.py bench/results/memory_<device>_<date>.json [out.png]

``plot_throughput``: TFLOP/s vs seqlen, one line per implementation, one panel per
(dtype, head_dim, causal, direction); cuflash points of INVALID rows get a red cross.
``plot_memory``: peak device memory vs seqlen on log-log axes, cuflash vs naive, with the
inputs' size for scale and a dotted line where an implementation ran out of memory.
The JSON's "kind" field ("attention" or "memory") picks the plot from the command line.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

GIB = 1 << 30
IMPL_ORDER = ("cuflash", "flash", "cudnn", "efficient", "naive")
STYLE = {
    "cuflash": dict(color="tab:red", marker="o", linewidth=2.2, zorder=5),
    "flash": dict(color="tab:blue", marker="s", linewidth=1.4),
    "cudnn": dict(color="tab:green", marker="^", linewidth=1.4),
    "efficient": dict(color="tab:orange", marker="D", linewidth=1.4, markersize=4),
    "naive": dict(color="tab:gray", marker="x", linewidth=1.2, linestyle="--"),
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _load(path) -> dict:
    with open(path) as f:
        return json.load(f)


def _k(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _log2_seqlen_axis(ax, seqlens) -> None:
    from matplotlib.ticker import NullLocator

    ax.set_xscale("log", base=2)
    ax.set_xticks(seqlens)
    ax.set_xticklabels([_k(s) for s in seqlens])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("seqlen")


def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """(dtype, head_dim, causal, direction) -> its rows, dtype bf16 first, then as sorted."""
    groups: dict[tuple, list[dict]] = {}
    key = lambda r: (r["dtype"] != "bf16", r["dtype"], r["head_dim"], r["causal"],
                     r["direction"] != "fwd")
    for r in sorted(rows, key=key):
        if any(rec.get("status") == "ok" for rec in r.get("impls", {}).values()):
            groups.setdefault((r["dtype"], r["head_dim"], r["causal"], r["direction"]),
                              []).append(r)
    return groups


def _throughput_panel(ax, key: tuple, rows: list[dict]) -> None:
    dtype, head_dim, causal, direction = key
    for impl in IMPL_ORDER:
        pts = sorted((r["seqlen"], r["impls"][impl]["tflops"]) for r in rows
                     if r["impls"].get(impl, {}).get("status") == "ok")
        if pts:
            ax.plot(*zip(*pts), label=impl, **STYLE[impl])
    bad = [(r["seqlen"], r["impls"]["cuflash"]["tflops"]) for r in rows
           if r.get("status") == "INVALID" and r["impls"].get("cuflash", {}).get("status") == "ok"]
    if bad:
        ax.scatter(*zip(*bad), s=140, marker="X", color="red", zorder=6,
                   label="cuflash INVALID")
    _log2_seqlen_axis(ax, sorted({r["seqlen"] for r in rows}))
    ax.set_ylim(bottom=0)
    ax.set_ylabel("TFLOP/s")
    ax.set_title(f"{dtype} d{head_dim} {'causal' if causal else 'non-causal'} {direction}",
                 fontsize=10)
    ax.grid(alpha=0.3)


def plot_throughput(json_path, png_path) -> Path:
    """TFLOP/s vs seqlen per implementation, one panel per (dtype, head_dim, causal, dir)."""
    data = _load(json_path)
    groups = _groups(data.get("rows", []))
    if not groups:
        raise ValueError(f"{json_path}: no timed rows to plot")
    plt = _pyplot()
    ncols = min(4, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.3 * ncols, 3.3 * nrows),
                             squeeze=False)
    for ax, (key, rows) in zip(axes.flat, groups.items()):
        _throughput_panel(ax, key, rows)
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    fig.tight_layout()
    handles = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    height = fig.get_size_inches()[1]  # legend and title just above the panels
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles),
               frameon=False, bbox_to_anchor=(0.5, 1.0))
    first = data.get("rows", [{}])[0]
    fig.suptitle(f"{data.get('device', '?')}, {str(data.get('date', ''))[:10]}: attention "
                 f"TFLOP/s (higher is better); batch*seqlen = "
                 f"{first.get('batch', 0) * first.get('seqlen', 0)}, torch "
                 f"{data.get('torch', '?')}", fontsize=11, y=1.0 + 0.4 / height, va="bottom")
    fig.savefig(png_path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(png_path)


def plot_memory(json_path, png_path) -> Path:
    """Peak device memory vs seqlen, log-log: cuflash's O(N) against naive's O(N^2)."""
    data = _load(json_path)
    rows = data.get("rows", [])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.6, 4.8))
    seqlens = sorted({r["seqlen"] for r in rows})
    for impl in ("cuflash", "naive"):
        mine = sorted((r for r in rows if r["impl"] == impl), key=lambda r: r["seqlen"])
        pts = [(r["seqlen"], r["peak_bytes"] / GIB) for r in mine if r.get("status") == "ok"]
        if pts:
            ax.plot(*zip(*pts), label=f"{impl} peak", **STYLE[impl])
        failed = [r for r in mine if r.get("status") == "oom"]
        if failed:
            s = failed[0]["seqlen"]
            ax.axvline(s, color=STYLE[impl]["color"], linestyle=":", linewidth=1.2)
            ax.annotate(f"{impl}: OOM at {_k(s)}", (s, 0.97), xycoords=("data", "axes fraction"),
                        rotation=90, ha="right", va="top", fontsize=8,
                        color=STYLE[impl]["color"])
    inputs = sorted({(r["seqlen"], r["input_bytes"] / GIB) for r in rows if r.get("input_bytes")})
    if inputs:
        ax.plot(*zip(*inputs), color="black", linestyle="--", linewidth=0.9,
                label="inputs q, k, v")
    if seqlens:
        _log2_seqlen_axis(ax, seqlens)
    ax.set_yscale("log")
    ax.set_ylabel("peak device memory (GiB)")
    shape = data.get("shape", {})
    ax.set_title(f"{data.get('device', '?')}, {str(data.get('date', ''))[:10]}: attention "
                 f"forward memory\nbatch {shape.get('batch')}, {shape.get('heads')} heads, "
                 f"head_dim {shape.get('head_dim')}, {shape.get('dtype')}, "
                 f"{'causal' if data.get('causal') else 'non-causal'}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return Path(png_path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    src = Path(argv[0])
    png = Path(argv[1]) if len(argv) > 1 else src.with_suffix(".png")
    plot = plot_memory if _load(src).get("kind") == "memory" else plot_throughput
    plot(src, png)
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
