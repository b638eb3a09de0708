--- :DlmFill and :DlmStatus, through the server's custom methods `dlm/fill` and `dlm/status`.

local server = require('dlm_ls.server')
local api = vim.api

local M = {}

local function client_or_warn(bufnr)
  local client = server.client(bufnr)
  if not client then
    local why = server.problem() or 'the server is not attached to this buffer (see `filetypes`)'
    vim.notify('dlm_ls: ' .. why, vim.log.levels.WARN)
  end
  return client
end

---@param bufnr integer
---@param row integer 0-based
---@param col integer byte column
---@param encoding string
---@return lsp.Position
local function position(bufnr, row, col, encoding)
  local line = api.nvim_buf_get_lines(bufnr, row, row + 1, false)[1] or ''
  return { line = row, character = vim.str_utfindex(line, encoding, math.min(col, #line), false) }
end

--- The LSP range of lines line1..line2 (1-based), or of the last charwise visual selection
--- when it spans exactly those lines.
local function selection_range(bufnr, line1, line2, encoding)
  local s, e = api.nvim_buf_get_mark(bufnr, '<'), api.nvim_buf_get_mark(bufnr, '>')
  if vim.fn.visualmode() == 'v' and s[1] == line1 and e[1] == line2 then
    local last = api.nvim_buf_get_lines(bufnr, e[1] - 1, e[1], false)[1] or ''
    -- '> marks the last selected character's first byte; LSP ends are exclusive.
    local char = vim.fn.strpart(last, e[2], 1, true)
    return {
      start = position(bufnr, s[1] - 1, s[2], encoding),
      ['end'] = position(bufnr, e[1] - 1, e[2] + #char, encoding),
    }
  end
  return { start = { line = line1 - 1, character = 0 }, ['end'] = { line = line2, character = 0 } }
end

--- Fill the hole markers of the current buffer (`<|hole|>`, or a lone `...` in Python), or
--- rewrite lines `range[1]..range[2]` when given.
---@param range? [integer, integer] 1-based first and last line
function M.fill(range)
  local bufnr = api.nvim_get_current_buf()
  local client = client_or_warn(bufnr)
  if not client then
    return
  end
  local params = { textDocument = vim.lsp.util.make_text_document_params(bufnr) }
  if range then
    params.range = selection_range(bufnr, range[1], range[2], client.offset_encoding)
  end
  local tick = api.nvim_buf_get_changedtick(bufnr)
  client:request('dlm/fill', params, function(err, result)
    if err then
      vim.notify('dlm_ls: fill failed: ' .. tostring(err.message), vim.log.levels.ERROR)
    elseif not result or not result.edits or #result.edits == 0 then
      vim.notify('dlm_ls: nothing to fill (select lines, or mark holes with <|hole|>)', vim.log.levels.INFO)
    elseif api.nvim_buf_get_changedtick(bufnr) ~= tick then
      vim.notify('dlm_ls: the buffer changed while filling; nothing applied', vim.log.levels.WARN)
    else
      vim.lsp.util.apply_text_edits(result.edits, bufnr, client.offset_encoding)
    end
  end, bufnr)
end

--- The parts of `dlm/status` a user asks about, one line each.
---@param s table
---@return string[]
function M.format_status(s)
  local lines = {}
  local function add(fmt, ...)
    lines[#lines + 1] = fmt:format(...)
  end
  add('model: %s%s', s.model or 'not loaded', s.model_dir and (' (' .. s.model_dir .. ')') or '')
  add('device: %s%s', s.device or '?', s.dtype and (' (' .. s.dtype .. ')') or '')
  local mode = vim.tbl_get(s, 'backend', 'mode')
  add('worker: %s%s', mode or 'shared', s.worker_pid and (', pid ' .. s.worker_pid) or '')
  local total = vim.tbl_get(s, 'latency_ms', 'total')
  if total then
    add('latency: p50 %.0f ms, p95 %.0f ms over %d requests', total.p50, total.p95, total.count)
  end
  local counters = vim.tbl_get(s, 'policy', 'counters')
  if counters then
    local parts = {}
    for _, key in ipairs({ 'suggestions', 'empty', 'cancelled', 'superseded', 'errors' }) do
      if counters[key] then
        parts[#parts + 1] = ('%d %s'):format(counters[key], key)
      end
    end
    add('requests: %d (%s)', counters.requests or 0, table.concat(parts, ', '))
  end
  if type(s.cache) == 'table' then
    add('cache: %d hits, %d misses, %d KiB', s.cache.hits or 0, s.cache.misses or 0, (s.cache.bytes or 0) / 1024)
  end
  if s.worker_error then
    add('error: %s', s.worker_error)
  end
  return lines
end

--- Show what the server reports about itself (model, device, worker, cache, latency).
function M.status()
  local client = client_or_warn(nil)
  if not client then
    return
  end
  client:request('dlm/status', {}, function(err, result)
    if err then
      vim.notify('dlm_ls: status failed: ' .. tostring(err.message), vim.log.levels.ERROR)
      return
    end
    vim.notify(table.concat(vim.list_extend({ 'dlm_ls' }, M.format_status(result or {})), '\n'))
  end)
end

return M
