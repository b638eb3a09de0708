"""The VS Code extension (editors/vscode), as far as it runs without a VS Code binary.

`npm ci` (only when node_modules is missing or older than package-lock.json), then: the
TypeScript compiles with no errors, `npm run package` builds the .vsix, and `npm test` drives
the real `dlm-ls serve` through vscode-jsonrpc with the extension's own command line, settings
and the capabilities VS Code announces (editors/vscode/test/server.test.ts).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXT = ROOT / "editors" / "vscode"
NODE, NPM = shutil.which("node"), shutil.which("npm")

pytestmark = [pytest.mark.slow, pytest.mark.skipif(NODE is None or NPM is None, reason="node and npm are not installed")]


def npm(*args: str, env: dict | None = None, timeout: float = 150) -> subprocess.CompletedProcess:
    proc = subprocess.run([NPM, *args], cwd=EXT, env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"npm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def installed() -> Path:
    stamp = EXT / "node_modules" / ".package-lock.json"  # npm rewrites it on every install
    if not stamp.exists() or stamp.stat().st_mtime < (EXT / "package-lock.json").stat().st_mtime:
        npm("ci", "--no-audit", "--no-fund")
    return EXT


def test_typescript_compiles_without_errors(installed):
    npm("run", "typecheck")


def test_vsix_packages_the_bundle_and_manifest(installed):
    manifest = json.loads((EXT / "package.json").read_text())
    vsix = EXT / f"{manifest['name']}-{manifest['version']}.vsix"
    vsix.unlink(missing_ok=True)
    npm("run", "package")
    assert vsix.is_file()
    with zipfile.ZipFile(vsix) as z:
        names = set(z.namelist())
        bundle = z.read("extension/dist/extension.js").decode()
    assert {"extension/package.json", "extension/dist/extension.js", "extension.vsixmanifest"} <= names
    assert not any(n.startswith("extension/node_modules/") or n.startswith("extension/src/") for n in names), names
    assert 'require("vscode")' in bundle  # VS Code provides it; everything else is bundled


def test_every_setting_the_extension_reads_is_declared():
    props = json.loads((EXT / "package.json").read_text())["contributes"]["configuration"]["properties"]
    source = (EXT / "src" / "extension.ts").read_text()
    read = {f"dlm.{key}" for key in re.findall(r"c\.get\('([\w.]+)'", source)}
    assert read and read <= set(props), read - set(props)
    for key in ("dlm.server.path", "dlm.model", "dlm.device", "dlm.debounceMs", "dlm.enable", "dlm.showRefinement"):
        assert key in props and "default" in props[key]
    commands = {c["command"] for c in json.loads((EXT / "package.json").read_text())["contributes"]["commands"]}
    registered = set(re.findall(r"registerCommand\('([\w.]+)'", source))
    # Not "dlm.fill": the language client registers the server's own dlm.fill command under that name.
    assert commands == registered == {"dlm.fillHoles", "dlm.restart", "dlm.showStatus"}


def test_client_logic_against_the_real_server(installed, tiny_model_dir):
    server = Path(sys.executable).parent / "dlm-ls"
    proc = npm("test", env={"DLM_LS_SERVER": str(server), "DLM_LS_TEST_MODEL": str(tiny_model_dir)})
    out = proc.stdout
    assert re.search(r"^# fail 0$", out, re.M), out[-4000:]
    passed = int(re.search(r"^# pass (\d+)$", out, re.M).group(1))
    assert passed >= 11, out[-4000:]  # the server tests ran, not skipped
