--- :checkhealth dlm_ls: the command exists, the server starts, the model loads, the device is used.
--- It asks the running server when there is one, else starts a throwaway server for the check.

local config = require('dlm_ls.config')
local server = require('dlm_ls.server')

local M = {}

local h = vim.health

--- Start `cmd`, initialize it and ask `dlm/status`; always stops it again.
---@return table? status, string? error
local function probe(cmd)
  local exited ---@type string?
  local ok, rpc = pcall(vim.lsp.rpc.start, cmd, {
    on_exit = function(code, signal)
      exited = ('exited with code %d, signal %d'):format(code, signal)
    end,
  })
  if not ok then
    return nil, tostring(rpc)
  end

  local function call(method, params, timeout_ms)
    local reply ---@type { err: lsp.ResponseError?, result: any }?
    rpc.request(method, params, function(err, result)
      reply = { err = err, result = result }
    end)
    vim.wait(timeout_ms, function()
      return reply ~= nil or exited ~= nil
    end, 50)
    if not reply then
      return nil, exited or ('no answer to %s within %d s'):format(method, timeout_ms / 1000)
    end
    if reply.err then
      return nil, ('%s failed: %s'):format(method, reply.err.message)
    end
    return reply.result
  end

  local status, err
  local init = nil
  init, err = call('initialize', {
    processId = vim.fn.getpid(),
    clientInfo = { name = 'Neovim :checkhealth dlm_ls' },
    rootUri = vim.uri_from_fname(vim.fn.getcwd()),
    capabilities = { textDocument = { inlineCompletion = { dynamicRegistration = false } } },
    initializationOptions = server.init_options(),
  }, 30000)
  if init then
    h.ok(('server starts and answers `initialize` (inline completion: %s)'):format(
      init.capabilities and init.capabilities.inlineCompletionProvider and 'yes' or 'NO'
    ))
    rpc.notify('initialized', {})
    -- The first status waits for the model to load: seconds on a GPU, longer on a busy CPU.
    status, err = call('dlm/status', {}, 180000)
    call('shutdown', nil, 5000)
    rpc.notify('exit')
  end
  vim.wait(2000, function()
    return exited ~= nil
  end, 50)
  if not exited then
    rpc.terminate()
  end
  return status, err
end

function M.check()
  h.start('dlm_ls')
  if vim.fn.has('nvim-0.11') == 0 then
    h.error('Neovim 0.11 or later is required')
    return
  end
  if not config.configured then
    h.warn("require('dlm_ls').setup() has not run; checking with the default options")
  end
  local o = config.options
  local native = o.native and vim.lsp.inline_completion
  h.info(('ghost text: %s'):format(native and "Neovim's vim.lsp.inline_completion" or "this plugin's extmarks"))

  local cmd = server.command()
  if vim.fn.executable(cmd[1]) ~= 1 then
    h.error(('%q is not executable'):format(cmd[1]), {
      'Install the server: pip install dlm-ls',
      "Or point `cmd` at it: require('dlm_ls').setup({ cmd = { '/path/to/dlm-ls', 'serve' } })",
    })
    return
  end
  h.ok(('command: %s'):format(table.concat(cmd, ' ')))

  local status, err
  local client = server.client()
  if client then
    h.ok(('server running (client %d)'):format(client.id))
    local reply = client:request_sync('dlm/status', {}, 180000)
    if not reply then
      err = 'no answer to dlm/status'
    elseif reply.err then
      err = reply.err.message
    else
      status = reply.result
    end
  else
    status, err = probe(cmd)
  end
  if not status then
    h.error('the server does not run: ' .. tostring(err), { 'See :LspLog, or run the command above in a shell' })
    return
  end
  if status.worker_error or not status.model then
    h.error('the model did not load: ' .. tostring(status.worker_error or 'no model reported'), {
      'Check `model` (a checkpoint folder with config.json), or leave it unset for the default model',
    })
    return
  end
  h.ok(('model loaded: %s'):format(status.model_dir or status.model))

  local device = tostring(status.device)
  local wanted = o.device or 'auto'
  local detail = ('device: %s%s%s'):format(
    device,
    status.dtype and (', ' .. status.dtype) or '',
    status.worker_pid and (', worker pid ' .. status.worker_pid) or ', in-process'
  )
  if wanted:match('^cuda') and not device:match('^cuda') then
    h.error(detail .. (' (asked for %s)'):format(wanted), { 'Is a CUDA build of torch installed?' })
  elseif wanted == 'auto' and device == 'cpu' and vim.fn.executable('nvidia-smi') == 1 then
    h.warn(detail .. ', although nvidia-smi is present', { 'Is a CUDA build of torch installed?' })
  else
    h.ok(detail)
  end
end

return M
