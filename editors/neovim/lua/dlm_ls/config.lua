--- Every option of dlm_ls and its default, in one table. `setup(opts)` merges the user's
--- options over these; the rest of the plugin reads `require('dlm_ls.config').options`.

local M = {}

---@class dlm_ls.Options
M.defaults = {
  -- false: setup() does nothing (no server, no keymaps); handy for a per-machine switch.
  enabled = true,
  -- The command that runs the server over stdio. Add flags here, e.g. '--in-process'.
  cmd = { 'dlm-ls', 'serve' },
  -- Checkpoint folder (`--model`); nil: the model shipped with dlm-ls.
  model = nil, ---@type string?
  -- 'auto' (the GPU when there is one), 'cpu' or 'cuda' (`--device`).
  device = 'auto',
  -- Milliseconds without a keystroke before asking for a suggestion. Neovim 0.11 only:
  -- 0.12's native inline completion does its own debouncing.
  debounce_ms = 50,
  -- Filetypes where the server attaches and suggestions appear; { '*' } for every filetype.
  filetypes = { 'python', 'lua', 'javascript', 'javascriptreact', 'typescript', 'typescriptreact', 'rust', 'go' },
  -- Insert-mode keys; each acts only while a suggestion is shown and otherwise falls through to
  -- the key's normal meaning. false disables a key (map require('dlm_ls').accept() yourself).
  keymaps = {
    accept = '<Tab>',
    accept_word = '<M-Right>',
    accept_line = '<M-l>',
    dismiss = '<C-]>',
  },
  -- Use Neovim's own vim.lsp.inline_completion where it exists (0.12+); false: always draw the
  -- ghost text with this plugin's extmarks.
  native = true,
  -- Highlight group of the ghost text; by default it links to Comment.
  hl_group = 'DlmGhostText',
  -- Draw the suggestion as it settles: each refinement step of the model, its undecided slots
  -- in `hl_group_undecided`, until the final suggestion replaces it. Neovim 0.11 path only.
  show_refinement = false,
  -- Highlight group of the slots not decided yet; by default it links to NonText.
  hl_group_undecided = 'DlmGhostTextUndecided',
  -- More server settings, sent as initializationOptions (e.g. { threshold = 0.8, maxTokens = 64 }).
  settings = {},
}

---@type dlm_ls.Options
M.options = vim.deepcopy(M.defaults)

-- Whether setup() has run (for :checkhealth).
M.configured = false

---@param opts? table
function M.set(opts)
  vim.validate('opts', opts, 'table', true)
  -- Lists replace, they do not merge: a user's `cmd` or `filetypes` is taken as a whole.
  M.configured = true
  M.options = vim.tbl_deep_extend('force', vim.deepcopy(M.defaults), opts or {})
  for _, key in ipairs({ 'cmd', 'filetypes' }) do
    if opts and opts[key] then
      M.options[key] = vim.deepcopy(opts[key])
    end
  end
  return M.options
end

return M
