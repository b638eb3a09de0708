"""`dlm-ls fill` end to end: a real subprocess, JSON Lines in and out, bad lines answered per line."""

from __future__ import annotations

import json
import subprocess
import sys


def run_fill(model_dir, lines: list[str], *flags: str) -> tuple[list[dict], subprocess.CompletedProcess]:
    proc = subprocess.run(
        [sys.executable, "-m", "dlm_ls.model.fill_cmd", "--model", str(model_dir), "--max-tokens", "6", *flags],
        input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=300)
    return [json.loads(line) for line in proc.stdout.splitlines()], proc


def test_fill_answers_every_line_in_order(tiny_model_dir):
    lines = [
        json.dumps({"id": "a", "prefix": "def add(a, b):\n    return ", "suffix": "\n"}),
        "this is not json",
        json.dumps({"id": 7, "prefix": 3}),
        json.dumps([1, 2]),
        json.dumps({"id": {"nested": True}, "prefix": "x = ", "suffix": "", "max_tokens": 3}),
        json.dumps({"id": "big", "prefix": "y", "suffix": "", "max_tokens": 0}),
    ]
    out, proc = run_fill(tiny_model_dir, lines)
    assert proc.returncode == 0, proc.stderr
    assert len(out) == 6
    assert out[0]["id"] == "a" and isinstance(out[0]["middle"], str) and out[0]["nfe"] >= 1 and out[0]["ms"] > 0
    assert out[1] == {"id": None, "error": out[1]["error"]} and "not JSON" in out[1]["error"]
    assert out[2]["id"] == 7 and "prefix" in out[2]["error"]
    assert "object" in out[3]["error"]
    assert out[4]["id"] == {"nested": True} and "middle" in out[4]
    assert "max_tokens" in out[5]["error"]
    assert "2 line(s)" not in proc.stderr and "4 line(s)" in proc.stderr


def test_fill_ar_strategy_and_line_mode(tiny_model_dir):
    line = json.dumps({"id": 1, "prefix": "for i in range(", "suffix": "):\n    pass\n"})
    out, proc = run_fill(tiny_model_dir, [line], "--strategy", "ar", "--mode", "line")
    assert proc.returncode == 0, proc.stderr
    assert "\n" not in out[0]["middle"]
    assert out[0]["nfe"] <= 7  # one pass per token, at most max_tokens + the ending pad


def test_fill_help_and_bad_flags():
    proc = subprocess.run([sys.executable, "-m", "dlm_ls.model.fill_cmd", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--strategy" in proc.stdout and "--mode" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "dlm_ls.model.fill_cmd", "--strategy", "beam"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
