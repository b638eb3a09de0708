--- Ghost text for Neovim 0.11, which has no built-in inline completion. One extmark at the
--- cursor shows a suggestion (inline virtual text for its first line, virtual lines for the
--- rest); requests go out after a debounce, and a new keystroke cancels the one in flight
--- (Neovim does not cancel superseded requests by itself). Typing the suggestion's next
--- characters keeps it on screen without a new request.
---
--- Verbs: attach, schedule, cancel, accept, accept_line, dismiss, suggestion.

local config = require('dlm_ls.config')
local server = require('dlm_ls.server')
local api = vim.api

local M = {}

local ns = api.nvim_create_namespace('dlm_ls')
local augroup = api.nvim_create_augroup('dlm_ls.completion', { clear = true })
local timer = assert(vim.uv.new_timer())

local REQUEST_CANCELLED, CONTENT_MODIFIED = -32800, -32801
local TRIGGER_AUTOMATIC = 2 -- lsp.InlineCompletionTriggerKind.Automatic

--- The suggestion on screen; there is one cursor, so there is at most one.
---@class dlm_ls.Shown
---@field bufnr integer
---@field row integer 0-based row of the cursor the suggestion continues
---@field col integer byte column of that cursor
---@field text string what is shown: the suggestion from the cursor on
---@field insert string the item's text, which replaces `range` on accept
---@field range [integer, integer, integer, integer] start row, start col, end row, end col (bytes)
---@field tick integer the buffer's changedtick when it was shown
local shown = nil ---@type dlm_ls.Shown?

--- The request in flight; `seq` tells its answer from a superseded one's.
local pending = nil ---@type { client: vim.lsp.Client, id: integer, seq: integer }?
local seq = 0

--- Buffer, changedtick and cursor of the last scheduled request: one keystroke fires both
--- TextChangedI and CursorMovedI, sometimes far apart, and must not ask (or cancel) twice.
local asked = nil ---@type [integer, integer, integer, integer]?

--- Bumped by every cancel: a timer that expired just before a restart has already queued its
--- callback (vim.schedule), which must then do nothing.
local generation = 0

---@return integer row, integer col 0-based row, byte column
local function cursor()
  local pos = api.nvim_win_get_cursor(0)
  return pos[1] - 1, pos[2]
end

local function in_insert_mode()
  return api.nvim_get_mode().mode:sub(1, 1) == 'i'
end

---@param bufnr integer
---@param pos lsp.Position
---@param encoding string
local function byte_col(bufnr, pos, encoding)
  local line = api.nvim_buf_get_lines(bufnr, pos.line, pos.line + 1, false)[1] or ''
  return vim.str_byteindex(line, encoding, pos.character, false)
end

local function render()
  local s = assert(shown)
  api.nvim_buf_clear_namespace(s.bufnr, ns, 0, -1)
  local hl = config.options.hl_group
  local text = s.text:gsub('\t', string.rep(' ', vim.bo[s.bufnr].tabstop))
  local lines = vim.split(text, '\n', { plain = true })
  local virt_lines = {}
  for i = 2, #lines do
    virt_lines[#virt_lines + 1] = { { lines[i], hl } }
  end
  api.nvim_buf_set_extmark(s.bufnr, ns, s.row, s.col, {
    virt_text = { { lines[1], hl } },
    virt_text_pos = 'inline',
    virt_lines = #virt_lines > 0 and virt_lines or nil,
    hl_mode = 'combine',
  })
end

--- Show an inline completion item, if it still fits the text before the cursor.
---@param client vim.lsp.Client
---@param bufnr integer
---@param item lsp.InlineCompletionItem
local function show(client, bufnr, item)
  local text = item.insertText
  if type(text) == 'table' then
    text = text.value -- a snippet (lsp.StringValue): shown and inserted as plain text
  end
  if type(text) ~= 'string' or text == '' then
    return
  end
  local row, col = cursor()
  local range = { row, col, row, col }
  if item.range then
    local r = item.range
    range = {
      r.start.line,
      byte_col(bufnr, r.start, client.offset_encoding),
      r['end'].line,
      byte_col(bufnr, r['end'], client.offset_encoding),
    }
  end
  if range[1] > row or (range[1] == row and range[2] > col) then
    return
  end
  -- An item may start before the cursor and repeat what is typed there; show what follows.
  local before = table.concat(api.nvim_buf_get_text(bufnr, range[1], range[2], row, col, {}), '\n')
  if not vim.startswith(text, before) or #text == #before then
    return
  end
  shown = {
    bufnr = bufnr,
    row = row,
    col = col,
    text = text:sub(#before + 1),
    insert = text,
    range = range,
    tick = api.nvim_buf_get_changedtick(bufnr),
  }
  render()
end

---@param bufnr integer
local function request(bufnr)
  local client = server.client(bufnr)
  if not client or api.nvim_get_current_buf() ~= bufnr or not in_insert_mode() then
    return
  end
  local params = vim.lsp.util.make_position_params(0, client.offset_encoding)
  ---@cast params lsp.InlineCompletionParams
  params.context = { triggerKind = TRIGGER_AUTOMATIC }
  local row, col = cursor()
  local tick = api.nvim_buf_get_changedtick(bufnr)
  seq = seq + 1
  local this = seq
  local ok, id = client:request('textDocument/inlineCompletion', params, function(err, result)
    if not pending or pending.seq ~= this then
      return -- cancelled by a newer keystroke
    end
    pending = nil
    if err then
      if err.code ~= REQUEST_CANCELLED and err.code ~= CONTENT_MODIFIED then
        vim.notify_once('dlm_ls: ' .. tostring(err.message), vim.log.levels.WARN)
      end
      return
    end
    local items = result and (result.items or result) or {}
    local r, c = cursor()
    if
      items[1]
      and in_insert_mode()
      and api.nvim_get_current_buf() == bufnr
      and api.nvim_buf_get_changedtick(bufnr) == tick
      and r == row
      and c == col
    then
      show(client, bufnr, items[1])
    end
  end, bufnr)
  if ok and id then
    pending = { client = client, id = id, seq = this }
  end
end

--- Hide the suggestion.
function M.dismiss()
  local s = shown
  shown = nil
  if s and api.nvim_buf_is_valid(s.bufnr) then
    api.nvim_buf_clear_namespace(s.bufnr, ns, 0, -1)
  end
end

--- Stop the debounce timer and cancel the request in flight.
function M.cancel()
  timer:stop()
  generation = generation + 1
  local p = pending
  pending = nil
  if p and not p.client:is_stopped() then
    p.client:cancel_request(p.id)
  end
end

--- Drop what is shown or asked, and ask again once the user pauses.
---@param bufnr integer
function M.schedule(bufnr)
  M.cancel()
  M.dismiss()
  local row, col = cursor()
  asked = { bufnr, api.nvim_buf_get_changedtick(bufnr), row, col }
  local this = generation
  timer:start(
    config.options.debounce_ms,
    0,
    vim.schedule_wrap(function()
      if this == generation then
        request(bufnr)
      end
    end)
  )
end

--- The suggestion on screen (from the cursor on), or nil.
---@return string?
function M.suggestion()
  return shown and shown.text or nil
end

--- Put the cursor at the end of `lines` inserted at (row, col).
local function cursor_after(row, col, lines)
  local last = #lines == 1 and col + #lines[1] or #lines[#lines]
  api.nvim_win_set_cursor(0, { row + #lines, last })
end

--- Insert the whole suggestion.
---@return boolean accepted
function M.accept()
  local s = shown
  if not s or api.nvim_get_current_buf() ~= s.bufnr then
    return false
  end
  M.cancel()
  M.dismiss()
  local lines = vim.split(s.insert, '\n', { plain = true })
  local r = s.range
  api.nvim_buf_set_text(s.bufnr, r[1], r[2], r[3], r[4], lines)
  cursor_after(r[1], r[2], lines)
  return true
end

--- Insert the suggestion's first line; the rest stays on screen.
---@return boolean accepted
function M.accept_line()
  local s = shown
  if not s or api.nvim_get_current_buf() ~= s.bufnr then
    return false
  end
  -- A suggestion that starts with a line break gives that break and the line after it.
  local first = s.text:match('^\n?[^\n]*')
  local r = s.range
  if first == s.text or r[3] ~= s.row then
    return M.accept()
  end
  M.cancel()
  local lines = vim.split(first, '\n', { plain = true })
  api.nvim_buf_set_text(s.bufnr, s.row, s.col, s.row, s.col, lines)
  cursor_after(s.row, s.col, lines)
  local row, col = cursor()
  -- What the item replaced after the cursor moved along with it.
  local tail = math.max(0, r[4] - s.col)
  shown = {
    bufnr = s.bufnr,
    row = row,
    col = col,
    text = s.text:sub(#first + 1),
    insert = s.text:sub(#first + 1),
    range = { row, col, row, col + tail },
    tick = api.nvim_buf_get_changedtick(s.bufnr),
  }
  render()
  return true
end

--- After a keystroke: keep the suggestion if the user typed its next characters, else ask anew.
---@param bufnr integer
local function on_change(bufnr)
  local row, col = cursor()
  local tick = api.nvim_buf_get_changedtick(bufnr)
  local s = shown
  if s and s.bufnr == bufnr then
    if row == s.row and col == s.col and tick == s.tick then
      return -- TextChangedI and CursorMovedI both fire for one key
    end
    if row == s.row and col > s.col and tick ~= s.tick then
      local typed = api.nvim_buf_get_text(bufnr, row, s.col, row, col, {})[1]
      if #typed < #s.text and vim.startswith(s.text, typed) then
        s.text = s.text:sub(#typed + 1)
        if s.range[3] == row and s.range[4] >= s.col then
          s.range[4] = s.range[4] + #typed
        end
        s.col, s.tick = col, tick
        render()
        return
      end
    end
  elseif asked and asked[1] == bufnr and asked[2] == tick and asked[3] == row and asked[4] == col then
    return -- already asked for exactly this
  end
  M.schedule(bufnr)
end

--- Start suggesting in a buffer the server is attached to.
---@param bufnr integer
function M.attach(bufnr)
  api.nvim_clear_autocmds({ group = augroup, buffer = bufnr })
  api.nvim_create_autocmd({ 'TextChangedI', 'CursorMovedI' }, {
    group = augroup,
    buffer = bufnr,
    callback = function()
      on_change(bufnr)
    end,
  })
  api.nvim_create_autocmd({ 'InsertLeave', 'BufLeave' }, {
    group = augroup,
    buffer = bufnr,
    callback = function()
      M.cancel()
      M.dismiss()
    end,
  })
end

return M
