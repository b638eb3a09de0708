"""A code-server session with the dlm-ls extension, driven through Playwright in headless Chromium.

`session()` starts code-server (tools from tests/ui_env.py) on loopback with the .vsix installed
and a workspace folder, the extension's server being the real `dlm-ls serve` behind
tests/lsp_tap.py; it yields an `Editor` that types, reads the ghost text and the dlm-ls
refinement decorations from the DOM, reads files from disk, and reads the tap's log (`Tap`).
tests/test_vscode_ui.py and tests/screenshots.py use it. It knows nothing of what they check.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import ui_env

TAP = Path(__file__).resolve().parent / "lsp_tap.py"

# Settings that keep VS Code quiet and predictable: nothing of its own competes with dlm-ls's
# suggestion (no word completion, no auto-closing brackets that would break typing through).
EDITOR_SETTINGS = {
    "workbench.startupEditor": "none", "workbench.tips.enabled": False, "security.workspace.trust.enabled": False,
    "editor.inlineSuggest.enabled": True, "editor.quickSuggestions": {"other": False, "comments": False, "strings": False},
    "editor.suggestOnTriggerCharacters": False, "editor.wordBasedSuggestions": "off", "editor.parameterHints.enabled": False,
    "editor.autoClosingBrackets": "never", "editor.autoClosingQuotes": "never", "editor.autoSurround": "never",
    "editor.autoIndent": "none", "editor.minimap.enabled": False, "files.autoSave": "off", "chat.disableAIFeatures": True,
    "extensions.autoCheckUpdates": False, "extensions.autoUpdate": False, "telemetry.telemetryLevel": "off",
    "update.mode": "none", "workbench.colorTheme": "Default Dark Modern", "window.zoomLevel": 0,
    "workbench.layoutControl.enabled": False, "window.commandCenter": False,
    "workbench.secondarySideBar.defaultVisibility": "hidden", "workbench.activityBar.location": "default",
}

# The inline suggestion as VS Code draws it: the rest of the cursor's line, then any further lines.
GHOST_JS = r"""() => {
  const editor = document.querySelector('.editor-instance .monaco-editor');
  if (!editor) return null;
  const inline = [...editor.querySelectorAll('.ghost-text-decoration, .ghost-text-decoration-preview')]
    .map((e) => e.textContent).join('');
  const more = [...editor.querySelectorAll('.ghost-text .view-line')].map((e) => e.textContent);
  const text = [inline, ...more].join('\n').replace(/\u00a0/g, ' ');
  return text.length ? text : null;
}"""

# The dlm-ls refinement decorations at the cursor: each `after` pseudo-element's text and opacity.
REFINEMENT_JS = r"""() => {
  const editor = document.querySelector('.editor-instance .monaco-editor');
  if (!editor) return [];
  const runs = [];
  for (const el of editor.querySelectorAll('.view-lines span[class*="ced-"]')) {
    const after = getComputedStyle(el, '::after');
    if (!after.content || after.content === 'none' || after.content === 'normal') continue;
    let text = after.content;
    try { text = JSON.parse(text); } catch (e) { text = text.replace(/^"|"$/g, ''); }
    runs.push({ text: text.replace(/\u00a0/g, ' '), opacity: parseFloat(after.opacity) });
  }
  return runs;
}"""

# Records every distinct refinement state drawn (with a timestamp) as the DOM changes.
OBSERVE_JS = r"""(refinementJs) => {
  const read = eval(refinementJs);
  window.__dlmStates = [];
  let last = '';
  const record = () => {
    const runs = read();
    const key = JSON.stringify(runs);
    if (key !== last) { last = key; window.__dlmStates.push({ t: performance.now(), runs }); }
  };
  new MutationObserver(record).observe(document.body, { subtree: true, childList: true, attributes: true, characterData: true });
  record();
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Tap:
    """The LSP messages the tap logged, read afresh on each call."""

    def __init__(self, path: Path):
        self.path = path

    def messages(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass  # a line being written
        return out

    def requests(self, method: str) -> list[dict]:
        return [m["msg"] for m in self.messages() if m["from"] == "client" and m["msg"].get("method") == method]

    def notifications(self, method: str, side: str = "server") -> list[dict]:
        return [m["msg"]["params"] for m in self.messages() if m["from"] == side and m["msg"].get("method") == method]

    def response(self, msg_id, side: str = "server") -> dict | None:
        for m in self.messages():
            if m["from"] == side and m["msg"].get("id") == msg_id and "method" not in m["msg"]:
                return m["msg"]
        return None

    def last_item(self) -> tuple[int | str, str] | None:
        """The last inline-completion request answered with an item: its id and the item's text."""
        for req in reversed(self.requests("textDocument/inlineCompletion")):
            res = self.response(req["id"])
            items = (res or {}).get("result") or {}
            items = items.get("items", []) if isinstance(items, dict) else items
            if items:
                text = items[0]["insertText"]
                return req["id"], text if isinstance(text, str) else text["value"]
        return None


class Editor:
    """code-server in Chromium, with the workspace, the tap and the server's log at hand."""

    def __init__(self, page, workspace: Path, tap: Tap, server_log: Path, artifacts: Path):
        self.page, self.workspace, self.tap, self.server_log = page, workspace, tap, server_log
        self.artifacts = artifacts

    def wait(self, cond, timeout: float = 30, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while True:
            value = cond()
            if value:
                return value
            if time.monotonic() > deadline:
                self.shot(f"timeout-{re.sub(r'[^a-z]+', '-', what.lower())[:40]}")
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
            self.page.wait_for_timeout(50)

    def shot(self, name: str, **kwargs) -> Path:
        self.artifacts.mkdir(parents=True, exist_ok=True)
        path = self.artifacts / f"{name}.png"
        self.page.screenshot(path=str(path), **kwargs)
        return path

    def ghost(self) -> str | None:
        return self.page.evaluate(GHOST_JS)

    def refinement(self) -> list[dict]:
        return self.page.evaluate(REFINEMENT_JS)

    def command(self, title: str) -> None:
        self.page.keyboard.press("F1")
        box = self.page.locator(".quick-input-widget input")
        box.wait_for(state="visible")
        box.fill(f">{title}")
        self.page.locator(".quick-input-list .monaco-list-row", has_text=title).first.wait_for(state="visible")
        self.page.keyboard.press("Enter")

    def open(self, name: str) -> None:
        """Open a file of the workspace (one given to session(): quick open lists the files it
        found when first asked) with the cursor at its end."""
        self.page.keyboard.press("Control+p")
        box = self.page.locator(".quick-input-widget input")
        box.wait_for(state="visible")
        box.fill(name)
        self.page.locator(".quick-input-list .monaco-list-row", has_text=name).first.wait_for(state="visible")
        self.page.keyboard.press("Enter")
        self.page.locator(".tab.active", has_text=name).wait_for(state="visible")
        self.focus()

    def focus(self) -> None:
        """Put the keyboard in the active editor, at the end of its text."""
        self.page.locator(".editor-instance .monaco-editor .view-lines").first.click()
        self.page.keyboard.press("Control+End")

    def saved(self, name: str) -> str:
        """Save the active editor and read its file from disk."""
        self.page.keyboard.press("Control+s")
        self.page.locator(".tab.active.dirty").wait_for(state="detached", timeout=10000)
        self.page.wait_for_timeout(200)
        return (self.workspace / name).read_text()

    def model_calls(self) -> int:
        log = self.server_log.read_text(encoding="utf-8") if self.server_log.exists() else ""
        return len(re.findall(r" from model in ", log))

    def type_until_ghost(self, keys: list[str], ok=lambda g: True, timeout: float = 20) -> str:
        """Type each piece of `keys` in turn until a suggestion that satisfies `ok` is shown."""
        for piece in keys:
            self.page.keyboard.type(piece, delay=30)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                g = self.ghost()
                if g and ok(g) and self._settled(g):
                    return g
                self.page.wait_for_timeout(50)
        self.shot("no-ghost-text")
        raise AssertionError(f"no suggestion after typing {keys!r}")

    def _settled(self, ghost: str) -> bool:
        """The ghost text is the server's last item, as far as it follows the cursor."""
        item = self.tap.last_item()
        return item is not None and item[1].endswith(ghost.rstrip()) if ghost.strip() else False


@contextlib.contextmanager
def session(base: Path, model_dir: Path, settings: dict, files: dict[str, str], artifacts: Path,
            viewport=(1100, 620)):
    """code-server with the extension, `settings` over EDITOR_SETTINGS, the server on `model_dir`,
    and a workspace folder holding `files` (name: text).

    Raises ui_env.Unavailable when a tool cannot be had. Logs (code-server, tap, server) are
    copied to `artifacts` at the end."""
    ui_env.chromium()
    entry, env = ui_env.code_server()
    sync_api = ui_env.playwright()
    vsix = ui_env.vsix()
    workspace, data, extensions = base / "workspace", base / "data", base / "extensions"
    for d in (workspace, data / "User", data / "Machine", extensions):
        d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (workspace / name).write_text(text)
    tap_log, server_log = base / "tap.jsonl", base / "server.log"
    server = base / "dlm-ls-tapped"
    server.write_text(f"#!/bin/sh\nexec {sys.executable} {TAP} {tap_log} -- {Path(sys.executable).parent / 'dlm-ls'} \"$@\"\n")
    server.chmod(0o755)
    (data / "User" / "settings.json").write_text(json.dumps({**EDITOR_SETTINGS, **settings}, indent=1))
    # The server's command line is machine-scoped: a remote window (code-server is one) reads it
    # from the machine's settings, never from the user's.
    (data / "Machine" / "settings.json").write_text(json.dumps({
        "dlm.server.path": str(server), "dlm.model": str(model_dir), "dlm.device": "cpu",
        "dlm.server.extraArgs": ["--in-process", "--log-file", str(server_log), "--log-level", "info"]}, indent=1))
    node = str(Path(env["PATH"].split(os.pathsep)[0]) / "node")
    common = ["--user-data-dir", str(data), "--extensions-dir", str(extensions)]
    installed = subprocess.run([node, str(entry), *common, "--install-extension", str(vsix)], env={**os.environ, **env},
                               capture_output=True, text=True, timeout=300)
    if installed.returncode != 0:
        raise ui_env.Unavailable(f"code-server --install-extension failed: {installed.stderr.strip()[-300:]}")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run_env = {**os.environ, **env, "DLM_LS_RUNTIME_DIR": str(base / "run"), "OMP_NUM_THREADS": "1",
               "TOKENIZERS_PARALLELISM": "false"}
    cs_log = open(base / "code-server.log", "w")
    proc = subprocess.Popen([node, str(entry), *common, "--auth", "none", "--bind-addr", f"127.0.0.1:{port}",
                             "--disable-telemetry", "--disable-update-check", "--disable-workspace-trust",
                             "--disable-getting-started-override", str(workspace)],
                            env=run_env, stdout=cs_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    pw = sync_api.sync_playwright().start()
    browser = None
    try:
        browser = pw.chromium.launch(executable_path=str(ui_env.CHROMIUM), args=ui_env.CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
        deadline = time.monotonic() + 60
        while True:
            try:
                page.goto(f"http://127.0.0.1:{port}/?folder={workspace}", timeout=10000)
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.5)
        page.locator(".monaco-workbench").wait_for(state="visible", timeout=60000)
        yield Editor(page, workspace, Tap(tap_log), server_log, artifacts)
    finally:
        if browser is not None:
            browser.close()
        pw.stop()
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        cs_log.close()
        artifacts.mkdir(parents=True, exist_ok=True)
        for name in ("code-server.log", "tap.jsonl", "server.log"):
            if (base / name).exists():
                shutil.copy(base / name, artifacts / name)
