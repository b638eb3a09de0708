--- The same verbs as completion.lua on top of Neovim's own inline completion (0.12+):
--- Neovim requests, debounces and draws; this module only adapts accept_line, dismiss and
--- suggestion, which that API does not offer, using what it shows on screen.

local api = vim.api

local M = {}

--- Neovim's namespace for the inline-completion extmark.
local function namespace()
  return api.nvim_get_namespaces()['nvim.lsp.inline_completion']
end

---@param bufnr integer
function M.attach(bufnr)
  vim.lsp.inline_completion.enable(true, { bufnr = bufnr })
end

function M.schedule() end -- Neovim requests on its own

function M.cancel() end

--- The suggestion on screen (from the cursor on), or nil.
---@return string?
function M.suggestion()
  local ns = namespace()
  if not ns then
    return nil
  end
  local marks = api.nvim_buf_get_extmarks(0, ns, 0, -1, { details = true, limit = 1 })
  local details = marks[1] and marks[1][4]
  if not details then
    return nil
  end
  local lines = {}
  for _, line in ipairs(vim.list_extend({ details.virt_text or {} }, details.virt_lines or {})) do
    local chunks = vim.tbl_map(function(chunk)
      return chunk[1]
    end, line)
    lines[#lines + 1] = table.concat(chunks)
  end
  local text = table.concat(lines, '\n')
  return text ~= '' and text or nil
end

---@return boolean accepted
function M.accept()
  return vim.lsp.inline_completion.get()
end

--- Insert the first line of what is shown, at the cursor.
---@return boolean accepted
function M.accept_line()
  local text = M.suggestion()
  if not text then
    return false
  end
  local first = text:match('^\n?[^\n]*')
  M.dismiss()
  local row, col = unpack(api.nvim_win_get_cursor(0))
  local lines = vim.split(first, '\n', { plain = true })
  api.nvim_buf_set_text(0, row - 1, col, row - 1, col, lines)
  local last = #lines == 1 and col + #lines[1] or #lines[#lines]
  api.nvim_win_set_cursor(0, { row + #lines - 1, last })
  return true
end

--- There is no public "dismiss": turning the buffer's inline completion off drops the
--- suggestion, and turning it on again resumes suggesting.
function M.dismiss()
  local bufnr = api.nvim_get_current_buf()
  if M.suggestion() then
    vim.lsp.inline_completion.enable(false, { bufnr = bufnr })
    vim.lsp.inline_completion.enable(true, { bufnr = bufnr })
  end
end

return M
