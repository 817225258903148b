"""Trade-off plots: final top-1 against the achieved MACs reduction, one line per row label."""

from __future__ import annotations

import io

import pandas as pd


def tradeoff_png(dataset: str, arch: str, budget: str, df: pd.DataFrame, labels: dict[str, str]) -> bytes | None:
    """PNG of final top-1 vs MACs reduction (mean ± std over seeds), one line per configuration
    label; None when there are fewer than two MACs targets (or matplotlib is missing).

    Deterministic: no version or date metadata, fixed style, sorted series.
    """
    macs = df[df["metric"] == "macs"].copy()
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
        ax.axhline(macs["baseline"].mean(), color="grey", linestyle="--", linewidth=1, label="baseline")
        ax.set_xlabel("MACs reduction (%)")
        ax.set_ylabel("final top-1 (%)")
        ax.set_title(_literal(f"{dataset} · {arch} · budget {budget}"))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def _literal(text: str) -> str:
    """``text`` as matplotlib draws it literally: ``$`` would start mathtext (which can fail)."""
    return text.replace("$", r"\$")
