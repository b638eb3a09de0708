"""Remakes the pictures in docs/img/ from real runs with the shipped model: `make screenshots`.

    python tests/screenshots.py docs/img

- vscode-ghost-text.png: code-server with the extension (tests/code_server.py), a suggestion of
  model/default shown as ghost text;
- refinement-strip.png: the `dlm/refinement` steps of that suggestion's request as the server
  sent them (from the message tap), one row per step, undecided slots dimmed, then the item;
- neovim-ghost-text.png: Neovim 0.11 with the plugin in a pseudo-terminal, its screen read by
  pyte and drawn with PIL.

Nothing here is a test: it makes pictures, and fails loudly when an editor shows no suggestion.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from pathlib import Path

import matplotlib
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent))
import code_server  # noqa: E402
import ui_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "model" / "default"
VENV_BIN = Path(sys.executable).parent
FONT = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSansMono.ttf"
UNDECIDED = "\u2591"

# The file, and what is typed at its end: a cursor where the small shipped model suggests more
# than a character or two (`None):`).
SAMPLE = "def greet(name):\n    \n"
TYPED = "print("


def vscode(out: Path, work: Path) -> dict:
    """The VS Code picture; returns the request whose suggestion it shows (id, item, frames)."""
    with code_server.session(work, MODEL, {"dlm.showRefinement": True, "editor.fontSize": 15},
                             {"greet.py": SAMPLE}, work / "artifacts", viewport=(820, 330)) as editor:
        editor.open("greet.py")
        editor.page.locator(".statusbar-item", has_text=" · cpu").first.wait_for(state="visible", timeout=120000)
        editor.page.keyboard.press("Control+b")  # the side bar off: the picture is the editor
        editor.focus()
        editor.page.keyboard.press("ArrowLeft")  # the end of the indented line
        editor.type_until_ghost([TYPED], timeout=40)
        editor.page.wait_for_timeout(400)
        editor.page.screenshot(path=str(out / "vscode-ghost-text.png"))
        rid, item = editor.tap.last_item()
        frames = [f for f in editor.tap.notifications("dlm/refinement") if f["id"] == rid]
    return {"id": rid, "item": item, "frames": frames, "typed": TYPED}


def refinement_strip(out: Path, request: dict, max_rows: int = 9) -> None:
    """One row per refinement step (evenly picked when there are many), then the item."""
    frames = request["frames"]
    if not frames:
        raise SystemExit("the request sent no dlm/refinement steps")
    if len(frames) > max_rows:
        picks = sorted({round(i * (len(frames) - 1) / (max_rows - 1)) for i in range(max_rows)})
        frames = [frames[i] for i in picks]
    rows = [(f"step {f['step']}", f["text"][0].split("\n")[0]) for f in frames]
    rows.append(("suggestion", request["item"].split("\n")[0]))
    typed = request["typed"]
    font = ImageFont.truetype(str(FONT), 18)
    cw, ch = font.getbbox("M")[2], 28
    label_w = 12
    width = 32 + cw * (label_w + len(typed) + max(len(r[1]) for r in rows))
    img = Image.new("RGB", (width, 20 + ch * len(rows)), "#1f1f1f")
    draw = ImageDraw.Draw(img)
    for i, (label, text) in enumerate(rows):
        y = 10 + i * ch
        draw.text((16, y), label, font=font, fill="#6e7681")
        x = 16 + cw * label_w
        draw.text((x, y), typed, font=font, fill="#d4d4d4")  # what the user typed
        x += cw * len(typed)
        for j, c in enumerate(text):  # ghost text: decided slots grey italic-ish, undecided dim
            colour = "#4a4a4a" if c == UNDECIDED else "#9da5b4"
            draw.text((x + cw * j, y), c, font=font, fill=colour)
    img.save(out / "refinement-strip.png", optimize=True)


# --------------------------------------------------------------------------- Neovim in a pty

COLS, ROWS = 72, 9
# Neovim 0.11's default dark colours, for cells that keep the terminal's own.
DEFAULT_FG, DEFAULT_BG = "#e0e2ea", "#14161b"
NAMED = {"black": "#07080d", "red": "#ffc0b9", "green": "#b3f6c0", "brown": "#fce094", "yellow": "#fce094",
         "blue": "#a6dbff", "magenta": "#ffcaff", "cyan": "#8cf8f7", "white": "#eef1f8"}

NVIM_INIT = """
vim.opt.runtimepath:prepend(%(plugin)s)
vim.opt.swapfile = false
vim.opt.termguicolors = true
vim.opt.number = true
vim.opt.expandtab = true
vim.opt.shiftwidth = 4
vim.opt.shortmess:append('I')
require('dlm_ls').setup({ cmd = { %(server)s, 'serve', '--in-process' }, device = 'cpu' })
local state = vim.env.DLM_SHOT_STATE
vim.fn.timer_start(100, function()
  local f = io.open(state, 'w')
  f:write(require('dlm_ls').suggestion() or '')
  f:close()
end, { ['repeat'] = -1 })
"""


def neovim(out: Path, work: Path) -> None:
    ui_env.python_packages()
    import pyte

    nvim = VENV_BIN / "nvim"
    (work / "greet.py").write_text(SAMPLE)
    init = work / "init.lua"
    init.write_text(NVIM_INIT % {"plugin": json.dumps(str(ROOT / "editors" / "neovim")),
                                 "server": json.dumps(str(VENV_BIN / "dlm-ls"))})
    state = work / "suggestion.txt"
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
    home = work / "home"
    env = {**os.environ, "TERM": "xterm-256color", "DLM_SHOT_STATE": str(state), "XDG_CONFIG_HOME": str(home),
           "XDG_DATA_HOME": str(home), "XDG_STATE_HOME": str(home), "XDG_CACHE_HOME": str(home),
           "DLM_LS_RUNTIME_DIR": str(work / "run")}
    proc = subprocess.Popen([str(nvim), "-i", "NONE", "-n", "-u", str(init), "greet.py"], cwd=work, env=env,
                            stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    screen = pyte.Screen(COLS, ROWS)
    stream = pyte.ByteStream(screen)
    lock = threading.Lock()

    def pump():
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            with lock:
                stream.feed(data)
    threading.Thread(target=pump, daemon=True).start()
    try:
        time.sleep(2)
        os.write(master, b"2GA")  # the end of the indented line
        time.sleep(0.3)
        os.write(master, TYPED.encode())
        # Until the server is up (it loads the model) a keystroke asks nobody: ask again now and
        # then, with a space typed and taken back.
        deadline, nudge = time.monotonic() + 90, time.monotonic() + 5
        while time.monotonic() < deadline and not (state.exists() and state.read_text()):
            time.sleep(0.2)
            if time.monotonic() > nudge:
                os.write(master, b" \x7f")
                nudge = time.monotonic() + 5
        if not (state.exists() and state.read_text()):
            raise SystemExit("Neovim showed no suggestion")
        time.sleep(0.8)  # let the last redraw arrive
        with lock:
            render_screen(screen, out / "neovim-ghost-text.png")
    finally:
        os.write(master, b"\x1b:qa!\r")
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        os.close(master)


def _colour(value: str, default: str) -> str:
    if value == "default":
        return default
    if len(value) == 6 and all(c in "0123456789abcdefABCDEF" for c in value):
        return "#" + value
    return NAMED.get(value.replace("bright", ""), default)


def render_screen(screen, path: Path) -> None:
    font = ImageFont.truetype(str(FONT), 15)
    italic = ImageFont.truetype(str(FONT.with_name("DejaVuSansMono-Oblique.ttf")), 15)
    cw, ch = font.getbbox("M")[2], 19
    img = Image.new("RGB", (cw * screen.columns + 16, ch * screen.lines + 16), DEFAULT_BG)
    draw = ImageDraw.Draw(img)
    for y in range(screen.lines):
        row = screen.buffer[y]
        for x in range(screen.columns):
            c = row[x]
            fg, bg = _colour(c.fg, DEFAULT_FG), _colour(c.bg, DEFAULT_BG)
            if c.reverse or (x, y) == (screen.cursor.x, screen.cursor.y):
                fg, bg = bg, fg
            px, py = 8 + x * cw, 8 + y * ch
            if bg != DEFAULT_BG:
                draw.rectangle([px, py, px + cw - 1, py + ch - 1], fill=bg)
            if c.data.strip():
                draw.text((px, py), c.data, font=italic if c.italics else font, fill=fg)
    img.save(path, optimize=True)


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else ROOT / "docs" / "img")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dlm-shots-") as tmp:
        work = Path(tmp)
        (work / "vscode").mkdir()
        (work / "nvim").mkdir()
        request = vscode(out, work / "vscode")
        refinement_strip(out, request)
        neovim(out, work / "nvim")
    for name in ("vscode-ghost-text.png", "neovim-ghost-text.png", "refinement-strip.png"):
        print(f"{out / name}: {(out / name).stat().st_size // 1024} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
