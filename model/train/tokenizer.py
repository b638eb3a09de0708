"""Train, load and use the byte-level BPE tokenizer; add token counts to the corpus manifest.

What it does: trains a byte-level BPE (`tokenizers`) on a deterministic sample of the corpus's
train split, with the special tokens of `dlm_ls.model.tokens` at ids 0..N-1 in their declared
order; saves a `tokenizer.json` that both `tokenizers.Tokenizer.from_file` and
`transformers.PreTrainedTokenizerFast(tokenizer_file=...)` load. Encoding is lossless:
`decode(encode(x)) == x` for any string (no normalizer, no prefix space, byte-level alphabet
seeded with all 256 bytes, no BOS/EOS post-processor).

Special-token strings in user text: `tokenizers` matches added tokens anywhere in the input, and
`add_special_tokens=False` does not stop that (it only skips the post-processor). So a file that
contains the literal text "<|mask|>" would encode to MASK_ID with plain `encode`. Use
`encode_plain` / `encode_plain_batch` for all source text (server requests and training data):
they cut such literals out and encode them byte by byte, so they round-trip as text and never
become control ids. Decode with `skip_special_tokens=False` when ids may hold special tokens.

What it does not know: the model, the infill layout, or anything about the corpus beyond the
JSONL rows ({"path", "package", "license", "text"}) and manifest written by corpus.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dlm_ls.model.tokens import SPECIAL_TOKENS

# Defaults (one place)
VOCAB_SIZE = 16384
MAX_TRAIN_BYTES = 40_000_000  # ~40 MB of text trains in a few minutes on 2 cores
MIN_FREQUENCY = 2
SAMPLE_SEED = "dlm-ls-tokenizer-v1"
TRAIN_SPLIT = "train"

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


def new_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: a file (or a context cut mid-line) must not gain a leading space.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def iter_split_texts(corpus_dir: Path, split: str = TRAIN_SPLIT) -> Iterator[dict]:
    with open(Path(corpus_dir) / f"{split}.jsonl", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def _keep_score(row: dict) -> float:
    d = hashlib.sha256(f"{SAMPLE_SEED}:{row['package']}:{row['path']}".encode()).digest()
    return int.from_bytes(d[:8], "big") / 2**64


def sample_texts(corpus_dir: Path, max_bytes: int = MAX_TRAIN_BYTES) -> list[str]:
    """A deterministic sample of the train split up to max_bytes: files taken in hash order.

    Whole files, so each package contributes in proportion to its size on average, and the
    same corpus always yields the same sample (hence the same vocabulary).
    """
    rows = [(_keep_score(r), len(r["text"].encode("utf-8")), r["text"]) for r in iter_split_texts(corpus_dir)]
    rows.sort(key=lambda r: r[0])
    out, total = [], 0
    for _, n, text in rows:
        if total + n > max_bytes and out:
            break
        out.append(text)
        total += n
    return out


def train_tokenizer(
    corpus_dir: Path | str,
    out_path: Path | str,
    vocab_size: int = VOCAB_SIZE,
    max_bytes: int = MAX_TRAIN_BYTES,
    min_frequency: int = MIN_FREQUENCY,
    texts: Sequence[str] | None = None,
    show_progress: bool = False,
) -> Path:
    """Train on the corpus train split (or on `texts` if given) and save to out_path."""
    if texts is None:
        texts = sample_texts(Path(corpus_dir), max_bytes)
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),  # the trainer puts these first, in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    check_special_ids(tok)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_path))
    return out_path


def check_special_ids(tok: Tokenizer) -> None:
    for i, t in enumerate(SPECIAL_TOKENS):
        got = tok.token_to_id(t)
        assert got == i, f"special token {t!r} has id {got}, expected {i}"
    for ch in BYTE_CHARS.values():
        assert tok.token_to_id(ch) is not None, f"byte char {ch!r} missing from the vocabulary"


def load_tokenizer(path: Path | str) -> Tokenizer:
    tok = Tokenizer.from_file(str(path))
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


def add_token_counts(corpus_dir: Path | str, tokenizer_path: Path | str, batch: int = 256) -> dict:
    """Add per-package and per-split token counts (encode_plain) to manifest.json; return it."""
    from dlm_ls.model.train.corpus import SPLITS, write_manifest

    corpus_dir = Path(corpus_dir)
    tok = load_tokenizer(tokenizer_path)
    mpath = corpus_dir / "manifest.json"
    manifest = json.loads(mpath.read_text(encoding="utf-8"))
    for split in SPLITS:
        if not (corpus_dir / f"{split}.jsonl").exists():
            continue
        counts: dict[str, int] = {}
        rows = iter_split_texts(corpus_dir, split)
        while True:
            chunk = [r for _, r in zip(range(batch), rows)]
            if not chunk:
                break
            for r, ids in zip(chunk, encode_plain_batch(tok, [r["text"] for r in chunk])):
                counts[r["package"]] = counts.get(r["package"], 0) + len(ids)
        sd = manifest["splits"][split]
        for pkg, n in counts.items():
            sd["packages"].setdefault(pkg, {})["tokens"] = n
        sd["tokens"] = sum(counts.values())
    manifest["tokenizer"] = {"path": str(tokenizer_path), "vocab_size": tok.get_vocab_size(),
                             "special_tokens": list(SPECIAL_TOKENS)}
    write_manifest(mpath, manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dlm-ls tokenizer", description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    ap.add_argument("--out", type=Path, default=Path("data/tokenizer.json"))
    ap.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    ap.add_argument("--max-bytes", type=int, default=MAX_TRAIN_BYTES)
    ap.add_argument("--no-counts", action="store_true", help="skip adding token counts to manifest.json")
    a = ap.parse_args(argv)
    t0 = time.time()
    texts = sample_texts(a.corpus, a.max_bytes)
    print(f"tokenizer: training on {len(texts)} files, {sum(len(t.encode()) for t in texts) / 1e6:.1f} MB", file=sys.stderr)
    path = train_tokenizer(a.corpus, a.out, a.vocab_size, texts=texts, show_progress=sys.stderr.isatty())
    print(f"tokenizer: wrote {path} ({time.time() - t0:.0f}s)", file=sys.stderr)
    if not a.no_counts and (a.corpus / "manifest.json").exists():
        m = add_token_counts(a.corpus, path)
        print("tokens: " + ", ".join(f"{s}={m['splits'][s].get('tokens', 0)}" for s in m["splits"]) +
              f" ({time.time() - t0:.0f}s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
