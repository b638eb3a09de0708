-- User commands; everything else starts with require('dlm_ls').setup().
if vim.g.loaded_dlm_ls then
  return
end
vim.g.loaded_dlm_ls = true

vim.api.nvim_create_user_command('DlmFill', function(args)
  require('dlm_ls').fill(args.range > 0 and { args.line1, args.line2 } or nil)
end, { range = true, desc = 'dlm_ls: fill the hole markers, or the selected lines' })

vim.api.nvim_create_user_command('DlmStatus', function()
  require('dlm_ls').status()
end, { desc = 'dlm_ls: show the server status (model, device, latency)' })
