"""The `dlm-ls` command line: help everywhere, clear errors, `complete` on a real file."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest

from dlm_ls.lsp_server import cli


def test_top_level_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in [*cli.OWN, *cli.DELEGATED]:
        assert f"  {name} " in out
    assert cli.main([]) == 2  # no command: usage on stderr, an error status
    assert "usage" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["serve", "worker", "complete", *cli.DELEGATED])
def test_every_subcommand_has_help_or_says_it_is_missing(command, capsys):
    try:
        code = cli.main([command, "--help"])
    except SystemExit as exit:  # argparse's --help
        code = exit.code
    captured = capsys.readouterr()
    if code == 0:
        assert "usage" in captured.out.lower()
    else:  # a module another part of the project has not shipped yet
        assert code == 1 and "not available in this installation" in captured.err
        assert "Traceback" not in captured.err


def test_unknown_command_is_a_clear_error(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_a_failure_prints_one_line_not_a_traceback_unless_debug(tmp_path, capsys):
    missing = tmp_path / "nope.py"
    assert cli.main(["complete", str(missing), "--line", "1", "--col", "1"]) == 1
    err = capsys.readouterr().err
    assert f"dlm-ls complete: error: no such file: {missing}" in err and "Traceback" not in err
    assert cli.main(["--debug", "complete", str(missing), "--line", "1", "--col", "1"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_complete_rejects_positions_outside_the_file(tmp_path, capsys):
    f = tmp_path / "a.py"
    f.write_text("x = 1\n")
    assert cli.main(["complete", str(f), "--line", "9", "--col", "1"]) == 1
    assert "line 9 is outside the file (1..2)" in capsys.readouterr().err
    assert cli.main(["complete", str(f), "--line", "1", "--col", "40"]) == 1
    assert "column 40 is outside line 1 (1..6)" in capsys.readouterr().err


def test_complete_prints_a_suggestion_and_leaves_the_file_alone(tiny_model_dir, tmp_path, capsys):
    f = tmp_path / "add.py"
    source = "import os\n\n\ndef add(a, b):\n    return a\n"
    f.write_text(source)
    code = cli.main(["complete", str(f), "--line", "5", "--col", "13", "--model", str(tiny_model_dir),
                     "--device", "cpu", "--in-process", "--max-tokens", "4", "--json",
                     "--no-parse-filter"])  # a random model's text rarely parses
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["suggestion"] and out["mode"] == "line" and out["nfe"] >= 1 and out["ms"] > 0
    assert f.read_text() == source


def test_serve_path_does_not_import_torch():
    code = ("import sys, dlm_ls.lsp_server.cli, dlm_ls.lsp_server.server, dlm_ls.lsp_server.worker_client; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ})
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_serve_answers_initialize_with_and_without_its_code_cache(tmp_path, monkeypatch):
    from dlm_ls.bench.startup import one_run

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    command = [sys.executable, "-m", "dlm_ls.lsp_server.cli", "serve", "--model", str(tmp_path / "no-model")]
    first = one_run(command)  # writes the cache
    cached = list((tmp_path / "dlm-ls").glob("attrs-code-*.marshal"))
    assert len(cached) == 1 and cached[0].stat().st_mode & 0o777 == 0o600
    second = one_run(command, with_status=True)  # reads it
    assert first["wall_ms"] > 0 and second["torch_loaded"] is False
    assert list((tmp_path / "dlm-ls").glob("attrs-code-*.marshal")) == cached


@pytest.mark.parametrize("unsafe", ["folder-0777", "file-0666", "other-owner"])
def test_a_planted_code_cache_is_never_run_unless_ours_and_private(tmp_path, monkeypatch, unsafe):
    import marshal

    from dlm_ls.bench.startup import one_run

    if unsafe == "other-owner" and os.getuid() != 0:
        pytest.skip("chown to another user needs root")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    command = [sys.executable, "-m", "dlm_ls.lsp_server.cli", "serve", "--model", str(tmp_path / "no-model")]
    one_run(command)  # a genuine cache, to learn the keys the server looks up
    (path,) = (tmp_path / "dlm-ls").glob("attrs-code-*.marshal")
    marker = tmp_path / "planted-code-ran"
    planted = compile(f"open({str(marker)!r}, 'w').close()", "<planted>", "exec")
    keys = list(marshal.loads(path.read_bytes()))

    def plant() -> None:
        path.write_bytes(marshal.dumps({key: planted for key in keys}))
        path.chmod(0o600)

    plant()
    if unsafe == "folder-0777":
        path.parent.chmod(0o777)
    elif unsafe == "file-0666":
        path.chmod(0o666)
    else:
        os.chown(path.parent, 65534, 65534)
        os.chown(path, 65534, 65534)
    started = one_run(command, with_status=True)
    assert not marker.exists() and started["torch_loaded"] is False  # started normally, without the file's code
    # the same file where it is ours and private is loaded: the check above is what kept it out
    if unsafe != "other-owner":
        path.parent.chmod(0o700)
        plant()  # (a rejected file in our own folder was replaced by a fresh, private cache)
        with contextlib.suppress(Exception):
            one_run(command)
        assert marker.exists()


def test_cluster_without_the_extra_says_how_to_get_it(tmp_path):
    # As on a machine without `pip install 'dlm-ls[cluster]'`: ray cannot be imported.
    code = ("import sys; sys.modules['ray'] = None\n"
            "from dlm_ls.lsp_server import cli\n"
            "sys.exit(cli.main(sys.argv[1:]))\n")
    env = {**os.environ, "DLM_LS_RUNTIME_DIR": str(tmp_path / "run")}
    helped = subprocess.run([sys.executable, "-c", code, "cluster", "--help"], capture_output=True, text=True, env=env)
    assert helped.returncode == 0 and "up" in helped.stdout and "status" in helped.stdout
    up = subprocess.run([sys.executable, "-c", code, "cluster", "up"], capture_output=True, text=True, env=env)
    assert up.returncode == 1 and "pip install 'dlm-ls[cluster]'" in up.stderr and "Traceback" not in up.stderr
