"""Ship a trained checkpoint as the repository's default model, with its data card.

Reads a training run's checkpoint folder (fp32 weights, config, tokenizer), writes `model/default/`
with bf16 weights in shards of at most 15 MB, the tokenizer, the sampler defaults, the corpus
manifest (`data_manifest.json`), and `DATA_CARD.md`: what the model is, the exact training
command, data, steps, hours, hardware, and the evaluation numbers (read from an eval JSON, never
typed by hand). It knows checkpoint folders and the training log's format; it trains nothing.

    python -m dlm_ls.model.train.ship --run runs/cpu-small --eval bench/results/eval.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..config import SamplerConfig
from ..load import DEFAULT_MODEL_DIR, load_model, load_sampler_config, save_checkpoint

MAX_TOTAL_BYTES = 60 * 1024 * 1024


def read_log(run: Path) -> tuple[dict, list[dict]]:
    """The run's first start event (its configuration and command) and its step records.

    Runs before the start event went to log.jsonl printed it only on stdout (stdout.log).
    """
    start, steps = {}, []
    sources = [run / "log.jsonl", run / "stdout.log"]
    for path in sources:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            at = line.find('{"event": "start"')
            if at >= 0 and not start:
                start = json.loads(line[at:])
            elif path.name == "log.jsonl" and line.startswith("{") and '"event"' not in line:
                steps.append(json.loads(line))
    return start, steps


def resumes(run: Path) -> list[dict]:
    """The start events after a run's first: each `--resume` of it, with its command and step."""
    path = run / "log.jsonl"
    if not path.exists():
        return []
    starts = [json.loads(line) for line in path.read_text(errors="replace").splitlines() if line.startswith('{"event": "start"')]
    return starts[1:]


def run_summary(steps: list[dict]) -> dict:
    """A run's last step record, its steps, tokens and hours, and its last validation loss.

    A resumed run logs its steps' times from each process's own start, so the hours are summed
    over those segments (a time that goes down starts a new one).
    """
    last = steps[-1] if steps else {}
    val = [s for s in steps if "val_loss" in s]
    seconds = sum(a.get("time", 0.0) for a, b in zip(steps, steps[1:]) if b.get("time", 0.0) < a.get("time", 0.0))
    seconds += last.get("time", 0.0)
    return {"last": last, "steps": last.get("step"), "tokens": last.get("tokens", 0),
            "hours": seconds / 3600.0, "val_loss": val[-1]["val_loss"] if val else None,
            "val_step": val[-1].get("step") if val else None}


STAGES_FILE = "training_stages.json"  # beside the weights of a shipped folder: every stage behind them


def _stage_lines(stages: list[dict], current: dict) -> list[str]:
    if not stages:
        return []
    out = ["The run above started from the weights of earlier runs (`--init-from`), oldest first:", ""]
    for s in stages:
        if s.get("missing"):
            out.append(f"- `{s['run']}` (its log is not here)")
            continue
        where = f" on {s['hardware']}" if s.get("hardware") else ""
        out.append(f"- `{s['run']}`, `{s['command']}`: {s['steps']} steps, {s['tokens'] / 1e6:.2f} M tokens, {s['hours']:.2f} hours"
                   f"{where}, validation loss {s['val_loss']}")
    total_tokens = sum(s.get("tokens") or 0 for s in stages) + current["tokens"]
    total_hours = sum(s.get("hours") or 0.0 for s in stages) + current["hours"]
    out += ["", f"In all: {total_tokens / 1e6:.2f} M tokens, {total_hours:.2f} hours.", ""]
    return out


def _fmt_eval(ev: dict) -> str:
    """A markdown table from `dlm-ls eval`'s summary: per strategy and task kind."""
    rows = ["| strategy | kind | tasks | exact match | parses | mean NFE | tokens/pass | ms |",
            "|---|---|---|---|---|---|---|---|"]
    for config, kinds in ev.get("summary", {}).items():
        for kind, s in kinds.items():
            rows.append(f"| {config} | {kind} | {s.get('n')} | {s.get('exact_match', 0):.3f} | "
                        f"{s.get('parse_rate', 0):.3f} | {s.get('mean_nfe', 0):.1f} | "
                        f"{s.get('tokens_per_pass', 0):.2f} | {s.get('mean_wall_ms', 0):.0f} |")
    return "\n".join(rows)


def earlier_stages(run: Path, depth: int = 8) -> list[dict]:
    """The runs this one was started from (`--init-from`), oldest first, each summarized.

    A run folder is read from its log; a shipped folder (model/default) from the stages file that
    `ship` wrote beside its weights, so the chain survives the runs' folders.
    """
    stages: list[dict] = []
    start, _ = read_log(run)
    while depth > 0:
        source = (start.get("config") or {}).get("init_from") or ""
        if not source:
            break
        folder = Path(source)
        prev = folder.parent if folder.name == "latest" else folder
        start, steps = read_log(prev)
        if not start:
            shipped = prev / STAGES_FILE
            if shipped.exists():
                # A folder shipped before from this chain (re-shipping into model/default, which the
                # chain started from) lists some of its runs already: each run once.
                # (resolved: runs/campaign may be a link to a run's own folder)
                seen = {run.resolve()} | {Path(st["run"]).resolve() for st in stages if "run" in st}
                stages += [st for st in json.loads(shipped.read_text()) if Path(st.get("run", "")).resolve() not in seen][::-1]
            else:
                stages.append({"run": source, "missing": True})
            break
        stages.append(stage_record(prev, start, steps))
        depth -= 1
    return stages[::-1]


def stage_record(run: Path, start: dict, steps: list[dict]) -> dict:
    c = start.get("config") or {}
    command = start.get("command") or ("command not logged; config: " + ", ".join(
        f"{k} {c[k]}" for k in ("preset", "seq_len", "batch_size", "lr", "warmup", "max_minutes", "threads", "seed")
        if k in c))
    summary = run_summary(steps)
    return {"run": str(run), "command": command, "hardware": start.get("hardware"),
            **{k: summary[k] for k in ("steps", "tokens", "hours", "val_loss")}}


def data_card(run: Path, model_cfg: dict, manifest: dict, ev: dict | None, extra_note: str,
              train_command: str | None = None) -> str:
    """The card's markdown: `model_cfg` is the shipped model's config (as written to config.json)."""
    start, steps = read_log(run)
    if train_command:
        start["command"] = train_command
    cfg = start.get("config", {})
    summary = run_summary(steps)
    last, hours = summary["last"], summary["hours"]
    params = start.get("params")
    split_rows = []
    for name, split in manifest.get("splits", {}).items():
        pkgs = ", ".join(sorted(split.get("packages", {}))) if name != "train" else f"{len(split.get('packages', {}))} packages"
        split_rows.append(f"| {name} | {split.get('files')} | {split.get('bytes', 0) / 1e6:.1f} MB | "
                          f"{split.get('tokens', 0) / 1e6:.2f} M | {pkgs} |")
    licenses = sorted({p.get("license") for s in manifest.get("splits", {}).values() for p in s.get("packages", {}).values()})
    stages = earlier_stages(run)
    lines = [
        "# dlm-ls default model: data card",
        "",
        f"A {params / 1e6:.1f}M-parameter masked-diffusion code model (preset `{cfg.get('preset')}`), trained "
        f"{f'in {len(stages) + 1} stages' if stages else 'from scratch'} for Python infilling in dlm-ls's own layout (suffix first, causal cached context, bidirectional canvas; "
        "see model/tokens.py). It ships in the repository so that a fresh clone completes code with no download."
        if params else "A masked-diffusion code model trained for dlm-ls's infill layout.",
        "",
        extra_note,
        "",
        "## Training",
        "",
        f"- Command: `{start.get('command', 'python -m dlm_ls.model.train.loop ' + ' '.join(f'--{k} {v}' for k, v in cfg.items()))}`",
        f"- Hardware: {start.get('hardware', platform.processor() or platform.machine())}, device `{start.get('device')}`, "
        f"{cfg.get('threads', '?')} thread(s); torch {torch.__version__}",
        *[f"- Resumed at step {r.get('step')}: `{r.get('command')}` ({r.get('step_variant', 'fp32 eager')} step)"
          for r in resumes(run)],
        f"- Steps: {last.get('step')} of batch {cfg.get('batch_size')} x {cfg.get('seq_len')} tokens "
        f"({last.get('tokens', 0) / 1e6:.2f} M tokens seen), {hours:.2f} hours",
        f"- Final training loss {last.get('loss')}, canvas loss {last.get('canvas_loss')}, context next-token loss {last.get('ctx_loss')}",
        f"- Validation loss (held-out packages): {'n/a' if summary['val_loss'] is None else summary['val_loss']} at step {summary['val_step']}",
        f"- Network: {model_cfg.get('n_layers')} layers, dim {model_cfg.get('dim')}, {model_cfg.get('n_heads')} heads "
        f"({model_cfg.get('n_kv_heads')} kv), SwiGLU {model_cfg.get('ffn_dim')}, vocab {model_cfg.get('vocab_size')}, tied embeddings",
        "- Weights: bf16 safetensors, shards of at most 15 MB",
        f"- Context: rows of {model_cfg.get('trained_context')} tokens; the engine's default context budget stays "
        "inside them",
        "",
        *_stage_lines(stages, summary),
        "## Data",
        "",
        f"Python source from the standard library and installed site-packages, permissive licenses only ({', '.join(l for l in licenses if l)}), "
        "generated/minified/oversized files and exact and near duplicates dropped, split by whole package, "
        "HumanEval problems kept out. Full per-package list: `data_manifest.json`.",
        "",
        "| split | files | bytes | tokens | packages |",
        "|---|---|---|---|---|",
        *split_rows,
        "",
        f"Corpus command: `{manifest.get('command')}` ({manifest.get('created')})",
        "",
        "## Evaluation",
        "",
    ]
    if ev:
        m = ev.get("machine", {})
        lines += [f"Command: `{ev.get('command', '?')}`; {ev.get('date', '?')}; {m.get('cpu', '?')}, "
                  f"{m.get('cpus', '?')} cores, torch {m.get('torch', '?')}, device {m.get('device', '?')}", "",
                  _fmt_eval(ev)]
        if ev.get("likelihood"):
            lines += ["", "The true middles' negative log-likelihood under the model (`ar` factorization), nats per "
                      "token: " + ", ".join(f"{k} {v['nll_per_token']:.3f}" for k, v in ev["likelihood"].items()) + "."]
        if ev.get("target"):
            from .evaluate import format_target

            lines += ["", "Issue 3's target: " + format_target(ev["target"]) + "."]
    else:
        lines += ["Not evaluated yet."]
    return "\n".join(lines) + "\n"


def ship(run: Path, out: Path, eval_json: Path | None, manifest_path: Path, note: str,
         sampler: SamplerConfig | None, train_command: str | None = None) -> list[Path]:
    checkpoint = run / "latest" if (run / "latest" / "config.json").exists() else run
    model = load_model(checkpoint, "cpu", "fp32")
    if model.config.trained_context is None:  # runs from before the field: their logged row length
        seq_len = (read_log(run)[0].get("config") or {}).get("seq_len")
        if seq_len:
            model.config = dataclasses.replace(model.config, trained_context=int(seq_len))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(model, tmp, sampler or load_sampler_config(checkpoint), checkpoint / "tokenizer.json",
                    dtype=torch.bfloat16)
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    if manifest:
        (tmp / "data_manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    ev = json.loads(eval_json.read_text()) if eval_json and eval_json.exists() else None
    start, steps = read_log(run)
    chain = [s for s in earlier_stages(run) if not s.get("missing")] + [stage_record(run, start, steps)]
    (tmp / STAGES_FILE).write_text(json.dumps(chain, indent=1) + "\n")
    (tmp / "DATA_CARD.md").write_text(data_card(run, model.config.to_dict(), manifest, ev, note, train_command))
    weights = sum(p.stat().st_size for p in tmp.glob("model*.safetensors"))
    if weights > MAX_TOTAL_BYTES:
        raise SystemExit(f"weights are {weights / 2**20:.1f} MB; the repository's budget is 60 MB")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return sorted(out.iterdir())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dlm-ls ship", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, type=Path, help="training run folder (holds log.jsonl and latest/)")
    p.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--eval", type=Path, default=None, help="JSON written by dlm-ls eval")
    p.add_argument("--manifest", type=Path, default=Path("data/corpus/manifest.json"))
    p.add_argument("--note", default="", help="a paragraph for the data card (e.g. 'trained on a CPU; a GPU run replaces it')")
    p.add_argument("--sampler", type=Path, default=None, help="sampler.json with tuned defaults")
    p.add_argument("--train-command", default=None,
                   help="the exact training command, for runs whose log predates recording it")
    args = p.parse_args(argv)
    sampler = SamplerConfig.from_dict(json.loads(args.sampler.read_text())) if args.sampler else None
    for path in ship(args.run, args.out, args.eval, args.manifest, args.note, sampler, args.train_command):
        print(f"{path}  {path.stat().st_size / 2**20:.2f} MB")
    print(f"shipped {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
