"""`dlm-ls bench ratio`: what parallel refinement buys over one-token-per-pass decoding, same model.

One run over the quality benchmark's tasks, tasks outer and settings inner, every setting from
the same warm context cache:

  parallel (sampler.json's defaults) against ar (block size 1, one step: the same weights used
  autoregressively) -> quality delta (exact match, parse rate, pass@1: parallel minus ar),
  NFE ratio = mean ar NFE / mean parallel NFE, wall-clock ratio = mean ar ms / mean parallel ms
  (refinement on a warm context; the prefill both share is reported apart);

  a sweep of the commit threshold (and optionally max steps) for `parallel` -> the quality/speed
  curve, bench/results/quality_speed.png, and the ratio "at equal quality": the cheapest parallel
  setting whose exact match is at least ar's.

Knows the quality run's summaries and matplotlib; knows nothing of the engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..model.train.evaluate import Config

GROUP = "all"  # the task group the headline figures use (every held-out and execution task)


def sweep_configs(thresholds: Sequence[float], max_steps: Sequence[int], default_threshold: float) -> list[Config]:
    """Parallel settings besides the default one (a threshold equal to the default is that one)."""
    out = [Config(f"t={t:g}", "parallel", {"threshold": float(t)}) for t in thresholds
           if abs(float(t) - default_threshold) > 1e-9]
    out += [Config(f"steps={s}", "parallel", {"max_steps": int(s)}) for s in max_steps]
    return out


def _div(a: float, b: float) -> float | None:
    return a / b if b else None


def ratios(summary: dict, group: str = GROUP) -> dict:
    """Parallel against ar, from a quality summary {config: {group: stats}} holding both."""
    p, a = summary["parallel"][group], summary["ar"][group]
    out = {
        "group": group, "n": p["n"],
        "nfe_ratio": _div(a["mean_nfe"], p["mean_nfe"]),
        "wall_ratio": _div(a["mean_wall_ms"], p["mean_wall_ms"]),
        "engine_ms_ratio": _div(a["mean_ms"], p["mean_ms"]),
        "tokens_per_pass": {"parallel": p["tokens_per_pass"], "ar": a["tokens_per_pass"]},
        "quality_delta": {"exact_match": p["exact_match"] - a["exact_match"],
                          "parse_rate": p["parse_rate"] - a["parse_rate"]},
    }
    if "pass_at_1" in p and "pass_at_1" in a:
        out["quality_delta"]["pass_at_1"] = p["pass_at_1"] - a["pass_at_1"]
    return out


def curve(summary: dict, settings: dict[str, dict], group: str = GROUP) -> list[dict]:
    """One point per parallel setting, ordered by mean NFE, plus the ar point last."""
    pts = []
    for name, s in settings.items():
        if name not in summary:
            continue
        st = summary[name][group]
        pts.append({"config": name, "strategy": s["strategy"], "threshold": s.get("threshold"),
                    "max_steps": s.get("max_steps"), "exact_match": st["exact_match"],
                    "parse_rate": st["parse_rate"], "pass_at_1": summary[name].get("exec", {}).get("pass_at_1"),
                    "mean_nfe": st["mean_nfe"], "mean_wall_ms": st["mean_wall_ms"],
                    "tokens_per_pass": st["tokens_per_pass"]})
    par = sorted((p for p in pts if p["strategy"] == "parallel"), key=lambda p: p["mean_nfe"])
    return par + [p for p in pts if p["strategy"] == "ar"]


def at_equal_quality(points: list[dict]) -> dict | None:
    """The parallel setting with the fewest NFE whose exact match reaches ar's, and its ratios to ar."""
    ar = next((p for p in points if p["strategy"] == "ar"), None)
    if ar is None or ar["exact_match"] <= 0:  # matching a zero is no claim at all
        return None
    ok = [p for p in points if p["strategy"] == "parallel" and p["exact_match"] >= ar["exact_match"]]
    if not ok:
        return None
    best = min(ok, key=lambda p: (p["mean_nfe"], p["mean_wall_ms"]))
    return {"config": best["config"], "exact_match": best["exact_match"], "ar_exact_match": ar["exact_match"],
            "nfe_ratio": _div(ar["mean_nfe"], best["mean_nfe"]),
            "wall_ratio": _div(ar["mean_wall_ms"], best["mean_wall_ms"])}


def plot(points: list[dict], path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    par = [p for p in points if p["strategy"] == "parallel"]
    ar = [p for p in points if p["strategy"] == "ar"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, x, label in ((axes[0], "mean_nfe", "mean forward passes per task (NFE)"),
                         (axes[1], "mean_wall_ms", "mean refinement time per task (ms, warm context)")):
        ax.plot([p[x] for p in par], [p["exact_match"] for p in par], "o-", color="tab:blue",
                label="parallel: exact match")
        if any(p["pass_at_1"] is not None for p in par):
            ax.plot([p[x] for p in par], [p["pass_at_1"] or 0.0 for p in par], "s--", color="tab:green",
                    label="parallel: pass@1 (exec tasks)")
        ax.plot([p[x] for p in par], [p["parse_rate"] for p in par], "^:", color="tab:gray", label="parallel: parses")
        for p in par:
            name = f"t={p['threshold']:g} (default)" if p["config"] == "parallel" else p["config"]
            ax.annotate(name, (p[x], p["exact_match"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        for p in ar:
            ax.plot([p[x]], [p["exact_match"]], "*", color="tab:red", markersize=13, label="ar: exact match")
            if p["pass_at_1"] is not None:
                ax.plot([p[x]], [p["pass_at_1"]], "P", color="tab:orange", markersize=10, label="ar: pass@1")
            ax.plot([p[x]], [p["parse_rate"]], "v", color="black", markersize=8, label="ar: parses")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("rate")
        ax.set_ylim(-0.02, 1.05)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(title or "quality against speed: commit threshold sweep", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_ratio(r: dict, eq: dict | None, points: list[dict]) -> str:
    from .common import table

    lines = [f"parallel vs ar over {r['n']} tasks ({r['group']}):",
             f"  NFE ratio (ar / parallel)        {_fmt(r['nfe_ratio'])}",
             f"  wall-clock ratio (ar / parallel) {_fmt(r['wall_ratio'])}",
             f"  tokens per forward pass          parallel {_fmt(r['tokens_per_pass']['parallel'])}, "
             f"ar {_fmt(r['tokens_per_pass']['ar'])}",
             "  quality delta (parallel - ar)    " + ", ".join(f"{k} {v:+.3f}" for k, v in r["quality_delta"].items())]
    if eq is not None:
        lines.append(f"  at equal quality ({eq['config']}: exact {eq['exact_match']:.3f} >= "
                     f"ar {eq['ar_exact_match']:.3f}): "
                     f"NFE ratio {_fmt(eq['nfe_ratio'])}, wall-clock ratio {_fmt(eq['wall_ratio'])}")
    else:
        lines.append("  at equal quality: none (no parallel setting reached ar's exact match, or ar's is 0)")
    rows = [[p["config"], p["threshold"], p["max_steps"], p["exact_match"], p["pass_at_1"], p["mean_nfe"],
             p["tokens_per_pass"], p["mean_wall_ms"]] for p in points]
    lines += ["", table(rows, ["config", "threshold", "max_steps", "exact", "pass@1", "NFE", "tok/pass", "ms"])]
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"
