"""Train the byte-level BPE tokenizer; add token counts to the corpus manifest.

What it does: trains a byte-level BPE (`tokenizers`) on a deterministic sample of the corpus's
train split, with the special tokens of `dlm_ls.model.tokens` at ids 0..N-1 in their declared
order; saves a `tokenizer.json` that both `tokenizers.Tokenizer.from_file` and
`transformers.PreTrainedTokenizerFast(tokenizer_file=...)` load. Encoding is lossless:
`decode(encode(x)) == x` for any string (no normalizer, no prefix space, byte-level alphabet
seeded with all 256 bytes, no BOS/EOS post-processor).

Loading and encoding (`encode_plain`, special-token strings kept as text) are `model/tokenizer.py`.

What it does not know: the model, the infill layout, or anything about the corpus beyond the
JSONL rows ({"path", "package", "license", "text"}) and manifest written by corpus.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..tokenizer import BYTE_CHARS, check_special_ids, decode, encode_plain, encode_plain_batch  # noqa: F401
from ..tokenizer import load as load_tokenizer
from ..tokens import SPECIAL_TOKENS

# Defaults (one place)
VOCAB_SIZE = 16384
MAX_TRAIN_BYTES = 40_000_000  # ~40 MB of text trains in a few minutes on 2 cores
MIN_FREQUENCY = 2
SAMPLE_SEED = "dlm-ls-tokenizer-v1"
TRAIN_SPLIT = "train"




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
