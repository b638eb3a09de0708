--- Ghost text for Neovim 0.11, which has no built-in inline completion. One extmark at the
--- cursor shows a suggestion (inline virtual text for its first line, virtual lines for the
--- rest); requests go out after a debounce, and a new keystroke cancels the one in flight
--- (Neovim does not cancel superseded requests by itself). Typing the suggestion's next
--- characters keeps it on screen without a new request. Nothing is shown while the popup menu
--- is (pumvisible()); the suggestion is asked for again when it closes (CompleteDone).
--- With `show_refinement`, the `dlm/refinement` steps of the request in flight are drawn in the
--- same place, undecided slots dimmed, until the item replaces them; steps of any other request
--- (one a keystroke cancelled) are never drawn.
---
--- Verbs: attach, schedule, cancel, accept, accept_word, accept_line, dismiss, suggestion,
--- on_refinement.

local config = require('dlm_ls.config')
local pieces = require('dlm_ls.pieces')
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

--- The request in flight; `seq` tells its answer from a superseded one's. `id` is the JSON-RPC
--- id it was sent with, which its `dlm/refinement` steps carry; buffer, tick and cursor say
--- where its steps may be drawn.
---@class dlm_ls.Pending
---@field client vim.lsp.Client
---@field id integer
---@field seq integer
---@field bufnr integer
---@field tick integer
---@field row integer
---@field col integer
local pending = nil ---@type dlm_ls.Pending?

--- The buffer where a refinement step is drawn, while one is.
local refining = nil ---@type integer?
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

local function menu_visible()
  return vim.fn.pumvisible() == 1
end

---@param bufnr integer
---@param pos lsp.Position
---@param encoding string
local function byte_col(bufnr, pos, encoding)
  local line = api.nvim_buf_get_lines(bufnr, pos.line, pos.line + 1, false)[1] or ''
  return vim.str_byteindex(line, encoding, pos.character, false)
end

--- Draw lines of `{ text, hl }` chunks at (row, col): the first inline, the rest as virtual lines.
local function draw(bufnr, row, col, lines)
  api.nvim_buf_clear_namespace(bufnr, ns, 0, -1)
  local tab = string.rep(' ', vim.bo[bufnr].tabstop)
  for _, line in ipairs(lines) do
    for _, chunk in ipairs(line) do
      chunk[1] = chunk[1]:gsub('\t', tab)
    end
  end
  api.nvim_buf_set_extmark(bufnr, ns, row, col, {
    virt_text = lines[1],
    virt_text_pos = 'inline',
    virt_lines = #lines > 1 and vim.list_slice(lines, 2) or nil,
    hl_mode = 'combine',
  })
end

local function render()
  local s = assert(shown)
  refining = nil
  local hl = config.options.hl_group
  local lines = {}
  for _, line in ipairs(vim.split(s.text, '\n', { plain = true })) do
    lines[#lines + 1] = { { line, hl } }
  end
  draw(s.bufnr, s.row, s.col, lines)
end

local function clear_refinement()
  local bufnr = refining
  refining = nil
  if bufnr and api.nvim_buf_is_valid(bufnr) then
    api.nvim_buf_clear_namespace(bufnr, ns, 0, -1)
  end
end

--- Draw a `dlm/refinement` step of the request in flight (with `show_refinement`): the state of
--- the suggestion so far, its undecided slots in `hl_group_undecided`.
---@param params { id: integer|string|nil, text: string[]|string|nil }
function M.on_refinement(params)
  local p = pending
  if not config.options.show_refinement or not p or params.id ~= p.id or shown then
    return -- a step of a request that is no longer in flight, or its item is already shown
  end
  local text = type(params.text) == 'table' and params.text[1] or params.text
  local row, col = cursor()
  if
    type(text) ~= 'string'
    or text == ''
    or api.nvim_get_current_buf() ~= p.bufnr
    or api.nvim_buf_get_changedtick(p.bufnr) ~= p.tick
    or row ~= p.row
    or col ~= p.col
    or not in_insert_mode()
    or menu_visible()
  then
    return
  end
  local hl, dim = config.options.hl_group, config.options.hl_group_undecided
  local lines = {}
  for _, runs in ipairs(pieces.runs(text)) do
    local chunks = {}
    for _, run in ipairs(runs) do
      chunks[#chunks + 1] = { run[1], run[2] and dim or hl }
    end
    lines[#lines + 1] = #chunks > 0 and chunks or { { '', hl } }
  end
  refining = p.bufnr
  draw(p.bufnr, p.row, p.col, lines)
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
    clear_refinement()
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
      and not menu_visible()
    then
      show(client, bufnr, items[1])
    end
  end, bufnr)
  if ok and id then
    pending = { client = client, id = id, seq = this, bufnr = bufnr, tick = tick, row = row, col = col }
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

--- Stop the debounce timer and cancel the request in flight (clearing its refinement steps).
function M.cancel()
  timer:stop()
  generation = generation + 1
  local p = pending
  pending = nil
  clear_refinement()
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

--- Insert `piece`, the start of the suggestion; the rest stays on screen.
---@param piece fun(text: string): string
---@return boolean accepted
local function accept_piece(piece)
  local s = shown
  if not s or api.nvim_get_current_buf() ~= s.bufnr then
    return false
  end
  local first = piece(s.text)
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

--- Insert the suggestion's next line (pieces.next_line); the rest stays on screen.
---@return boolean accepted
function M.accept_line()
  return accept_piece(pieces.next_line)
end

--- Insert the suggestion's next word (pieces.next_word); the rest stays on screen.
---@return boolean accepted
function M.accept_word()
  return accept_piece(pieces.next_word)
end

--- After a keystroke: keep the suggestion if the user typed its next characters, else ask anew.
---@param bufnr integer
local function on_change(bufnr)
  if menu_visible() then
    -- The menu has the user's attention: show nothing until it closes (CompleteDone).
    M.cancel()
    M.dismiss()
    return
  end
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
  api.nvim_create_autocmd('CompleteDone', {
    group = augroup,
    buffer = bufnr,
    callback = function()
      -- The menu is still up while CompleteDone runs; ask once it has closed.
      vim.schedule(function()
        if api.nvim_get_current_buf() == bufnr and in_insert_mode() and not menu_visible() then
          M.schedule(bufnr)
        end
      end)
    end,
  })
  -- Leaving, or the menu opening or changing (CursorMovedI does not fire while it is up).
  api.nvim_create_autocmd({ 'InsertLeave', 'BufLeave', 'CompleteChanged', 'TextChangedP' }, {
    group = augroup,
    buffer = bufnr,
    callback = function()
      M.cancel()
      M.dismiss()
    end,
  })
end

return M
