"""Shared fixtures: a tiny random checkpoint folder (model + tokenizer) made on the fly.

Random tiny models are unit-test fixtures only; the product's default is the trained model in
model/default. Building the fixture takes about a second, once per test session.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton decides interpreter-or-compiler when a kernel is decorated, i.e. when its module is
    # first imported (through the network, by almost any test): set it before any test module loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")

FIXTURE_TEXT = '''
def add(a, b):
    return a + b


class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y

    def norm(self):
        return (self.x ** 2 + self.y ** 2) ** 0.5


for i in range(10):
    if i % 2 == 0:
        print("even", i)
    else:
        print("odd", i)

import os, sys
path = os.path.join(sys.prefix, "lib")
function greet(name) { return "hello " + name; }
fn main() { let v: Vec<i32> = Vec::new(); println!("{}", v.len()); }
local t = { a = 1, b = 2 }  -- lua
\tindented\twith\ttabs\r\n émoji 😀 ünïcode
'''


def train_tiny_bpe(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE with the layout's special tokens at their fixed ids, trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from dlm_ls.model.tokens import NUM_SPECIAL, SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    assert [tok.token_to_id(s) for s in SPECIAL_TOKENS] == list(range(NUM_SPECIAL))
    return tok


def build_tiny_tokenizer(path: Path, vocab_size: int = 512) -> Path:
    train_tiny_bpe([FIXTURE_TEXT] * 20, vocab_size).save(str(path))
    return path


def build_tiny_checkpoint(folder: Path, seed: int = 0, **sampler_overrides) -> Path:
    from dlm_ls.model.config import ModelConfig, SamplerConfig
    from dlm_ls.model.load import save_checkpoint
    from dlm_ls.model.network import DiffusionLM

    folder.mkdir(parents=True, exist_ok=True)
    tok_path = build_tiny_tokenizer(folder / "tokenizer.json")
    model = DiffusionLM(ModelConfig.preset("tiny")).init_weights(seed)
    save_checkpoint(model, folder, SamplerConfig().replace(**sampler_overrides), tokenizer_file=tok_path)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A checkpoint folder with a tiny random model and a real (tiny) BPE tokenizer."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(autouse=True)
def _private_runtime_dir(tmp_path, monkeypatch):
    # Worker sockets go in a per-test private directory, so tests never meet a user's worker.
    monkeypatch.setenv("DLM_LS_RUNTIME_DIR", str(tmp_path / "run"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
