--- dlm_ls: inline code suggestions from the dlm-ls language server.
--- This file only wires the modules together: config (the options), server (starting the LSP
--- client), completion or native (the ghost text), commands (:DlmFill, :DlmStatus).

local M = {}

--- The ghost-text engine: Neovim's own where it has one (0.12+), else this plugin's extmarks.
local function engine()
  if require('dlm_ls.config').options.native and vim.lsp.inline_completion then
    return require('dlm_ls.native')
  end
  return require('dlm_ls.completion')
end

--- Insert the whole suggestion. Returns false when none is shown.
---@return boolean
function M.accept()
  return engine().accept()
end

--- Insert the suggestion's next word. Returns false when none is shown (or the engine,
--- Neovim 0.12's own, has no word accept).
---@return boolean
function M.accept_word()
  local e = engine()
  return e.accept_word ~= nil and e.accept_word()
end

--- Insert the suggestion's first line. Returns false when none is shown.
---@return boolean
function M.accept_line()
  return engine().accept_line()
end

--- Hide the suggestion.
function M.dismiss()
  engine().dismiss()
end

--- The suggestion on screen (from the cursor on), or nil.
---@return string?
function M.suggestion()
  return engine().suggestion()
end

--- Fill hole markers, or the given lines (1-based, inclusive).
---@param range? [integer, integer]
function M.fill(range)
  require('dlm_ls.commands').fill(range)
end

--- Show the server's status.
function M.status()
  require('dlm_ls.commands').status()
end

--- An insert-mode key that runs `verb` while a suggestion is shown, else does its usual job.
local function map(lhs, verb)
  if not lhs then
    return
  end
  vim.keymap.set('i', lhs, function()
    if M.suggestion() then
      return ('<Cmd>lua require("dlm_ls").%s()<CR>'):format(verb)
    end
    return lhs
  end, { expr = true, replace_keycodes = true, desc = 'dlm_ls: ' .. verb:gsub('_', ' ') })
end

local function highlight()
  vim.api.nvim_set_hl(0, 'DlmGhostText', { link = 'Comment', default = true })
  vim.api.nvim_set_hl(0, 'DlmGhostTextUndecided', { link = 'NonText', default = true })
end

---@param opts? dlm_ls.Options|table
function M.setup(opts)
  local o = require('dlm_ls.config').set(opts)
  local server = require('dlm_ls.server')
  local group = vim.api.nvim_create_augroup('dlm_ls', { clear = true })
  server.reset()
  if not o.enabled then
    return
  end

  highlight()
  vim.api.nvim_create_autocmd('ColorScheme', { group = group, callback = highlight })

  local function attach(bufnr)
    server.attach(bufnr, function(_, b)
      engine().attach(b)
    end)
  end
  vim.api.nvim_create_autocmd('FileType', {
    group = group,
    pattern = o.filetypes,
    callback = function(args)
      attach(args.buf)
    end,
  })
  -- Buffers opened before setup() ran.
  for _, bufnr in ipairs(vim.api.nvim_list_bufs()) do
    local ft = vim.bo[bufnr].filetype
    if vim.api.nvim_buf_is_loaded(bufnr) and ft ~= '' and (vim.tbl_contains(o.filetypes, ft) or vim.tbl_contains(o.filetypes, '*')) then
      attach(bufnr)
    end
  end

  map(o.keymaps.accept, 'accept')
  map(o.keymaps.accept_word, 'accept_word')
  map(o.keymaps.accept_line, 'accept_line')
  map(o.keymaps.dismiss, 'dismiss')
end

return M
