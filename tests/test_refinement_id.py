"""`dlm/refinement` carries the JSON-RPC id of its request exactly as the client sent it.

Editors draw the refinement as it settles and must drop the steps of a request they have since
cancelled; they know their requests by the id they sent (a number in VS Code and Neovim, any
string in other clients), not by a name the server makes up. Real `dlm-ls serve` over stdio.
"""

from __future__ import annotations

import asyncio

import pytest
from lsprotocol import types as lsp
from test_lsp_e2e import SLOW, SOURCE, session, stop_workers, utf16_position

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

SHORT = {**SLOW, "canvasLengths": [8], "maxTokens": 8, "blockSize": 8, "maxSteps": 8}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    yield run
    stop_workers(run)


@pytest.mark.parametrize("sent", [7001, "editor-7002"], ids=["number", "string"])
async def test_each_refinement_step_names_the_request_as_sent(tiny_model_dir, run_dir, sent):
    async with session(tiny_model_dir, run_dir, SHORT) as s:
        uri = f"file:///w/refine_{sent}.py"
        s.open(uri, SOURCE)
        result = await asyncio.wait_for(s.inline(uri, utf16_position(SOURCE, len(SOURCE) - 1), msg_id=sent), 60)
        assert len(result.items) == 1
        steps = [r for r in s.refinements if r["uri"] == uri]
        assert steps, "no dlm/refinement step was sent"
        assert {type(r["id"]) for r in steps} == {type(sent)} and {r["id"] for r in steps} == {sent}
        assert [r["step"] for r in steps] == sorted(r["step"] for r in steps)
