"""Trade-off plots: final top-1 against the achieved MACs reduction, one line per row label."""

from __future__ import annotations

import io
from typing import Any

import pandas as pd


def tradeoff_png(dataset: str, arch: str, budget: str, df: pd.DataFrame, labels: dict[str, str]) -> bytes | None:
    """PNG of final top-1 vs MACs reduction (mean ± std over seeds), one line per configuration
    label, and the smaller-dense controls as one series of their own; None when there are fewer
    than two MACs targets (or matplotlib is missing).

    Deterministic: no version or date metadata, fixed style, sorted series.
    """
    macs = df[(df["metric"] == "macs") & (df["name"] != "dense")].copy()
    dense = df[df["name"] == "dense"]
    if macs["ratio"].nunique() < 2:
        return None
    try:
        import matplotlib
        import matplotlib.style
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    macs["label"] = [labels.get(c, c) for c in macs["config"]]
    with matplotlib.style.context("default"):
        fig = Figure(figsize=(8.4, 4.6), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        names = sorted(macs["label"].unique())
        palette = matplotlib.colormaps["tab20"].colors  # distinct colours for up to 20 series
        markers = "os^Dv<>pPX*h"
        for i, name in enumerate(names):
            pts = (macs[macs["label"] == name].groupby("ratio")
                   .agg(x=("macs_down", "mean"), y=("final", "mean"), s=("final", "std")).reset_index())
            control = name.split(" ")[0] in ("random", "scratch") or name.startswith("scratch")
            ax.errorbar(pts["x"], pts["y"], yerr=pts["s"].fillna(0.0), marker=markers[i % len(markers)],
                        capsize=3, label=_literal(name), color=palette[(2 * i) % 20 + (2 * i) // 20 % 2],
                        linestyle="--" if control else "-")
        if not dense.empty:  # the smaller dense networks: one series, each point named
            pts = (dense.groupby("criterion").agg(x=("macs_down", "mean"), y=("final", "mean"), s=("final", "std"))
                   .reset_index().sort_values("x"))
            ax.errorbar(pts["x"], pts["y"], yerr=pts["s"].fillna(0.0), marker="*", markersize=10, capsize=3,
                        color="black", linestyle=":", label="dense smaller networks (control)")
            for x, y, name in zip(pts["x"], pts["y"], pts["criterion"], strict=True):
                ax.annotate(_literal(name.removeprefix("dense ")), (x, y), textcoords="offset points", xytext=(5, 5),
                            fontsize="small")
        ax.axhline(macs["baseline"].mean(), color="grey", linestyle="--", linewidth=1, label="baseline")
        return _png(fig, ax, "MACs reduction (%)", f"{dataset} · {arch} · budget {budget}")


def _png(fig: Any, ax: Any, xlabel: str, title: str) -> bytes:
    """Labels, grid and legend of a page's plot, as deterministic PNG bytes (no metadata)."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("final top-1 (%)")
    ax.set_title(_literal(title))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def _literal(text: str) -> str:
    """``text`` as matplotlib draws it literally: ``$`` would start mathtext (which can fail)."""
    return text.replace("$", r"\$")


def latency_png(dataset: str, arch: str, budget: str, df: pd.DataFrame, labels: dict[str, str],
                latency: dict[str, dict[str, Any]], runtime: str = "onnxruntime") -> bytes | None:
    """PNG of final top-1 against the measured latency (``runtime``, batch 1, one thread) of
    each run's compressed model, one marker per configuration label (mean over its seeds), the
    baseline architecture's latency as a vertical line; None without such latency records.

    Each record's baseline was timed interleaved with its compressed model, so the compressed
    latency is put on one clock: the mean baseline latency of the records divided by the
    record's speed-up (medians). A host whose speed drifts between measurements (a shared
    machine) then moves no point; the speed-ups, not the absolute times, are what was compared."""
    found = []
    for _, r in df.iterrows():
        rec = latency.get(r["run_id"], {}).get(runtime)
        if rec is not None:
            found.append((r, rec))
    if not found:
        return None
    base = sum(float(rec["baseline_ms"]["median"]) for _, rec in found) / len(found)
    pts = [(labels.get(r["config"], r["criterion"]), r["target"], base / float(rec["speedup"]["median"]),
            float(r["final"])) for r, rec in found]
    try:
        import matplotlib
        import matplotlib.style
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    frame = pd.DataFrame(pts, columns=["label", "target", "ms", "final"])
    with matplotlib.style.context("default"):
        fig = Figure(figsize=(8.4, 4.6), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        palette = matplotlib.colormaps["tab20"].colors
        markers = "os^Dv<>pPX*h"
        for i, (name, g) in enumerate(sorted(frame.groupby("label"), key=lambda kv: kv[0])):
            agg = g.groupby("target").agg(x=("ms", "mean"), y=("final", "mean")).reset_index().sort_values("x")
            ax.plot(agg["x"], agg["y"], marker=markers[i % len(markers)], linestyle="-",
                    color=palette[(2 * i) % 20 + (2 * i) // 20 % 2], label=_literal(name))
        ax.axvline(base, color="grey", linestyle="--", linewidth=1, label=f"baseline {arch} latency")
        ax.axhline(df["baseline"].mean(), color="grey", linestyle=":", linewidth=1, label="baseline top-1")
        return _png(fig, ax, f"measured latency, {runtime}, batch 1, one thread (ms)\n(the baselines' mean latency ÷ the speed-up)",
                    f"{dataset} · {arch} · budget {budget}")
