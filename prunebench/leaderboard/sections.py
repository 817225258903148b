"""The sections of a page beside its ranked tables: the smaller-dense controls, the pairwise
comparisons of a table's rows, and whether the ranking holds across budgets."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pandas as pd

from prunebench.leaderboard.escape import md
from prunebench.leaderboard.ranking import MOVE, holding, ranks
from prunebench.leaderboard.stats import ALPHA, holm, mean_std, pairwise, t_interval, welch_greater


def _cell(mean: float, std: float, n: int) -> str:
    return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"


# --- smaller-dense controls ------------------------------------------------------------------


def dense_rows(dense: pd.DataFrame) -> list[dict[str, Any]]:
    """One row per smaller architecture of one budget: final top-1 over seeds, its interval,
    and where it sits (MACs and params reduction against the page's architecture)."""
    out = []
    for label, g in dense.groupby("criterion", sort=True):
        finals = [float(v) for v in g["final"] if not pd.isna(v)]
        if not finals:
            continue
        mean, std, _ = mean_std(finals)
        out.append({"label": label, "finals": finals, "mean": mean, "std": std, "n": len(finals),
                    "ci": t_interval(finals), "macs": float(g["macs_down"].mean()),
                    "params": float(g["params_down"].mean()), "before": float(g["oneshot"].mean()),
                    "delta": float(g["delta"].mean())})
    out.sort(key=lambda r: r["macs"])
    return out


def dense_lines(dataset: str, arch: str, budget: str, rows: list[dict[str, Any]]) -> list[str]:
    """The table of a budget's smaller-dense controls (nothing when there are none)."""
    from tabulate import tabulate

    if not rows:
        return []
    body = [[md(r["label"]), _cell(r["mean"], r["std"], r["n"]),
             "—" if r["ci"] is None else f"{r['ci'][0]:.2f} – {r['ci'][1]:.2f}", f"{r['delta']:+.2f}",
             f"{r['before']:.2f}", f"{r['macs']:.1f}%", f"{r['params']:.1f}%", r["n"]] for r in rows]
    return [
        f"## {dataset} · {arch} · smaller dense networks (control) · budget `{budget}`", "",
        f"Not pruned: each smaller network of the family starts like {arch}'s baseline and is trained for the "
        "budget's post-compression epochs. Each sits at its own MACs reduction relative to "
        f"{arch}; *before training* is its top-1 when those epochs start.", "",
        tabulate(body, headers=["control", "final top-1", "95 % CI", f"Δ vs {arch}", "before training", "MACs ↓",
                                "params ↓", "seeds"], tablefmt="github", disable_numparse=True), "",
    ]


def dense_verdict(rows: list[dict[str, Any]], dense: list[dict[str, Any]], ratio: float, metric: str,
                  near: float) -> list[str]:
    """One sentence for a target's table: does any pruned row beat the dense network of about
    the same MACs? (Welch one-sided, Holm over the rows tested.)"""
    if not dense or metric != "macs":
        return []
    d = min(dense, key=lambda r: (abs(r["macs"] - 100 * ratio), r["macs"]))
    if abs(d["macs"] - 100 * ratio) > near:
        where = ", ".join(f"{md(r['label'])} {r['macs']:.1f}%" for r in dense)
        return [f"*Dense control:* no smaller dense network lies within {near:g} points of this target "
                f"({where} MACs ↓).", ""]
    candidates = [r for r in rows if r["label"].split(" ")[0] not in ("random", "scratch") and r["n"] >= 2]
    raw = [welch_greater(r["finals"], d["finals"]) if d["n"] >= 2 else None for r in candidates]
    adjusted = holm(raw)
    winners = [f"{md(r['label'])} (p={q:.3f})" for r, q in zip(candidates, adjusted, strict=True)
               if q is not None and q < ALPHA]
    head = (f"*Dense control:* {md(d['label'])} ({d['macs']:.1f}% MACs ↓, {_cell(d['mean'], d['std'], d['n'])}) "
            f"is the nearest smaller network. ")
    if d["n"] < 2 or not any(p is not None for p in raw):
        return [head + "Not tested: fewer than two seeds on a side.", ""]
    if winners:
        verdict = f"Pruning beats it: {', '.join(winners)}"
    else:
        verdict = "No pruned row beats it"
    return [head + f"{verdict} (Welch's t-test, one-sided, Holm-adjusted over the {len(candidates)} rows "
            f"tested, α = {ALPHA}).", ""]


# --- pairwise comparisons ----------------------------------------------------------------------


def pairwise_lines(rows: list[dict[str, Any]]) -> list[str]:
    """A matrix of every pair of a table's rows: ▲ the row is better than the column, ▼ worse,
    · no difference at α after Holm over the table's pairs, — not tested (one seed)."""
    from tabulate import tabulate

    if len(rows) < 3:
        return []
    results = pairwise([r["finals"] for r in rows])
    cells = [["" for _ in rows] for _ in rows]
    for pr in results:
        if pr.p_adjusted is None:
            a = b = "—"
        elif pr.p_adjusted < ALPHA:
            a, b = ("▲", "▼") if pr.a_better else ("▼", "▲")
        else:
            a = b = "·"
        cells[pr.a][pr.b], cells[pr.b][pr.a] = a, b
    tested = sum(pr.p is not None for pr in results)
    if not tested:
        return []
    body = [[i + 1, md(r["label"]), *cells[i]] for i, r in enumerate(rows)]
    return [
        "<details><summary>Pairwise comparisons of this table's rows</summary>", "",
        f"Welch's t-test, two-sided, on final top-1 over seeds, Holm-adjusted over the table's {tested} tested "
        f"pairs (α = {ALPHA}). ▲: the row's criterion is better than the column's; ▼: worse; ·: no "
        "difference shown; —: not tested (a single seed, or no spread).", "",
        tabulate(body, headers=["rank", "criterion", *[str(i + 1) for i in range(len(rows))]], tablefmt="github",
                 disable_numparse=True), "",
        "</details>", "",
    ]


# --- does the ranking hold? ---------------------------------------------------------------------


def holding_lines(df: pd.DataFrame, labels_of: Callable[[pd.DataFrame], tuple[dict[str, str], Any]],
                  verdicts: dict[tuple[str, str, float, str], str] | None = None) -> list[str]:
    """Per target with two or more budgets: each row's rank at every stage, Kendall's τ between
    the rankings with a bootstrap interval over seeds, and what changes with the budget
    (``verdicts``: the "beats random?" cell per (budget, metric, ratio, configuration))."""
    from tabulate import tabulate

    epochs = {b: float(g["finetune_epochs"].iloc[0]) for b, g in df.groupby("budget")
              if not pd.isna(g["finetune_epochs"].iloc[0])}
    lines: list[str] = []
    for (_metric, _ratio), g in sorted(df.groupby(["metric", "ratio"]), key=lambda kv: kv[0]):
        h = holding(g, epochs)
        if h is None:
            continue
        labels, _ = labels_of(g)
        target = g["target"].iloc[0]
        rank_of = {s.name: ranks(h.means[s.name]) for s in h.stages}
        body = []
        for i, c in enumerate(h.configs):
            body.append([md(labels[c]), *[f"{rank_of[s.name][i]} ({h.means[s.name][i]:.2f})" for s in h.stages]])
        body.sort(key=lambda row: int(row[-1].split(" ")[0]))
        taus = [[f"{a.name} → {b.name}", f"{tau:+.2f}", f"{lo:+.2f} – {hi:+.2f}"] for a, b, tau, lo, hi in h.taus]
        lines += [
            f"## Does the ranking hold? {target}", "",
            f"The {len(h.configs)} rows that every stage has, ranked by mean top-1 after one-shot + BN "
            "re-estimation (0 epochs of training) and after each budget's fine-tune; each cell is rank "
            "(mean top-1). Kendall's τ-b between two rankings, with a 95 % percentile bootstrap interval "
            "over seeds (2,000 replicates: each row's seeds resampled within each budget).", "",
            tabulate(body, headers=["criterion", *[s.name for s in h.stages]], tablefmt="github",
                     disable_numparse=True), "",
            tabulate(taus, headers=["rankings", "τ", "95 % interval"], tablefmt="github", disable_numparse=True),
            "",
            *_changes(h, labels, rank_of),
            *_verdict_changes(h, labels, verdicts or {}, g["metric"].iloc[0], float(g["ratio"].iloc[0])), "",
        ]
    return lines


def _tested(verdict: str) -> str:
    """``yes`` or ``no`` for a tested verdict (``yes (p=…)``, ``no (p=…)``), else ``—``."""
    word, _, rest = verdict.partition(" ")
    return word if word in ("yes", "no") and rest.startswith("(p=") else "—"


def _verdict_changes(h: Any, labels: dict[str, str], verdicts: dict[tuple[str, str, float, str], str],
                     metric: str, ratio: float) -> list[str]:
    """Rows whose verdict against ``random`` (yes / no after Holm) differs between budgets; a
    budget where the row was not tested (no control, a single seed) changes nothing."""
    budgets = list(dict.fromkeys(s.budget for s in h.stages if s.column == "final"))
    changed, tested = [], set()
    for c in h.configs:
        got = [_tested(verdicts.get((b, metric, ratio, c), "—")) for b in budgets]
        tested |= {b for b, v in zip(budgets, got, strict=True) if v != "—"}
        if "yes" in got and "no" in got:
            changed.append(f"{md(labels[c])} ({', '.join(f'`{b}` {v}' for b, v in zip(budgets, got, strict=True))})")
    untested = [f"`{b}`" for b in budgets if b not in tested]
    note = f" ({', '.join(untested)}: no row tested against `random` yet)" if untested else ""
    if changed:
        return [f"- Verdicts against `random` that change with the budget: {'; '.join(changed)}{note}."]
    return [f"- No row's verdict against `random` changes with the budget{note}."]


def _changes(h: Any, labels: dict[str, str], rank_of: dict[str, list[int]]) -> list[str]:
    """What changes with the budget, in words: rows that move by MOVE places or more between
    the first and the last ranking of fine-tuned runs, and between 0 epochs and the last."""
    out = []
    last = h.stages[-1]
    for first in (h.stages[0], h.stages[1]) if len(h.stages) > 2 else (h.stages[0],):
        moves = [(labels[c], rank_of[first.name][i], rank_of[last.name][i]) for i, c in enumerate(h.configs)
                 if abs(rank_of[first.name][i] - rank_of[last.name][i]) >= MOVE]
        moved = "; ".join(f"{md(lab)} {a} → {b}" for lab, a, b in sorted(moves, key=lambda m: m[2]))
        out.append(f"- From {first.name} to {last.name}: "
                   + (f"rows moving {MOVE} or more places: {moved}." if moves
                      else f"no row moves {MOVE} or more places."))
    tau_last = next(t for t in h.taus if t[0] == h.stages[-2] and t[1] == last)
    if not math.isnan(tau_last[3]):
        holds = tau_last[3] > 0
        out.append(f"- {h.stages[-2].name} → {last.name}: τ = {tau_last[2]:+.2f}; the interval "
                   + ("excludes 0: the order largely holds." if holds else "includes 0: the order is not "
                      "shown to hold."))
    return out
