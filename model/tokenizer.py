"""The tokenizer as inference and training use it: load a `tokenizer.json`, encode source text, decode.

Special-token strings in user text: `tokenizers` matches added tokens anywhere in the input, and
`add_special_tokens=False` does not stop that (it only skips the post-processor). So a file that
contains the literal text "<|mask|>" would encode to MASK_ID with plain `encode`. `encode_plain` /
`encode_plain_batch` are used for all source text (server requests and training data alike): they
cut such literals out and encode them byte by byte, so they round-trip as text and never become
control ids. `decode` keeps special tokens (ids may hold them).

Torch-free. Training the BPE is `model/train/tokenizer.py`; this module does not know how.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer

from .tokens import SPECIAL_TOKENS

_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in sorted(SPECIAL_TOKENS, key=len, reverse=True)))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable-char table, which the ByteLevel pre-tokenizer also uses."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


BYTE_CHARS = _bytes_to_unicode()


def check_special_ids(tok: Tokenizer) -> None:
    for i, t in enumerate(SPECIAL_TOKENS):
        got = tok.token_to_id(t)
        assert got == i, f"special token {t!r} has id {got}, expected {i}"
    for ch in BYTE_CHARS.values():
        assert tok.token_to_id(ch) is not None, f"byte char {ch!r} missing from the vocabulary"


def load(path: Path | str, ours: bool = True) -> Tokenizer:
    """A `tokenizer.json`; one of ours is checked to hold our special tokens at their ids and every byte
    (a foreign checkpoint's, `ours=False`, has its own)."""
    tok = Tokenizer.from_file(str(path))
    if ours:
        check_special_ids(tok)
    return tok


def _plain_literal_ids(tok: Tokenizer, literal: str) -> list[int]:
    # One id per byte: a special-token string typed in a file stays text, never a control id.
    return [tok.token_to_id(BYTE_CHARS[b]) for b in literal.encode("utf-8")]


def encode_plain(tok: Tokenizer, text: str) -> list[int]:
    """Encode user/source text with special-token strings treated as ordinary text."""
    if "<|" not in text or not _SPECIAL_RE.search(text):
        return tok.encode(text, add_special_tokens=False).ids
    ids: list[int] = []
    pos = 0
    for m in _SPECIAL_RE.finditer(text):
        if m.start() > pos:
            ids += tok.encode(text[pos : m.start()], add_special_tokens=False).ids
        ids += _plain_literal_ids(tok, m.group())
        pos = m.end()
    if pos < len(text):
        ids += tok.encode(text[pos:], add_special_tokens=False).ids
    return ids


def encode_plain_batch(tok: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Batch form of encode_plain: clean texts go through the parallel Rust batch encoder."""
    out: list[list[int] | None] = [None] * len(texts)
    clean = [i for i, t in enumerate(texts) if "<|" not in t or not _SPECIAL_RE.search(t)]
    if clean:
        for i, enc in zip(clean, tok.encode_batch([texts[i] for i in clean], add_special_tokens=False)):
            out[i] = enc.ids
    for i, t in enumerate(texts):
        if out[i] is None:
            out[i] = encode_plain(tok, t)
    return out  # type: ignore[return-value]


def decode(tok: Tokenizer, ids: Sequence[int]) -> str:
    return tok.decode(list(ids), skip_special_tokens=False)
