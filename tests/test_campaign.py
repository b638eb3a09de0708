"""The campaign record (bench/campaign.py): points from eval results, the fit, the plot."""

from __future__ import annotations

import json

import pytest

from dlm_ls.bench import campaign


def _eval(line: float, block: float) -> dict:
    return {"command": "dlm-ls eval --model m", "date": "2026-12-01T00:00:00+00:00", "model": "m",
            "machine": {"cpu": "AMD EPYC"}, "summary": {"ar": {"line": {"exact_match": 0.05}}},
            "likelihood": {"line": {"n": 40, "nll_per_token": line}, "block": {"n": 40, "nll_per_token": block}}}


def test_power_law_fit_recovers_its_curve_and_the_tokens_for_the_target():
    points = [{"tokens": t, "line_nll": 20.0 * t ** -0.1} for t in (1e6, 4e6, 16e6)]
    a, b = campaign.fit_power_law(points)
    assert a == pytest.approx(20.0, rel=1e-6) and b == pytest.approx(0.1, rel=1e-6)
    assert campaign.tokens_for(3.0, (a, b)) == pytest.approx((20.0 / 3.0) ** 10, rel=1e-6)
    assert campaign.fit_power_law(points[:1]) is None
    assert campaign.tokens_for(3.0, (6.0, -0.01)) is None  # rising: no estimate


def test_add_then_plot_keeps_every_point_with_its_eval_command(tmp_path, capsys):
    record = tmp_path / "campaign.json"
    for i, (tokens, line) in enumerate(((5e6, 6.7), (13e6, 6.2))):
        (tmp_path / f"e{i}.json").write_text(json.dumps(_eval(line, line - 0.2)))
        assert campaign.main(["--record", str(record), "add", "--eval", str(tmp_path / f"e{i}.json"),
                              "--tokens", str(tokens), "--recipe", "A", "--label", f"stage {i}"]) == 0
    data = json.loads(record.read_text())
    assert [p["line_nll"] for p in data["points"]] == [6.7, 6.2]
    assert data["points"][0]["eval_command"] == "dlm-ls eval --model m" and data["points"][1]["ar_line_exact"] == 0.05
    assert campaign.main(["--record", str(record), "plot"]) == 0
    assert (tmp_path / "campaign.png").stat().st_size > 1000
    assert "3.0 nats/token at ~" in capsys.readouterr().out
