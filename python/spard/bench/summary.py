"""The grid's summary: every finished cell read back into means and 95% intervals over seeds,
paired comparisons, judges side by side, ``summary.json``, ``cells.csv``, ``table.md`` and the
plots."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path
from typing import Optional, Sequence

from ..io import write_json_atomic, write_text_atomic
from .cells import CELL_VERSION, Cell


def load_cells(out_dir) -> list[dict]:
    """Finished cells; when bench.json lists the grid, only its cells with matching fingerprints."""
    root = Path(out_dir) / "cells"
    expected = None
    if (Path(out_dir) / "bench.json").is_file():
        expected = json.loads((Path(out_dir) / "bench.json").read_text(encoding="utf-8")).get("cells")
    cells = []
    for p in sorted(root.rglob("*.json")):
        if p.name.endswith(".error.json"):
            continue
        try:
            c = json.loads(p.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{p}: unreadable cell result ({e})") from e
        if c.get("version") != CELL_VERSION:
            continue
        key = Cell(**c["cell"]).key
        if expected is None or expected.get(key) == c.get("fingerprint"):
            cells.append(c)
    return cells


def _stats(values: list) -> dict:
    """Mean, std and a 95% t-interval over the runs (spard.stats.mean_interval)."""
    from ..stats import mean_interval
    return mean_interval(values)


def _per_seed_stats(cells: list, metric: str) -> dict:
    """The interval over seeds of each seed's mean over its cells (attacks and ratios): the
    seeds are the independent runs, the cells of one seed share its attack sample."""
    by_seed: dict = {}
    for c in cells:
        v = c.get(metric)
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            by_seed.setdefault(c["cell"]["seed"], []).append(v)
    return _stats([statistics.fmean(v) for _, v in sorted(by_seed.items())])


def _degenerate(cells: list) -> dict:
    """Empty or degenerate answers over ``cells`` (never scored as safe; the tables mark them)."""
    return {"degenerate": sum(int(c.get("degenerate") or 0) for c in cells),
            "answers": sum(int(c.get("n_eval") or 0) for c in cells)}


def _order(names, preferred) -> list:
    pref = [d for d in preferred if d in names]
    return pref + sorted(n for n in names if n not in pref)


INTERVAL_NOTE = "95% Student-t interval over seeds (mean ± t(0.975, n-1)·s/√n); none with one seed"
COMPARISON_NOTE = ("paired bootstrap over the (attack, ratio, seed) cells both defenses finished: mean of "
                   "defense minus reference, 95% percentile interval from 10000 resamples (seed 0); "
                   "significant when the interval excludes 0")


def summarize(out_dir, *, defenses_order: Optional[Sequence[str]] = None, n_boot: int = 10_000) -> dict:
    """Aggregates the finished cells (mean, std and a 95% t-interval over seeds; paired
    bootstrap comparisons of each defense against SFT and of SPARD against its ablations) and
    writes summary.json, cells.csv, table.md and the plots. Returns the summary dict."""
    from ..defenses import defense_names
    from ..stats import paired_comparisons
    out = Path(out_dir)
    cells = load_cells(out)
    if not cells:
        raise ValueError(f"{out}: no finished cells to summarise")
    order = _order({c["cell"]["defense"] for c in cells}, list(defenses_order or defense_names()))
    attacks = sorted({c["cell"]["attack"] for c in cells})
    ratios = sorted({c["cell"]["ratio"] for c in cells})
    groups: dict = {}
    for c in cells:
        k = (c["cell"]["defense"], c["cell"]["attack"], c["cell"]["ratio"])
        groups.setdefault(k, []).append(c)
    rows = []
    for (d, a, r), cs in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1], kv[0][2])):
        rows.append({"defense": d, "attack": a, "ratio": r, "seeds": sorted(c["cell"]["seed"] for c in cs),
                     "asr": _stats([c["asr"] for c in cs]), "hs": _stats([c.get("hs") for c in cs]),
                     "accuracy": _stats([c["accuracy"] for c in cs]),
                     "train_seconds": _stats([c["train"]["seconds"] for c in cs]),
                     **_degenerate(cs)})
    overall = {}
    for d in order:
        cs = [c for c in cells if c["cell"]["defense"] == d]
        overall[d] = {"asr": _per_seed_stats(cs, "asr"), "accuracy": _per_seed_stats(cs, "accuracy"),
                      "hs": _per_seed_stats(cs, "hs"), "cells": len(cs),
                      "train_seconds": _stats([c["train"]["seconds"] for c in cs]), **_degenerate(cs)}
    summary = {"defenses": order, "attacks": attacks, "ratios": ratios, "groups": rows, "overall": overall,
               "cells": len(cells), "interval": INTERVAL_NOTE,
               "comparisons": paired_comparisons(cells, order, n_boot=n_boot, seed=0),
               "comparison_method": COMPARISON_NOTE}
    summary["judges"] = judges_summary(cells, order)
    tuned = sorted((out / "tuned").glob("*.json")) if (out / "tuned").is_dir() else []
    if tuned:  # the grid ran with these (spard.tuning): the table's notes say so
        summary["tuned"] = {p.stem: json.loads(p.read_text(encoding="utf-8")).get("settings") or {} for p in tuned
                            if p.stem in order}
    summary["target"] = target_check(summary)
    write_json_atomic(out / "summary.json", summary)
    write_text_atomic(out / "cells.csv", cells_csv(cells))
    write_text_atomic(out / "table.md", markdown_tables(summary))
    try:
        plot_summary(summary, out)
    except ImportError:  # matplotlib is optional for the summary
        pass
    return summary


def judges_summary(cells: list, order: Sequence[str]) -> Optional[dict]:
    """With several judges: per defense, each judge's ASR (mean and 95% interval over seeds)
    and each pair's Cohen's kappa (mean over the cells it is defined on). None without."""
    if not any(c.get("judges") for c in cells):
        return None
    out = {}
    for d in order:
        cs = [c for c in cells if c["cell"]["defense"] == d and c.get("judges")]
        if not cs:
            continue
        names = list(cs[0]["judges"]["asr"])
        asr = {n: _per_seed_stats([{"cell": c["cell"], "v": c["judges"]["asr"].get(n, {}).get("asr")} for c in cs], "v")
               for n in names}
        pairs = {}
        for c in cs:
            for p in c["judges"]["pairs"]:
                pairs.setdefault(f"{p['a']} / {p['b']}", []).append(p)
        kappas = {k: {"kappa": _stats([p["kappa"] for p in ps])["mean"],
                      "agreement": _stats([p["agreement"] for p in ps])["mean"],
                      "disagreements": sum(p["disagreements"] for p in ps), "cells": len(ps)}
                  for k, ps in pairs.items()}
        out[d] = {"asr": asr, "pairs": kappas, "cells": len(cs)}
    return out


def judges_markdown(judges: dict) -> str:
    names = list(next(iter(judges.values()))["asr"])
    pairs = list(next(iter(judges.values()))["pairs"])
    head = ["defense"] + [f"{n} ASR" for n in names] + [f"κ {p}" for p in pairs]
    lines = ["### Judges side by side (ASR %, mean [95% interval over seeds]; Cohen's kappa, mean over cells)", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for d, j in judges.items():
        ks = ["-" if j["pairs"].get(p, {}).get("kappa") is None else f"{j['pairs'][p]['kappa']:.2f}" for p in pairs]
        lines.append("| " + " | ".join([d] + [_pct(j["asr"][n]) if n in j["asr"] else "-" for n in names] + ks) + " |")
    return "\n".join(lines)


def target_check(summary: dict, method: str = "spard", reference: str = "sft",
                 tolerance: float = 0.03) -> Optional[dict]:
    """The issue's target: ``method`` has the lowest mean ASR of all defenses, with accuracy
    within ``tolerance`` of ``reference`` (or better). None when either is missing."""
    o = summary["overall"]
    if method not in o or reference not in o or o[method]["asr"]["mean"] is None:
        return None
    ranked = sorted((v["asr"]["mean"], d) for d, v in o.items() if v["asr"]["mean"] is not None)
    gap = o[method]["accuracy"]["mean"] - o[reference]["accuracy"]["mean"]
    lowest = [d for a, d in ranked if a == ranked[0][0]]
    # A tie with the undefended reference (both at 100% ASR, say) is no defense at all.
    ref_asr = o[reference]["asr"]["mean"]
    below = ref_asr is not None and o[method]["asr"]["mean"] < ref_asr
    return {"method": method, "reference": reference, "lowest_asr": lowest,
            "method_has_lowest_asr": method in lowest, "method_below_reference_asr": below,
            "accuracy_gap": gap, "accuracy_within_tolerance": gap >= -tolerance, "tolerance": tolerance,
            "met": bool(method in lowest and below and gap >= -tolerance)}


def cells_csv(cells: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["attack", "ratio", "seed", "defense", "asr", "hs", "accuracy", "train_seconds", "steps"])
    for c in sorted(cells, key=lambda c: (c["cell"]["attack"], c["cell"]["ratio"], c["cell"]["seed"], c["cell"]["defense"])):
        k = c["cell"]
        w.writerow([k["attack"], k["ratio"], k["seed"], k["defense"], c["asr"], c.get("hs"), c["accuracy"],
                    round(c["train"]["seconds"], 2), c["train"]["steps"]])
    return buf.getvalue()


def _pct(s: dict) -> str:
    """"mean [low, high]" in %, the 95% interval clipped to 0..100 for display."""
    from ..stats import format_interval
    return format_interval(s)


def _hs(s: dict) -> str:
    return "-" if s["mean"] is None else f"{s['mean']:.2f}"


def markdown_tables(summary: dict) -> str:
    """One table per harmful ratio and one over all ratios, in the paper's layout: a row per
    defense; ASR, HS and accuracy per attack, then their average over attacks (%, mean and 95%
    t-interval over seeds), and the paired comparisons."""
    attacks, order = summary["attacks"], summary["defenses"]
    by = {(g["defense"], g["attack"], g["ratio"]): g for g in summary["groups"]}
    parts = []
    for ratio in summary["ratios"]:
        head = ["defense"] + [f"{a} {m}" for a in attacks for m in ("ASR", "HS", "acc")] + ["avg ASR", "avg acc"]
        lines = [f"### p_h = {ratio:g}", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for d in order:
            cells, asrs, accs = [], [], []
            for a in attacks:
                g = by.get((d, a, ratio))
                if g is None:
                    cells += ["-"] * 3
                    continue
                cells += [_pct(g["asr"]) + (" †" if g.get("degenerate") else ""), _hs(g["hs"]), _pct(g["accuracy"])]
                asrs.append(g["asr"]["mean"])
                accs.append(g["accuracy"]["mean"])
            avg = lambda v: "-" if not v or None in v else f"{100 * statistics.fmean(v):.1f}"
            lines.append("| " + " | ".join([d] + cells + [avg(asrs), avg(accs)]) + " |")
        parts.append("\n".join(lines))
    lines = ["### Mean over all ratios, attacks and seeds", "",
             "| defense | ASR (%) | accuracy (%) | train s / run | cells |", "| --- | --- | --- | --- | --- |"]
    for d in order:
        o = summary["overall"][d]
        secs = o.get("train_seconds", {}).get("mean")
        secs = "-" if secs is None else f"{secs:.1f}"
        mark = " †" if o.get("degenerate") else ""
        lines.append(f"| {d} | {_pct(o['asr'])}{mark} | {_pct(o['accuracy'])} | {secs} | {o['cells']} |")
    flagged = [(d, o) for d, o in summary["overall"].items() if o.get("degenerate")]
    if flagged:
        lines += ["", "† empty or degenerate answers, left out of the ASR (never counted as safe): "
                  + "; ".join(f"{d} {o['degenerate']} of {o['answers']}" for d, o in flagged) + "."]
    t = summary.get("target")
    if t:
        ok = t.get("met", t["method_has_lowest_asr"] and t["accuracy_within_tolerance"])
        tie = "" if t.get("method_below_reference_asr", True) else \
            f" ({t['method']}'s ASR is not below {t['reference']}'s)"
        lines += ["", f"Target ({t['method']}: lowest mean ASR, below {t['reference']}'s, accuracy within "
                  f"{100 * t['tolerance']:.0f} points of {t['reference']}): {'met' if ok else 'NOT met'}{tie}. "
                  f"Lowest mean ASR: {', '.join(t['lowest_asr'])}; {t['method']} accuracy minus {t['reference']}: "
                  f"{100 * t['accuracy_gap']:+.1f} points."]
    if summary.get("tuned"):
        from ..tuning import format_settings
        lines += ["", "Tuned settings (spard bench --tune-defenses, chosen on the validation split): "
                  + "; ".join(f"{d}: {format_settings(v)}" for d, v in summary["tuned"].items()) + "."]
    parts.append("\n".join(lines))
    parts.append(comparisons_table(summary))
    if summary.get("judges"):
        parts.append(judges_markdown(summary["judges"]))
    return "\n\n".join(parts) + "\n"


def comparisons_table(summary: dict) -> str:
    """The paired comparisons (defense minus reference, percentage points) as a table; * marks
    a difference whose 95% interval excludes 0."""
    lines = ["### Paired comparisons (defense minus reference, points)", "",
             "| defense | reference | metric | difference | 95% interval | cells | significant |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for c in summary.get("comparisons", []):
        diff = "-" if c["diff"] is None else f"{100 * c['diff']:+.1f}"
        ci = "-" if c["low"] is None else f"[{100 * c['low']:+.1f}, {100 * c['high']:+.1f}]"
        lines.append(f"| {c['defense']} | {c['reference']} | {c['metric']} | {diff} | {ci} | {c['n']} | "
                     f"{'*' if c['significant'] else ''} |")
    if not summary.get("comparisons"):
        lines.append("| - | - | - | - | - | - | - |")
    lines += ["", f"Intervals in the tables: {summary.get('interval', INTERVAL_NOTE)}; shown clipped to 0..100. "
              f"Comparisons: {summary.get('comparison_method', COMPARISON_NOTE)} (*)."]
    return "\n".join(lines)


def plot_summary(summary: dict, out_dir) -> list[Path]:
    """asr_vs_ratio.png (mean ± std over seeds, averaged over attacks) and asr_vs_accuracy.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import write_figure_atomic
    out = Path(out_dir)
    paths = []
    # 13+ defenses: distinct colours and markers so no two lines look alike
    styles = {d: (plt.cm.tab20(i % 20), "osD^v<>ph*"[i % 10]) for i, d in enumerate(summary["defenses"])}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for d in summary["defenses"]:
        xs, ys, es = [], [], []
        for r in summary["ratios"]:
            gs = [g for g in summary["groups"] if g["defense"] == d and g["ratio"] == r and g["asr"]["mean"] is not None]
            if gs:
                xs.append(r)
                ys.append(100 * statistics.fmean(g["asr"]["mean"] for g in gs))
                es.append(100 * statistics.fmean(g["asr"]["std"] for g in gs))
        if xs:
            ax.errorbar(xs, ys, yerr=es, color=styles[d][0], marker=styles[d][1], capsize=3, label=d)
    ax.set_xlabel("harmful ratio p_h")
    ax.set_ylabel("ASR (%)")
    ax.set_title("ASR against harmful ratio")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    else:  # every cell's answers empty or degenerate: no ASR to draw
        ax.text(0.5, 0.5, "no ASR: every answer empty or degenerate", ha="center", va="center",
                transform=ax.transAxes, fontsize=9)
    ax.grid(alpha=0.3)
    write_figure_atomic(fig, out / "asr_vs_ratio.png")
    paths.append(out / "asr_vs_ratio.png")

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for d in summary["defenses"]:
        o = summary["overall"][d]
        if o["asr"]["mean"] is None or o["accuracy"]["mean"] is None:
            continue
        ax.errorbar(100 * o["accuracy"]["mean"], 100 * o["asr"]["mean"], xerr=100 * o["accuracy"]["std"],
                    yerr=100 * o["asr"]["std"], color=styles[d][0], marker=styles[d][1], capsize=3, label=d,
                    linestyle="none")
        ax.annotate(d, (100 * o["accuracy"]["mean"], 100 * o["asr"]["mean"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("task accuracy (%)")
    ax.set_ylabel("ASR (%)")
    ax.set_title("ASR against accuracy (all cells; lower right is better)")
    ax.grid(alpha=0.3)
    write_figure_atomic(fig, out / "asr_vs_accuracy.png")
    paths.append(out / "asr_vs_accuracy.png")
    return paths
