"""The benchmark harness on a tiny random model: formats and arithmetic, never speed."""

from __future__ import annotations

import asyncio
import json
import math
import random
from pathlib import Path

import pytest
import torch

from dlm_ls.bench import cli, common, execution, latency, quality, ratio, report, step
from dlm_ls.model.train.evaluate import Config


# --------------------------------------------------------------------------- execution tasks


class _TooLong(Exception):
    pass


def _runs_in_process(program: str, test: str, max_lines: int = 200_000) -> bool:
    """The sandbox's check without a subprocess (the task code is ours and trusted); a line budget
    stands in for the timeout, since a punched-out loop update can loop forever."""
    import sys

    scope: dict = {"__name__": "exec_task"}
    budget = [max_lines]

    def tracer(frame, event, arg):
        if frame.f_code.co_filename != "<task>":
            return None
        if event == "line":
            budget[0] -= 1
            if budget[0] < 0:
                raise _TooLong()
        return tracer

    old = sys.gettrace()
    sys.settrace(tracer)
    try:
        exec(compile(program + "\n\n" + test + "\n\ncheck()\n", "<task>", "exec"), scope)
        return True
    except Exception:  # noqa: BLE001 - any failure (a syntax error too) means the test did not pass
        return False
    finally:
        sys.settrace(old)


def test_every_exec_task_passes_with_its_middle_and_fails_without():
    tasks = execution.exec_tasks()
    names = {t.extra["name"] for t in tasks}
    assert 20 <= len(names) <= 30 and len(tasks) == 3 * len(names)
    assert {t.kind for t in tasks} == {"exec-line", "exec-block", "exec-span"}
    for t in tasks:
        assert t.middle and t.middle.strip() == t.middle
        assert _runs_in_process(t.prefix + t.middle + t.suffix, t.extra["test"]), t.id
        assert not _runs_in_process(t.prefix + t.suffix, t.extra["test"]), f"{t.id}: the test misses the hole"
        if t.kind == "exec-line":
            assert "\n" not in t.middle
        if t.kind == "exec-block":
            assert "\n" in t.middle


def test_hole_specs_must_be_unique():
    with pytest.raises(ValueError, match="occurs 2 times"):
        execution._hole("x = 1\nx = 1\n", "line", "x = 1")
    with pytest.raises(ValueError, match="occurs 0 times"):
        execution._hole("x = 1\n", "span", "y")


def test_sandbox_passes_fails_times_out_and_has_no_network():
    ok = execution.run_program("def f():\n    return 1\n", "def check():\n    assert f() == 1\n")
    assert ok.passed and ok.status == "passed"
    bad = execution.run_program("def f():\n    return 2\n", "def check():\n    assert f() == 1\n")
    assert not bad.passed and "AssertionError" in bad.detail
    slow = execution.run_program("while True:\n    pass\n", "def check():\n    pass\n", timeout_s=1.0)
    assert slow.status == "timeout"
    net = execution.run_program("import socket\nsocket.create_connection(('127.0.0.1', 9))\n", "def check():\n    pass\n")
    assert not net.passed and "network" in net.detail


# --------------------------------------------------------------------------- quality and ratio


@pytest.fixture(scope="module")
def infiller(tiny_model_dir):
    import torch

    from dlm_ls.model.infill import Infiller

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Infiller(tiny_model_dir, device="cpu", max_context_tokens=1024)
    torch.set_num_threads(threads)


def _small_tasks():
    tasks = quality.load_tasks(1, 1)
    for t in tasks:  # a tiny random model never stops by itself: keep its middles short
        t.max_tokens = 6
    return tasks


def test_quality_arithmetic_on_a_tiny_model(infiller):
    tasks = _small_tasks()
    assert [t.kind for t in tasks] == ["line", "block", "span", "exec-line", "exec-block", "exec-span"]
    configs = [Config("parallel", "parallel", {"canvas_lengths": (4, 8)}), Config("ar", "ar")]
    summary, records = quality.run(infiller, tasks, configs)
    assert len(records) == len(tasks) * 2
    for r in records:
        assert r.error is None and r.nfe >= 1 and r.prefill_ms > 0 and r.wall_ms > 0
        assert (r.passed is not None) == r.kind.startswith("exec-")
        if r.strategy == "ar":
            assert r.tokens <= r.nfe <= 7  # one token per pass, at most max_tokens + the pad
    for config in ("parallel", "ar"):
        mine = [r for r in records if r.config == config]
        s = summary[config]["all"]
        assert s["n"] == len(mine)
        assert s["exact_match"] == sum(r.exact for r in mine) / len(mine)
        assert s["mean_nfe"] == sum(r.nfe for r in mine) / len(mine)
        assert s["tokens_per_pass"] == sum(r.tokens for r in mine) / sum(r.nfe for r in mine)
        ex = [r for r in mine if r.kind.startswith("exec-")]
        assert summary[config]["exec"]["pass_at_1"] == sum(bool(r.passed) for r in ex) / len(ex)
        assert summary[config]["heldout"]["n"] == 3
    assert "pass@1" in quality.format_quality(summary)


def test_a_true_middle_scores_exact_and_passes():
    t = [t for t in execution.exec_tasks() if t.kind == "exec-line"][0]
    rec = quality.Record(t.id, t.kind, "x", "parallel", t.middle, True, True, 1, 1, 1, 1.0, 1.0, 1.0, 1)
    quality.score_execution([t], [rec])
    assert rec.passed is True


def _summary(par_exact, par_nfe, par_ms, ar_exact, ar_nfe, ar_ms, tok=10.0):
    def s(exact, nfe, ms):
        return {"n": 4, "exact_match": exact, "parse_rate": 1.0, "mean_nfe": nfe, "mean_ms": ms, "mean_wall_ms": ms,
                "tokens_per_pass": tok / nfe, "pass_at_1": exact}
    return {"parallel": {"all": s(par_exact, par_nfe, par_ms), "exec": s(par_exact, par_nfe, par_ms)},
            "ar": {"all": s(ar_exact, ar_nfe, ar_ms), "exec": s(ar_exact, ar_nfe, ar_ms)}}


def test_ratio_arithmetic():
    summ = _summary(0.25, 4.0, 50.0, 0.5, 20.0, 150.0)
    r = ratio.ratios(summ)
    assert r["nfe_ratio"] == 20.0 / 4.0 and r["wall_ratio"] == 3.0
    assert r["quality_delta"]["exact_match"] == -0.25 and r["quality_delta"]["pass_at_1"] == -0.25
    assert r["tokens_per_pass"] == {"parallel": 2.5, "ar": 0.5}
    summ["t=0.99"] = {"all": {**summ["parallel"]["all"], "exact_match": 0.5, "mean_nfe": 8.0, "mean_wall_ms": 75.0}}
    summ["t=0.999"] = {"all": {**summ["parallel"]["all"], "exact_match": 0.75, "mean_nfe": 10.0, "mean_wall_ms": 90.0}}
    settings = {"parallel": {"strategy": "parallel", "threshold": 0.9}, "ar": {"strategy": "ar"},
                "t=0.99": {"strategy": "parallel", "threshold": 0.99}, "t=0.999": {"strategy": "parallel", "threshold": 0.999}}
    points = ratio.curve(summ, settings)
    assert [p["config"] for p in points] == ["parallel", "t=0.99", "t=0.999", "ar"]  # by NFE, ar last
    eq = ratio.at_equal_quality(points)
    assert eq["config"] == "t=0.99" and eq["nfe_ratio"] == 20.0 / 8.0 and eq["wall_ratio"] == 2.0
    worse = ratio.at_equal_quality([p for p in points if p["config"] == "parallel" or p["strategy"] == "ar"])
    assert worse is None
    zero = [{**p, "exact_match": 0.0} for p in points]
    assert ratio.at_equal_quality(zero) is None  # equal to a zero is no claim
    assert [c.name for c in ratio.sweep_configs([0.5, 0.9], [2], 0.9)] == ["t=0.5", "steps=2"]


def test_step_rows(infiller):
    res = step.measure(infiller, [32, 64], [1, 4], reps=2, warmup=1)
    assert [(r["context"], r["canvas"]) for r in res["rows"]] == [(32, 1), (32, 4), (64, 1), (64, 4)]
    for r in res["rows"]:
        assert r["steps"] == 2 and r["median_ms"] > 0 and r["prefill_ms"] > 0
        assert r["ms_per_slot"] == r["median_ms"] / r["canvas"]
        if r["canvas"] == 1:
            assert r["vs_ar_step"] == 1.0
    assert "x ar step" in step.format_step(res)


# --------------------------------------------------------------------------- the command and the report


def test_bench_command_writes_results_and_the_report_reads_them(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "results"
    argv = ["ratio", "--quick", "--model", str(tiny_model_dir), "--device", "cpu", "--threads", "1",
            "--out-dir", str(out), "--limit", "1", "--exec-limit", "1", "--thresholds", "0.5", "--max-tokens", "6"]
    assert cli.main(argv) == 0
    assert cli.main(["step", "--quick", "--model", str(tiny_model_dir), "--device", "cpu", "--out-dir", str(out),
                     "--contexts", "32", "--canvases", "1,4"]) == 0
    printed = capsys.readouterr().out
    assert "NFE ratio" in printed and "x ar step" in printed
    res = json.loads((out / "ratio-cpu.json").read_text())
    for key in ("benchmark", "date", "command", "git", "machine", "model", "ratio", "curve", "summary"):
        assert key in res, key
    assert res["command"].startswith("dlm-ls bench ratio --quick")
    assert res["machine"]["device"] == "cpu" and res["machine"]["cpus"] >= 1
    assert "commit" in res["git"] and res["model"]["parameters"] > 0
    s = res["summary"]
    assert math.isclose(res["ratio"]["nfe_ratio"], s["ar"]["all"]["mean_nfe"] / s["parallel"]["all"]["mean_nfe"])
    assert {p["config"] for p in res["curve"]} == {"parallel", "ar", "t=0.5"}
    assert (out / "quality_speed.png").stat().st_size > 1000
    assert not (out / "quality-cpu.json").exists()  # only what was asked for

    body = report.render(report.load_results(out))
    assert "Speed ratio" in body and "Refinement step" in body and "dlm-ls bench ratio" in body
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{report.START}\nold figures\n{report.END}\nafter\n")
    assert report.main(["--results", str(out), "--readme", str(readme), "--check"]) == 1
    assert report.main(["--results", str(out), "--readme", str(readme), "--write"]) == 0
    text = readme.read_text()
    assert "old figures" not in text and text.startswith("# x\n\nbefore\n") and text.endswith(f"{report.END}\nafter\n")
    assert "Speed ratio" in text
    assert report.main(["--results", str(out), "--readme", str(readme), "--check"]) == 0
    assert report.replace_section("no markers here", "body") is None


def test_bench_needs_a_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(common, "DEFAULT_MODEL_DIR", tmp_path / "missing")
    assert cli.main(["step"]) == 2
    assert "--model" in capsys.readouterr().err


# --------------------------------------------------------------------------- latency


def test_typing_script_rebuilds_the_file(tiny_model_dir):
    from tokenizers import Tokenizer

    text = json.loads(latency.LATENCY_FILE.read_text())["text"]
    tok = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    scene = latency.make_scene(text, tok, 256, 3, seed=0)
    assert 128 <= scene.context_tokens <= 320 and scene.typed.count("\n") == 2 and scene.after.startswith("\n")
    assert 0 in latency._code_lines(scene.before + scene.after)  # the document does not start inside a string
    events = latency.typing_script(scene.typed, seed=0)
    doc = scene.before + scene.after
    cursor = len(scene.before)
    for ev in events:
        doc = doc[:cursor] + ev.text + doc[cursor:]
        cursor += len(ev.text)
    assert doc == scene.before + scene.typed + scene.after
    assert any(ev.pause for ev in events) and {ev.kind for ev in events} <= {"key", "enter", "accept"}
    assert latency.typing_script(scene.typed, seed=0) == events  # seeded


def test_percentiles_nearest_rank():
    xs = list(range(1, 101))
    random.Random(0).shuffle(xs)
    p = latency.percentiles([float(x) for x in xs])
    assert (p["p50"], p["p95"], p["p99"], p["count"], p["max"]) == (50.0, 95.0, 99.0, 100, 100.0)
    assert latency.percentiles([])["p50"] is None


def test_worker_figures_from_status():
    status = {"cache": {"hits": 3, "misses": 1, "reused_tokens": 90, "computed_tokens": 10},
              "latency_ms": {"model": {"count": 4, "mean": 50.0}, "total": {"count": 5, "mean": 60.0}},
              "policy": {"counters": {"nfe": 20, "requests": 5, "cache_hits": 1, "type_through_hits": 2,
                                      "cache_misses": 5}}}
    f = latency._worker_figures(status)
    assert f["context_cache_hit_rate"] == 0.75 and f["context_tokens_reused"] == 0.9
    assert f["model_ms_per_forward_pass"] == 50.0 * 4 / 20
    assert f["result_cache_hit_rate"] == 3 / 8


@pytest.mark.slow
def test_latency_through_the_real_server(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(latency, "TYPING_MS", 40)
    monkeypatch.setattr(latency, "PAUSE_MS", 100)
    res = asyncio.run(latency.run_latency(Path(tiny_model_dir), (256,), lines_to_type=1, device="cpu",
                                          startup_runs=1, extra_options={"maxTokens": 4, "canvasLengths": [4]}))
    (c,) = res["contexts"]
    assert c["requests"] == c["keystrokes"] + c["accepts"] and c["requests"] > 5
    assert c["answered"] >= 1 and c["latency_ms"]["p50"] > 0 and c["errors"] == 0
    assert res["startup_ms"]["count"] == 1 and res["torch_in_server"] is False
    assert res["worker_rss"]["rss_bytes"] and res["server_rss"]["rss_bytes"]
    assert 0.0 <= res["context_cache_hit_rate"] <= 1.0
    # the model sees its own budget (the tiny fixture says no trained length: the engine default)
    assert res["context_budget_tokens"] == 2048 and res["full_context"] is False
    assert "p50 ms" in latency.format_latency(res)


def test_step_floor_arithmetic():
    from dlm_ls.bench.ceilings import step_floor
    from dlm_ls.model.config import ModelConfig

    cfg = ModelConfig.preset("tiny")
    ceil = {"bandwidth_gbs": 1.0, "matmul_tflops": 1e-3}  # 1 GB/s, 1 GFLOP/s: easy sums
    one = step_floor(cfg, context=100, new_tokens=1, ceilings=ceil, dtype_bytes=2)
    wide = step_floor(cfg, context=100, new_tokens=32, ceilings=ceil, dtype_bytes=2)
    weights = cfg.num_parameters() - cfg.vocab_size * cfg.dim  # tied: the head is the embedding, read once
    kv = cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * 101 * 2
    assert one.memory_ms == pytest.approx((weights * 2 + cfg.vocab_size * cfg.dim * 2 + cfg.dim * 2 + kv) / 1e6)
    assert wide.compute_ms > 30 * one.compute_ms  # the matrix work grows with the canvas, the reads barely
    assert wide.memory_ms < 1.1 * one.memory_ms
    assert one.ms == max(one.memory_ms, one.compute_ms)


def test_large_bench_runs_fixed_steps_and_reports_floors():
    from dlm_ls.bench import ceilings
    from dlm_ls.model.config import ModelConfig

    cfg = ModelConfig.preset("tiny")
    ceil = ceilings.measure_ceilings(torch.device("cpu"), copy_mib=4, matmul_n=64, reps=2)
    assert ceil["bandwidth_gbs"] > 0 and ceil["matmul_tflops"] > 0
    cases = (("line", 8, 8, 4), ("64-token", 16, 8, 4))  # the real cases' shapes, smaller: 1 and 2 blocks
    res = ceilings.measure_large(cfg, torch.device("cpu"), torch.float32, ceil, context=64, reps=1, cases=cases)
    by = {(r["case"], r["strategy"]): r for r in res["rows"]}
    assert by[("line", "parallel")]["nfe"] == by[("line", "parallel")]["expected_steps"] == 4
    assert by[("64-token", "parallel")]["nfe"] == by[("64-token", "parallel")]["expected_steps"] == 8
    assert by[("line", "ar")]["nfe"] == 8 and by[("64-token", "ar")]["nfe"] == 16
    for r in res["rows"]:
        assert r["floor_ms"] > 0 and r["x_floor"] == pytest.approx(r["latency_ms"] / r["floor_ms"])
    assert by[("line", "parallel")]["speedup_vs_ar"] > 0
    natural = by[("64-token", "dream (dual cache)")]  # 2 blocks x 4 steps, whatever the random weights say
    assert natural["nfe"] == natural["expected_steps"] == 8 and natural["floor_ms"] > 0


def test_recovery_and_startup_benchmarks_write_results_the_report_renders(tiny_model_dir, tmp_path, monkeypatch):
    from dlm_ls.bench import startup as bench_startup
    from dlm_ls.bench import recovery

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "results"
    assert recovery.main(["--model", str(tiny_model_dir), "--runs", "1", "--startup-runs", "1",
                          "--out-dir", str(out)]) == 0
    assert bench_startup.main(["--runs", "1", "--out-dir", str(out)]) == 0
    rec = json.loads((out / "recovery-cpu.json").read_text())
    assert rec["command"].startswith("python -m dlm_ls.bench.recovery --model")
    assert rec["variants"]["spare"]["served_by"] == ["spare"]  # the spare served after the kill
    assert rec["variants"]["no spare"]["served_by"] == ["new worker"]
    start = json.loads((out / "startup-cpu.json").read_text())
    assert start["torch_loaded"] is False and start["repeat_start"]["runs"] == 1
    body = report.render(report.load_results(out))
    assert "**Recovery**" in body and "**Server start**" in body and "unreadable" not in body


def test_threads_benchmark_writes_a_result_the_report_renders(tiny_model_dir, tmp_path):
    """Format only, never speed: both neighbours for each thread count, and the README section."""
    from dlm_ls.bench import threads

    out = tmp_path / "results"
    assert threads.main(["--model", str(tiny_model_dir), "--threads", "1,2", "--reps", "1", "--out-dir", str(out)]) == 0
    d = json.loads((out / "threads-cpu.json").read_text())
    assert [(r["threads"], r["neighbour"]) for r in d["rows"]] == [
        (1, "quiet"), (2, "quiet"), (1, "one busy core"), (2, "one busy core")]
    assert all(r["p50_ms"] > 0 for r in d["rows"]) and d["command"].startswith("python -m dlm_ls.bench.threads")
    body = report.render(report.load_results(out))
    assert "**CPU threads**" in body and "unreadable" not in body
