--- Pure functions on suggestion text: the next word and the next line to accept, and a
--- refinement state cut into decided and undecided runs. No editor state, no API calls.

local M = {}

--- How the server draws a slot the model has not decided yet (model/infill.py MASK_GLYPH).
M.UNDECIDED = '\u{2591}'

--- The next word of `text`: a line break with the next line's indent, or leading blanks and then
--- one run of word characters or one run of other non-blank characters (so `foo(bar)` gives
--- `foo`, then `(`, then `bar`, then `)`).
---@param text string
---@return string
function M.next_word(text)
  local brk = text:match('^\r?\n[ \t]*')
  if brk then
    return brk
  end
  return text:match('^[ \t]*[%w_\128-\255]+') or text:match('^[ \t]*[^%w_\128-\255%s]') or text:match('^[ \t]+')
    or text
end

--- The next line of `text`: up to the line break; a text that starts with a line break gives
--- that break and the line after it.
---@param text string
---@return string
function M.next_line(text)
  return text:match('^\n?[^\n]*')
end

--- A refinement state cut into lines of runs, each `{ text, undecided }`.
---@param text string
---@return { [1]: string, [2]: boolean }[][]
function M.runs(text)
  local lines = {}
  for _, line in ipairs(vim.split(text, '\n', { plain = true })) do
    local runs, at = {}, 1
    while at <= #line do
      local s = line:find(M.UNDECIDED, at, true)
      local e = s and s + #M.UNDECIDED - 1
      while e and line:sub(e + 1, e + #M.UNDECIDED) == M.UNDECIDED do
        e = e + #M.UNDECIDED -- the glyph is three bytes: a pattern's `+` would repeat only the last
      end
      if not s then
        runs[#runs + 1] = { line:sub(at), false }
        break
      end
      if s > at then
        runs[#runs + 1] = { line:sub(at, s - 1), false }
      end
      runs[#runs + 1] = { line:sub(s, e), true }
      at = e + 1
    end
    lines[#lines + 1] = runs
  end
  return lines
end

return M
