"""Tokenizer: lossless round trip, fixed special ids, plain encoding of special literals, HF loading."""

import json

import pytest

from dlm_ls.model.tokens import MASK_ID, SPECIAL_TOKENS
from dlm_ls.model.train import tokenizer as T

AWKWARD = [
    "def f(x):\n\treturn x\t# tab\n",
    "line one\r\nline two\r\n\r\n",
    "naïve café — Ωμέγα 日本語 🙂🚀 👩‍💻\n",
    "    indented start with spaces",
    " leading single space",
    "ntext(self):  # starts mid-word",
    "",
    "\n\n\n",
    "x = '\\u00e9'  \x0b\x0c trailing   ",
    "s = '<|mask|>' + '<|endoftext|><|hole_3|>' + '<|nope|>'",
]

FIXTURE = [
    "import os\nimport sys\n\n\ndef main(argv=None):\n    for name in os.listdir('.'):\n        print(name)\n    return 0\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n    def norm(self):\n        return (self.x ** 2 + self.y ** 2) ** 0.5\n",
] * 20


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus")
    with open(corpus / "train.jsonl", "w") as fh:
        for i, t in enumerate(FIXTURE):
            fh.write(json.dumps({"path": f"m{i}.py", "package": "fx", "license": "MIT", "text": t}) + "\n")
    (corpus / "validation.jsonl").write_text(json.dumps({"path": "v.py", "package": "vx", "license": "MIT", "text": FIXTURE[0]}) + "\n")
    (corpus / "test.jsonl").write_text("")
    (corpus / "manifest.json").write_text(json.dumps({"splits": {s: {"packages": {}} for s in ("train", "validation", "test")}}))
    return corpus, T.train_tokenizer(corpus, corpus / "tokenizer.json", vocab_size=300)


def test_special_ids_fixed(tok_path):
    tok = T.load_tokenizer(tok_path[1])
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tok.get_vocab_size() <= 300


@pytest.mark.parametrize("text", AWKWARD)
def test_round_trip(tok_path, text):
    tok = T.load_tokenizer(tok_path[1])
    ids = T.encode_plain(tok, text)
    assert T.decode(tok, ids) == text
    assert not set(ids) & set(range(len(SPECIAL_TOKENS)))  # user text never yields control ids
    if "<|" not in text:
        assert tok.decode(tok.encode(text).ids) == text


def test_special_literal_behaviour(tok_path):
    tok = T.load_tokenizer(tok_path[1])
    # Plain encode matches the literal as a special token (documented hazard) ...
    assert MASK_ID in tok.encode("a<|mask|>b", add_special_tokens=False).ids
    # ... encode_plain does not, and batches agree with single calls.
    texts = ["a<|mask|>b", "plain text", "<|pad|>"]
    assert T.encode_plain_batch(tok, texts) == [T.encode_plain(tok, t) for t in texts]
    assert MASK_ID not in T.encode_plain(tok, "a<|mask|>b")
    # Special tokens decode as their text when kept.
    assert T.decode(tok, [MASK_ID]) == "<|mask|>"


def test_transformers_loads(tok_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok_path[1]))
    assert hf.convert_tokens_to_ids("<|mask|>") == MASK_ID
    text = "def f(x):\n\treturn x  # ok 🙂\r\n"
    assert hf.decode(hf.encode(text, add_special_tokens=False)) == text


def test_add_token_counts(tok_path):
    corpus, path = tok_path
    m = T.add_token_counts(corpus, path)
    assert m["splits"]["train"]["tokens"] > 0 and m["splits"]["train"]["packages"]["fx"]["tokens"] == m["splits"]["train"]["tokens"]
    assert m["splits"]["test"]["tokens"] == 0
    assert json.loads((corpus / "manifest.json").read_text())["tokenizer"]["vocab_size"] <= 300
