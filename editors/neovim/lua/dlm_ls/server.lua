--- Starting `dlm-ls serve` and finding its client. One server per Neovim: every buffer of a
--- configured filetype attaches to the same client. When the command is missing or the server
--- dies, the user gets one message (Neovim's own for a crash) and no further attempts, not an
--- error per buffer.

local config = require('dlm_ls.config')

local M = {}

M.name = 'dlm_ls'

-- Set once a start failed, so that later buffers do not retry and repeat the message.
local broken = nil ---@type string?

--- The full command line: `cmd` plus `--model` and `--device`.
---@return string[]
function M.command()
  local o = config.options
  local cmd = vim.deepcopy(o.cmd)
  if o.model then
    vim.list_extend(cmd, { '--model', vim.fs.normalize(o.model) })
  end
  if o.device then
    vim.list_extend(cmd, { '--device', o.device })
  end
  return cmd
end

--- The settings the server reads at start (`initializationOptions`).
function M.init_options()
  -- This plugin waits out the debounce itself before it asks, so the server need not wait again.
  local settings = vim.tbl_extend('force', { debounceMs = 0 }, config.options.settings or {})
  if config.options.show_refinement then
    settings.streamRefinement = true -- the server sends dlm/refinement steps only when asked
  end
  return settings
end

---@return lsp.ClientCapabilities
local function capabilities()
  local caps = vim.lsp.protocol.make_client_capabilities()
  -- Neovim 0.11 does not announce LSP 3.18 inline completion; this plugin implements it.
  caps.textDocument.inlineCompletion = caps.textDocument.inlineCompletion or { dynamicRegistration = false }
  return caps
end

local function fail(msg)
  if broken then
    return
  end
  broken = msg
  vim.schedule(function()
    vim.notify('dlm_ls: ' .. msg .. ' (see :checkhealth dlm_ls)', vim.log.levels.WARN)
  end)
end

--- Why the server cannot run, or nil while it can.
---@return string?
function M.problem()
  return broken
end

--- Attach the server to a buffer, starting it on first use.
---@param bufnr integer
---@param on_attach fun(client: vim.lsp.Client, bufnr: integer)
function M.attach(bufnr, on_attach)
  if broken or vim.bo[bufnr].buftype ~= '' then
    return
  end
  local cmd = M.command()
  if vim.fn.executable(cmd[1]) ~= 1 then
    fail(('cannot run %q: not found or not executable. Install dlm-ls (pip install dlm-ls) or set `cmd`'):format(cmd[1]))
    return
  end
  local ok, err = pcall(vim.lsp.start, {
    name = M.name,
    cmd = cmd,
    root_dir = vim.fn.getcwd(),
    capabilities = capabilities(),
    init_options = M.init_options(),
    -- What Neovim answers when the server pulls its `dlm` section (workspace/configuration).
    settings = { dlm = M.init_options() },
    handlers = {
      ['dlm/refinement'] = function(_, params)
        require('dlm_ls.completion').on_refinement(params)
      end,
    },
    on_attach = on_attach,
    on_exit = function(code, signal)
      -- Neovim reports a crash itself; remember it, so other buffers do not start it again.
      if code ~= 0 or (signal ~= 0 and signal ~= 15) then
        broken = broken or ('the server exited with code %d, signal %d; :LspLog has its output'):format(code, signal)
      end
    end,
  }, {
    bufnr = bufnr,
    reuse_client = function(client, conf)
      return client.name == conf.name and not client:is_stopped()
    end,
  })
  if not ok then
    fail(('cannot start %s: %s'):format(table.concat(cmd, ' '), err))
  end
end

--- The running dlm-ls client attached to `bufnr` (or to any buffer when nil).
---@param bufnr? integer
---@return vim.lsp.Client?
function M.client(bufnr)
  return vim.lsp.get_clients({ name = M.name, bufnr = bufnr })[1]
end

--- Forget a failure and stop the running client, so the next buffer starts afresh.
function M.reset()
  broken = nil
  for _, client in ipairs(vim.lsp.get_clients({ name = M.name })) do
    client:stop()
  end
end

return M
