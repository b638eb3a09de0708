"""regions.py: none / line / block decisions, per language, with the tree and with the line fallback.

Each case is (language, text with █ at the cursor, expected kind). Cases marked TREE need the parse
tree (a string spanning lines); the others must come out the same with and without a tree.
"""

from __future__ import annotations

import pytest

from dlm_ls.lsp_server.regions import BLOCK_MAX_TOKENS, LINE_MAX_TOKENS, Region, cursor_context, decide_region
from dlm_ls.lsp_server.syntax import SyntaxTree

TREE = "tree-only"

CASES = {
    "python": [
        ("def f(x):\n    █\n", "block"),
        ("def f(x):█\n", "block"),
        ("for i in range(3):\n    █", "block"),
        ("class A:\n    def m(self):\n        █\n", "block"),
        ("def f():\n    x = 1\n    █\n\n\ndef g():\n    pass\n", "block"),
        ("def f():\n    x = 1\n    █\n    return x\n", "line"),
        ("print(█)\n", "line"),
        ("x = █\n", "line"),
        ("if x█:\n    pass\n", "line"),
        ('s = f"{█}"\n', "line", TREE),
        ('open("█")\n', "line"),
        ("foo(a,\n    █\n", "line"),
        ("fo█o = 1\n", "none"),
        ("x = 1  # a comment█\n", "none"),
        ("x = 1  # a comment █\n", "none"),
        ('s = "hello █"\n', "none"),
        ("foo(█, b)\n", "none"),
        ("x = █y\n", "none"),
        ('def f():\n    """Doc.\n\n    █\n    """\n', "none", TREE),
    ],
    "javascript": [
        ("function f() {\n  █\n}\n", "block"),
        ("if (x) {█\n", "block"),
        ("const g = () => {\n  █\n};\n", "block"),
        ("console.log(█);\n", "line"),
        ("const s = `a ${█}`;\n", "line", TREE),
        ("let a = [1, █];\n", "line"),
        ("// todo █\n", "none"),
        ('let x = "ab█";\n', "none"),
        ("cons█t x = 1;\n", "none"),
        ("f(█a);\n", "none"),
    ],
    "typescript": [
        ("interface P {\n  █\n}\n", "block"),
        ("function g(p: P): string {█\n", "block"),
        ("const n: number = █;\n", "line"),
        ("let s: string = 'a█';\n", "none"),
        ("/* note █ */\n", "none"),
    ],
    "typescriptreact": [
        ("const [n, setN] = useState(█);\n", "line"),
        ("const A = () => <div>{█}</div>;\n", "none"),  # JSX right of the cursor is code
        ("function C() {\n  █\n}\n", "block"),
        ("const t = 'x█';\n", "none"),
    ],
    "rust": [
        ("fn main() {\n    █\n}\n", "block"),
        ("fn f<'a>(x: &'a str) -> &'a str { x }\n█", "block"),
        ("let v = vec![█];\n", "line"),
        ("let r: &'a str = foo(█);\n", "line"),
        ('let s = "ab█";\n', "none"),
        ("let x = 1; // c█\n", "none"),
        ("impl P {\n    fn n(&self) -> f64 {█\n", "block"),
    ],
    "go": [
        ("func main() {\n\t█\n}\n", "block"),
        ("for i := 0; i < n; i++ {█\n", "block"),
        ("fmt.Println(█)\n", "line"),
        ("s := `raw █`\n", "none"),
        ("x := 1 // c█\n", "none"),
        ("fm█t.Println()\n", "none"),
    ],
    "lua": [
        ("function f(x)\n  █\nend\n", "block"),
        ("if x then\n  █\nend\n", "block"),
        ("for i = 1, 3 do█\n", "block"),
        ("local function g(a, b)█\n", "block"),
        ("print(█)\n", "line"),
        ("-- comment█\n", "none"),
        ('local s = "ab█"\n', "none"),
        ("local s = [[ab█]]\n", "none", TREE),
    ],
    # Unsupported languages: line rules only (trailing { or :, indentation, a line lexer).
    "c": [
        ("int main() {\n  █\n}\n", "block"),
        ("printf(█);\n", "line"),
        ("x = 1; // c█\n", "none"),
        ('char *s = "ab█";\n', "none"),
        ("ma█in();\n", "none"),
    ],
    "yaml": [
        ("key:\n  █\n", "block"),
        ("key: █\n", "line"),
        ("key:█\n", "block"),
        ("key: 1 # c█\n", "none"),
    ],
}

PARAMS = [pytest.param(lang, case[0], case[1], TREE in case[2:], id=f"{lang}-{i}")
          for lang, cases in CASES.items() for i, case in enumerate(cases)]


def split_cursor(text: str) -> tuple[str, int]:
    return text.replace("█", ""), text.index("█")


@pytest.mark.parametrize("language_id,marked,kind,tree_only", PARAMS)
def test_region_with_tree(language_id, marked, kind, tree_only):
    text, offset = split_cursor(marked)
    region = decide_region(text, offset, language_id, SyntaxTree(language_id, text))
    assert region.kind == kind, region.reason


@pytest.mark.parametrize("language_id,marked,kind,tree_only", PARAMS)
def test_region_line_fallback(language_id, marked, kind, tree_only):
    if tree_only:
        pytest.skip("needs the parse tree")
    text, offset = split_cursor(marked)
    region = decide_region(text, offset, language_id, None)
    assert region.kind == kind, region.reason


def test_region_sizes_are_the_named_defaults():
    text, offset = split_cursor("print(█)\n")
    line = decide_region(text, offset, "python")
    assert line.max_tokens == LINE_MAX_TOKENS == 32
    text, offset = split_cursor("def f():\n    █\n")
    block = decide_region(text, offset, "python")
    assert block.max_tokens == BLOCK_MAX_TOKENS == 128
    assert Region.none("x").max_tokens == 0


def test_stale_tree_is_ignored():
    # A tree for other text must not steer the decision (the document changed since it was parsed).
    text, offset = split_cursor('s = "█"\n')
    stale = SyntaxTree("python", "# " + text)
    assert decide_region(text, offset, "python", stale).kind == "line"


def test_cursor_context_reports_closing_delimiter():
    for lang, marked, closing in [("python", 'x = f"""█"""\n', '"""'), ("javascript", "x = `█`;\n", "`"),
                                  ("rust", 'let r = r#"█"#;\n', '"#'), ("lua", "s = [[█]]\n", "]]")]:
        text, offset = split_cursor(marked)
        ctx = cursor_context(text, offset, lang, SyntaxTree(lang, text))
        assert (ctx.kind, ctx.closing, ctx.at_content_start) == ("string", closing, True)


def test_crlf_line_end_is_blank():
    text, offset = split_cursor("def f():\r\n    █\r\n")
    assert decide_region(text, offset, "python", SyntaxTree("python", text)).kind == "block"
    text, offset = split_cursor("print(█)\r\n")
    assert decide_region(text, offset, "python").kind == "line"
