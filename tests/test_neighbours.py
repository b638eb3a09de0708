"""Cross-file preambles in training examples: chunks of the same package, in the server's format."""

from __future__ import annotations

import json
import random

import pytest
import torch

from dlm_ls.lsp_server.extra_context import Chunk, format_chunk
from dlm_ls.model.train import examples as E
from dlm_ls.model.train.neighbours import NeighbourConfig, Neighbours

from conftest import train_tiny_bpe

PRICES = '''\
TAX_RATE = 0.2


def apply_discount(price, rate, floor=0):
    """Price after a discount, never below floor."""
    return max(floor, price * (1 - rate))


class Basket:
    def __init__(self):
        self.items = []
'''

ORDERS = '''\
from prices import apply_discount, Basket


def order_total(basket, rate):
    total = 0
    for price in basket.items:
        total += apply_discount(price, rate, floor=1)
    return total
'''

NOISE = '''\
import os


def list_files(root):
    return sorted(os.listdir(root))
'''

ELSEWHERE = '''\
def apply_discount(amount):
    return amount * 0.5
'''

FILES = [("shop", "prices.py", PRICES), ("shop", "orders.py", ORDERS), ("shop", "noise.py", NOISE),
         ("other", "discounts.py", ELSEWHERE)]
ORDERS_INDEX = 1


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "train.jsonl"
    with open(path, "w") as f:
        for pkg, name, text in FILES:
            f.write(json.dumps({"path": name, "package": pkg, "license": "MIT", "text": text}) + "\n")
    return E.Corpus(path)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_bpe([t for _, _, t in FILES] * 4, vocab_size=360)


CALL_LINE = "        total += apply_discount(price, rate, floor=1)"


def test_index_knows_each_packages_definitions(corpus):
    nb = Neighbours(corpus)
    assert nb.defined_in[("shop", "apply_discount")] == [0]
    assert nb.defined_in[("shop", "Basket")] == [0]
    assert nb.defined_in[("shop", "TAX_RATE")] == [0]
    assert nb.defined_in[("other", "apply_discount")] == [3]
    assert ("shop", "total") not in nb.defined_in  # an indented assignment is no definition


def test_preamble_holds_the_definition_in_the_servers_format(corpus):
    nb = Neighbours(corpus, NeighbourConfig(prob=1.0, max_distractors=0, chunk_lines=(3, 3)))
    text = nb.preamble(ORDERS_INDEX, CALL_LINE, random.Random(0))
    chunk = Chunk("file:///shop/prices.py", PRICES.split("\n", 6)[3] + "\n" + "\n".join(PRICES.split("\n")[4:6]), 1.0)
    assert text == format_chunk(chunk, "python", root="file:///shop")
    assert text.startswith("# Compare this snippet from prices.py:\n# def apply_discount(price, rate, floor=0):\n")
    assert all(line.startswith("#") for line in text.splitlines())  # comments: the prefix still parses


def test_chunks_come_from_the_same_package_only(corpus):
    nb = Neighbours(corpus, NeighbourConfig(prob=1.0, distractor_only_prob=1.0))
    seen = set()
    for seed in range(200):
        text = nb.preamble(ORDERS_INDEX, CALL_LINE, random.Random(seed))
        seen |= {line.split("from ", 1)[1] for line in text.splitlines() if line.startswith("# Compare")}
    assert seen == {"prices.py:", "noise.py:"}  # both the definition and a distractor occur
    alone = Neighbours(corpus, NeighbourConfig(prob=1.0, distractor_only_prob=1.0))
    assert alone.preamble(3, "    return amount * 0.5", random.Random(0)) == ""  # no sibling in "other"


def test_off_by_probability_and_for_lines_without_known_names(corpus):
    never = Neighbours(corpus, NeighbourConfig(prob=0.0))
    assert all(never.preamble(ORDERS_INDEX, CALL_LINE, random.Random(s)) == "" for s in range(20))
    quiet = Neighbours(corpus, NeighbourConfig(prob=1.0, distractor_only_prob=0.0))
    assert quiet.preamble(ORDERS_INDEX, "    return total", random.Random(0)) == ""


def test_examples_put_the_preamble_after_pre_and_whole_lines_after_it(corpus, tokenizer):
    nb = Neighbours(corpus, NeighbourConfig(prob=1.0, max_distractors=0))
    cfg = E.ExampleConfig(seq_len=400, batch_size=2, min_context=30)
    src = E.Source(ORDERS, index=ORDERS_INDEX)
    found = 0
    for seed in range(60):
        ex = E.make_example(src, tokenizer, random.Random(seed), cfg, kind="line", neighbours=nb)
        if ex is None:
            continue
        ctx = tokenizer.decode(ex.tokens[: ex.is_canvas.index(True)], skip_special_tokens=False)
        head = ctx.split("<|pre|>", 1)[1]
        if not head.startswith("# Compare"):
            continue
        found += 1
        assert head.startswith("# Compare this snippet from prices.py:\n# ")  # a definition the line uses
        after = "".join(line + "\n" for line in head.split("<|mid|>")[0].split("\n") if not line.startswith("#"))
        after = after[:-1]  # the prefix, with the preamble's comment lines removed
        assert after == "" or ORDERS.startswith(after) or ("\n" + after) in ORDERS  # starts at a line start
    assert found > 5


def test_batches_with_neighbours_are_still_a_function_of_the_step(corpus, tokenizer):
    cfg = E.ExampleConfig(seq_len=200, batch_size=2)
    a = E.Batches(corpus, tokenizer, cfg, seed=3, neighbours=Neighbours(corpus))
    b = E.Batches(corpus, tokenizer, cfg, seed=3, neighbours=Neighbours(corpus))
    for step in (0, 5):
        assert torch.equal(a.batch(step)["tokens"], b.batch(step)["tokens"])
