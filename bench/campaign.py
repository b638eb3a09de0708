"""The model campaign's record: held-out likelihood of every evaluated checkpoint against the tokens it saw.

    python -m dlm_ls.bench.campaign add --eval EVAL.json --tokens 14.3e6 --recipe B --label "stage 3, step 340"
    python -m dlm_ls.bench.campaign plot      # bench/results/campaign.png and the extrapolation

bench/results/campaign.json keeps one point per evaluated checkpoint, across sessions and machines:
the tokens its weights have seen in all stages, the recipe it was trained with, and the true middles'
NLL per token on line and block tasks and ar's exact match (from a `dlm-ls eval` JSON, whose command,
date and machine the point keeps). `plot` draws NLL against tokens, one line per recipe, and fits
NLL = a * tokens^-b to the recipe's points to estimate the tokens that issue 12's target of 3.0
nats/token on line tasks needs: a power law through a few short-run points, so a direction, not
a promise. Knows result files; nothing of models.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .common import RESULTS_DIR

RECORD = RESULTS_DIR / "campaign.json"
TARGET_LINE_NLL = 3.0  # issue 12: true-middle NLL on held-out line tasks, nats per token


def load(path: Path = RECORD) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"points": []}


def point_from_eval(eval_json: dict, tokens: float, recipe: str, label: str) -> dict:
    like, summary = eval_json["likelihood"], eval_json["summary"]
    ar_line = summary.get("ar", {}).get("line", {})
    return {"label": label, "recipe": recipe, "tokens": int(tokens),
            "line_nll": round(like["line"]["nll_per_token"], 4), "block_nll": round(like["block"]["nll_per_token"], 4),
            "ar_line_exact": ar_line.get("exact_match"), "tasks_per_kind": like["line"]["n"],
            **{f"line_{k}": round(like["line"][k], 4) for k in ("middle_nll_per_token", "end_nll",
                                                                  "context_head_nll_per_token") if k in like["line"]},
            "model": eval_json.get("model"), "eval_command": eval_json.get("command"), "date": eval_json.get("date"),
            "machine": (eval_json.get("machine") or {}).get("cpu")}


def fit_power_law(points: list[dict]) -> tuple[float, float] | None:
    """(a, b) of line NLL = a * tokens^-b by least squares in log-log space; None for fewer than 2 points."""
    xy = [(math.log(p["tokens"]), math.log(p["line_nll"])) for p in points if p["tokens"] > 0]
    if len(xy) < 2 or len({x for x, _ in xy}) < 2:
        return None
    mx, my = sum(x for x, _ in xy) / len(xy), sum(y for _, y in xy) / len(xy)
    slope = sum((x - mx) * (y - my) for x, y in xy) / sum((x - mx) ** 2 for x, _ in xy)
    return math.exp(my - slope * mx), -slope


def tokens_for(target: float, fit: tuple[float, float] | None) -> float | None:
    if fit is None or fit[1] <= 0:
        return None  # flat or rising: no estimate
    a, b = fit
    return (a / target) ** (1 / b)


def summary(record: dict) -> list[str]:
    lines = [f"{'label':34s} {'recipe':8s} {'tokens':>8s} {'line':>7s} {'block':>7s} {'ar exact':>8s}"]
    for p in sorted(record["points"], key=lambda p: p["tokens"]):
        lines.append(f"{p['label'][:34]:34s} {p['recipe'][:8]:8s} {p['tokens'] / 1e6:7.2f}M {p['line_nll']:7.3f} "
                     f"{p['block_nll']:7.3f} {p['ar_line_exact'] if p['ar_line_exact'] is not None else '-':>8}")
    for recipe in sorted({p["recipe"] for p in record["points"]}):
        pts = [p for p in record["points"] if p["recipe"] == recipe]
        fit = fit_power_law(pts)
        need = tokens_for(TARGET_LINE_NLL, fit)
        lines.append(f"recipe {recipe}: " + ("too few points to fit" if fit is None else
                     f"line NLL ~ {fit[0]:.2f} * tokens^-{fit[1]:.4f}; " +
                     ("no estimate (not falling)" if need is None else f"{TARGET_LINE_NLL} nats/token at ~{need:.2g} tokens")))
    return lines


def plot(record: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for recipe in sorted({p["recipe"] for p in record["points"]}):
        pts = sorted((p for p in record["points"] if p["recipe"] == recipe), key=lambda p: p["tokens"])
        ax.plot([p["tokens"] / 1e6 for p in pts], [p["line_nll"] for p in pts], "o-", label=f"{recipe}: line tasks")
        ax.plot([p["tokens"] / 1e6 for p in pts], [p["block_nll"] for p in pts], "s--", alpha=0.6,
                label=f"{recipe}: block tasks")
    ax.axhline(TARGET_LINE_NLL, color="gray", lw=0.8, ls=":", label=f"target, line tasks ({TARGET_LINE_NLL})")
    ax.set_xlabel("tokens seen by the weights, all stages (millions)")
    ax.set_ylabel("true middle NLL, nats per token")
    ax.set_title("Held-out infill likelihood of the shipped-format (bf16) weights")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dlm_ls.bench.campaign", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("add", help="record one evaluated checkpoint")
    a.add_argument("--eval", required=True, help="JSON written by dlm-ls eval --out")
    a.add_argument("--tokens", type=float, required=True, help="tokens its weights saw in all stages")
    a.add_argument("--recipe", required=True, help="a short name, explained in docs/training.md")
    a.add_argument("--label", required=True)
    sub.add_parser("plot", help="draw bench/results/campaign.png and print the fit")
    p.add_argument("--record", type=Path, default=RECORD)
    args = p.parse_args(argv)
    record = load(args.record)
    if args.cmd == "add":
        record["points"].append(point_from_eval(json.loads(Path(args.eval).read_text()), args.tokens, args.recipe,
                                                args.label))
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(json.dumps(record, indent=1) + "\n")
    else:
        print(f"wrote {plot(record, args.record.with_suffix('.png'))}")
    print("\n".join(summary(record)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
