"""Train exactly as you infer: the server's request and the training example builder give the model the
same token ids for one (file, cursor), with and without chunks of another file before the prefix."""

from __future__ import annotations

import pytest

from dlm_ls.lsp_server import documents as D
from dlm_ls.lsp_server.config import Settings
from dlm_ls.lsp_server.completion import completion_request, extra_context_preamble, plan_completion
from dlm_ls.model import prompt
from dlm_ls.model.train import examples as E

SOURCE = ("import math\n\n\ndef area(radius):\n    \"\"\"The area of a circle.\"\"\"\n    return math.pi * radius ** 2\n\n\n"
          "def describe(shape, radius):\n    size = \n    return f\"{shape}: {size:.2f}\"\n")
CURSOR = SOURCE.index("    size = ") + len("    size = ")  # the end of a line being written, code below it
OTHER = "def area(radius):\n    return 3.14159 * radius * radius\n\n\ndef perimeter(radius):\n    return 2 * 3.14 * radius\n"


@pytest.fixture(scope="module")
def infiller(tiny_model_dir):
    from dlm_ls.model.infill import Infiller

    return Infiller(tiny_model_dir, device="cpu")


def server_ids(infiller, offset: int, preamble: str) -> list[int]:
    """What `dlm-ls serve` sends for this cursor, turned into ids as the worker does."""
    doc = D.Document("file:///w/shapes.py", SOURCE, "python")
    plan = plan_completion(doc, offset, Settings(), preamble, prompt.prompt_chars(infiller.max_context_tokens))
    assert plan is not None
    request = completion_request(plan, "r1", doc.uri)
    return infiller.context_for(request.segments, request.preamble)


@pytest.mark.parametrize("with_preamble", [False, True])
def test_the_server_and_the_training_builder_give_the_same_ids(infiller, with_preamble):
    offset = CURSOR
    doc = D.Document("file:///w/shapes.py", SOURCE, "python")
    preamble = extra_context_preamble(doc, offset, {"file:///w/other.py": OTHER}, 600, "file:///w") \
        if with_preamble else ""
    assert bool(preamble) == with_preamble
    served = server_ids(infiller, offset, preamble)
    trained = E.hole_context(SOURCE, offset, offset, infiller.tokenizer, infiller.max_context_tokens, preamble)
    assert served == trained
    if with_preamble:
        assert served != server_ids(infiller, offset, "")  # the chunks are really there
