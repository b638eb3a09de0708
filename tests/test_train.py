"""Training examples and the training loop, on a tiny tokenizer, a tiny corpus and the tiny preset."""

from __future__ import annotations

import dataclasses
import inspect
import json
import random
import string
import textwrap

import pytest
import torch

from dlm_ls.model import layout, load
from dlm_ls.model import tokens as T
from dlm_ls.model.config import ModelConfig
from dlm_ls.model.network import DiffusionLM
from dlm_ls.model.train import examples as E
from dlm_ls.model.train import loop

from conftest import train_tiny_bpe

@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: one thread is fastest, and spinning OpenMP workers crawl on a shared, busy CPU.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


UNICODE_SNIPPET = '''\
def grüße(name: str) -> str:
    """Sagt Grüß Gott — 日本語も."""
    text = f"Grüß dich, {name}! ✓"
    return text.upper()


class Café:
    prix = {"thé": 2.5, "café": 1.8}

    def total(self, items):
        return sum(self.prix[i] for i in items if i in self.prix)
'''


def _sources() -> list[str]:
    return [inspect.getsource(m) for m in (json.decoder, textwrap, string)] + [UNICODE_SNIPPET * 3]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_bpe(_sources(), vocab_size=400)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("corpus")
    srcs = _sources()
    for split, texts in (("train", srcs), ("validation", srcs[1:3])):
        with open(d / f"{split}.jsonl", "w") as f:
            for i, text in enumerate(texts):
                f.write(json.dumps({"path": f"f{i}.py", "package": "p", "license": "MIT", "text": text}) + "\n")
    tokenizer.save(str(d / "tokenizer.json"))
    return d


CFG = E.ExampleConfig(seq_len=160, batch_size=2)


def _dec(tok, ids):
    # truncation may cut a multi-byte character: its partial bytes decode to U+FFFD at the cut
    return tok.decode(ids, skip_special_tokens=False).strip("\ufffd")


def _split_single(ex: E.Example):
    """Context pieces of a single-hole example: suffix, prefix, committed, canvas truth."""
    n = ex.is_canvas.index(True)
    ctx = ex.tokens[:n]
    assert ctx[0] == T.SUF_ID and ctx.count(T.PRE_ID) == 1
    mid = n - ex.committed - 1
    assert ctx[mid] == T.MID_ID
    pre = ctx.index(T.PRE_ID)
    return ctx[1:pre], ctx[pre + 1: mid], ctx[mid + 1:], ex.targets[n:]


@pytest.mark.parametrize("kind", ["line", "lines", "node", "span"])
def test_single_hole_examples_follow_the_layout_and_block_rule(tokenizer, kind):
    texts = _sources()
    seen_pad = seen_no_pad = 0
    for seed in range(60):
        rng = random.Random(seed)
        text = texts[seed % len(texts)]
        ex = E.make_example(text, tokenizer, rng, CFG, kind=kind)
        if ex is None:
            continue
        assert len(ex) <= CFG.seq_len
        n = ex.is_canvas.index(True)
        assert all(ex.is_canvas[n:]) and not any(ex.is_canvas[:n])  # the canvas is one block at the end
        c = ex.canvas_lengths[0]
        assert len(ex) - n == c and c in CFG.canvas_buckets
        suffix, prefix, committed, truth = _split_single(ex)
        s, e = ex.holes[0]
        if kind == "line":
            assert "\n" not in text[s:e] and text[e:e + 1] in ("\n", "")
        m = tokenizer.encode(text[s:e], add_special_tokens=False).ids  # the middle, tokenized on its own
        assert committed == m[: ex.committed] and ex.committed % c == 0
        k = ex.committed // c
        block = m[k * c: (k + 1) * c]
        assert truth == block + [T.PAD_ID] * (c - len(block))
        # a canvas has a PAD iff the middle ends in it
        assert (T.PAD_ID in truth) == (len(m) - k * c < c)
        seen_pad += T.PAD_ID in truth
        seen_no_pad += T.PAD_ID not in truth
        # the canvas shows only MASK or its own true token: never context text
        for tok, tg, mk in zip(ex.tokens[n:], truth, ex.masked[n:]):
            assert tok == (T.MASK_ID if mk else tg)
        assert any(ex.masked[n:]) and not any(ex.masked[:n])
        assert text[:s].endswith(_dec(tokenizer, prefix))
        assert text[e:].startswith(_dec(tokenizer, suffix))
    assert seen_pad > 5
    if kind != "line":
        assert seen_no_pad > 0  # long middles are written block by block


def test_prefix_can_end_mid_word(tokenizer):
    text = _sources()[1]
    mid_word = 0
    for seed in range(200):
        ex = E.make_example(text, tokenizer, random.Random(seed), CFG, kind="span")
        if ex is None:
            continue
        s, e = ex.holes[0]
        _, prefix, _, _ = _split_single(ex)
        if text[s - 1].isalnum() and text[s].isalnum():
            mid_word += 1
            assert text[:s].endswith(_dec(tokenizer, prefix))  # the cut word's head is the prefix's end
    assert mid_word >= 5


def test_node_spans_convert_byte_offsets_on_non_ascii_text():
    src = E.Source(UNICODE_SNIPPET * 3)
    assert not src.ascii
    rng = random.Random(0)
    starts = {}
    cursor = src.tree().walk()
    stack = [src.tree().root_node]
    while stack:
        node = stack.pop()
        starts[(node.start_byte, node.end_byte)] = node.type
        stack.extend(node.children)
    found = 0
    for _ in range(200):
        span = E.span_node(src, rng, CFG)
        if span is None:
            continue
        s, e = span
        key = (src.char_to_byte(s), src.char_to_byte(e))
        assert key in starts and starts[key] in E.NODE_TYPES
        assert src.data[key[0]: key[1]].decode() == src.text[s:e]
        found += 1
    assert found > 50
    del cursor


def test_multi_hole_examples_put_sentinels_where_layout_says(tokenizer):
    seen = 0
    for seed in range(200):
        text = _sources()[seed % 4]
        ex = E.make_example(text, tokenizer, random.Random(seed), CFG, kind="multi")
        if ex is None:
            continue
        seen += 1
        k = len(ex.holes)
        assert 2 <= k <= 3 and ex.committed == 0
        n = ex.is_canvas.index(True)
        middles = [tokenizer.encode(text[s:e], add_special_tokens=False).ids for s, e in ex.holes]
        assert ex.canvas_lengths == [min(b for b in (8, 16, 32) if b > len(m)) for m in middles]
        region, starts = layout.canvas_region(ex.canvas_lengths)
        canvas = ex.tokens[n:]
        assert len(canvas) == len(region)
        for i, (tok, reg) in enumerate(zip(canvas, region)):
            if reg != T.MASK_ID:  # a sentinel: fixed input, never masked, no loss
                assert tok == reg and ex.targets[n + i] == -1 and not ex.masked[n + i]
        for m, c, st in zip(middles, ex.canvas_lengths, starts):
            assert ex.targets[n + st: n + st + c] == m + [T.PAD_ID] * (c - len(m))
        ctx = ex.tokens[:n]
        assert ctx[0] == T.SUF_ID and ctx[-1] == T.MID_ID
        assert [t for t in ctx if t in T.HOLE_IDS] == list(T.HOLE_IDS[: k - 1])
        # the segments between holes are tokenized on their own, exactly as the server cuts them
        segs = [tokenizer.encode(text[ex.holes[i][1]: ex.holes[i + 1][0]], add_special_tokens=False).ids
                for i in range(k - 1)]
        pre = ctx.index(T.PRE_ID)
        prefix = ctx[pre + 1: ctx.index(T.HOLE_IDS[0])]
        assert ctx == layout.multi_hole_context([prefix, *segs, ctx[1:pre]])
    assert seen >= 10


def test_packed_rows_never_attend_across_examples(tokenizer):
    keep: list[E.Example] = []
    b = E.build_batch(_sources(), tokenizer, random.Random(3), CFG, keep=keep)
    B, L = b["tokens"].shape
    assert (B, L) == (CFG.batch_size, CFG.seq_len)
    ex = b["example"]
    cross = ex[:, :, None] != ex[:, None, :]
    assert not (b["mask"][:, 0] & cross).any()
    assert b["mask"][:, 0].diagonal(dim1=1, dim2=2).all()  # every query sees itself: no empty softmax row
    for r in range(B):
        for e in ex[r].unique().tolist():
            sel = ex[r] == e
            assert b["positions"][r][sel].tolist() == list(range(int(sel.sum())))  # restart at 0
            if e == E.DUMMY_EXAMPLE:
                assert (b["targets"][r][sel] < 0).all() and (b["ctx_targets"][r][sel] < 0).all()
    assert ((b["targets"] >= 0) <= b["is_canvas"]).all()
    assert (b["tokens"][b["targets"] >= 0] == T.MASK_ID).all()
    assert int(b["n_examples"]) == len(keep)


def test_batches_are_a_function_of_the_step(tokenizer, corpus_dir):
    a = E.Batches(E.Corpus(corpus_dir / "train.jsonl"), tokenizer, CFG, seed=7)
    b = E.Batches(E.Corpus(corpus_dir / "train.jsonl"), tokenizer, CFG, seed=7)
    x, y = a.batch(5), b.batch(5)
    assert all(torch.equal(x[k], y[k]) for k in x)
    assert not torch.equal(a.batch(6)["tokens"], x["tokens"])


def _tiny_model():
    return DiffusionLM(ModelConfig.preset("tiny")).init_weights(0)


def test_hidden_states_match_forward(tokenizer):
    model = _tiny_model()
    b = E.build_batch(_sources(), tokenizer, random.Random(0), CFG)
    logits, _ = model(b["tokens"], b["positions"], b["mask"])
    h = loop.hidden_states(model, b["tokens"], b["positions"], b["mask"])
    torch.testing.assert_close(model.lm_head(h), logits)


def test_training_steps_lower_the_loss_on_a_fixed_batch(tokenizer):
    torch.manual_seed(0)
    model = _tiny_model()
    cfg = loop.TrainConfig(lr=3e-3, warmup=1)
    opt = loop.make_optimizer(model, cfg)
    b = E.build_batch(_sources(), tokenizer, random.Random(1), CFG)
    losses = []
    for _ in range(8):
        out = loop.compute_losses(model, b, cfg)
        losses.append(float(out["loss"].detach()))
        assert set(out) >= {"canvas_loss", "ctx_loss", "elbo"}
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert losses[-1] < losses[0] - 0.1


def _run_cfg(corpus_dir, out, **kw):
    base = dict(preset="tiny", corpus=str(corpus_dir), tokenizer=str(corpus_dir / "tokenizer.json"), out=str(out),
                seq_len=CFG.seq_len, batch_size=2, warmup=2, threads=1, eval_every=2, eval_batches=1, checkpoint_minutes=0,
                log_every=1)
    return loop.TrainConfig(**{**base, **kw})


def _losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "final" not in r and "event" not in r}


def test_resume_gives_the_same_next_step_loss(tokenizer, corpus_dir, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    loop.train(_run_cfg(corpus_dir, straight, steps=4), tokenizer, progress=False)
    loop.train(_run_cfg(corpus_dir, split, steps=2), tokenizer, progress=False)
    loop.train(_run_cfg(corpus_dir, split, steps=4, resume=str(split)), tokenizer, progress=False)
    a, b = _losses(straight), _losses(split)
    assert abs(a[3] - b[3]) <= 1e-6 and abs(a[4] - b[4]) <= 1e-6
    # latest/ is an engine-loadable checkpoint folder, train_state.pt holds only tensors and primitives
    state = torch.load(split / "latest" / "train_state.pt", weights_only=True)
    assert state["step"] == 4 and state["config"]["resume"] == str(split)
    model = load.load_model(split / "latest", device="cpu")
    assert model.config.vocab_size == ModelConfig.preset("tiny").vocab_size
    assert model.config.trained_context == CFG.seq_len  # the Infiller keeps its context budget inside it
    assert (split / "latest" / "tokenizer.json").exists()


def test_loader_workers_give_the_same_run(tokenizer, corpus_dir, tmp_path):
    here, workers = tmp_path / "here", tmp_path / "workers"
    loop.train(_run_cfg(corpus_dir, here, steps=3, eval_batches=0), tokenizer, progress=False)
    loop.train(_run_cfg(corpus_dir, workers, steps=3, eval_batches=0, loader_workers=2), tokenizer, progress=False)
    assert _losses(here) == _losses(workers)  # same batches in the same order: the data position is the step


def test_step_batches_arrive_in_step_order_from_several_workers(tokenizer, corpus_dir):
    import functools

    make = functools.partial(E.Batches, E.Corpus(corpus_dir / "train.jsonl"), tokenizer, CFG, 5)
    loader = torch.utils.data.DataLoader(E.StepBatches(make, first_step=3, last_step=9), batch_size=None,
                                         num_workers=2)
    got = list(loader)
    assert [s for s, _ in got] == list(range(3, 9))
    direct = make()
    for step, batch in got:
        assert torch.equal(batch["tokens"], direct.batch(step)["tokens"])


def test_init_from_starts_a_fresh_run_from_weights(tokenizer, corpus_dir, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    loop.train(_run_cfg(corpus_dir, first, steps=2, eval_batches=0), tokenizer, progress=False)
    rec = loop.train(_run_cfg(corpus_dir, second, steps=1, eval_batches=0, init_from=str(first / "latest")),
                     tokenizer, progress=False)
    assert rec["step"] == 1
    state = torch.load(second / "latest" / "train_state.pt", weights_only=True)
    assert state["step"] == 1


def test_ship_writes_a_bf16_folder_whose_card_tells_every_stage(tokenizer, corpus_dir, tmp_path):
    from dlm_ls.model.train import ship

    first, second, out = tmp_path / "a", tmp_path / "b", tmp_path / "shipped"
    loop.train(_run_cfg(corpus_dir, first, steps=2, eval_batches=0), tokenizer, progress=False)
    loop.train(_run_cfg(corpus_dir, second, steps=1, eval_batches=0, init_from=str(first / "latest")),
               tokenizer, progress=False)
    assert ship.main(["--run", str(second), "--out", str(out), "--manifest", str(tmp_path / "none.json"),
                      "--note", "A test model."]) == 0
    model = load.load_model(out, device="cpu")
    assert model.config.trained_context == CFG.seq_len
    assert {p.name for p in out.iterdir()} >= {"config.json", "sampler.json", "tokenizer.json", "DATA_CARD.md"}
    card = (out / "DATA_CARD.md").read_text()
    assert "A test model." in card and "started from the weights of earlier runs" in card
    assert "2 steps" in card and "In all:" in card  # the first stage, then the totals
    stored = load.read_weights(out)
    assert all(t.dtype == torch.bfloat16 for t in stored.values() if t.is_floating_point())


def test_cli_parses_every_config_field():
    cfg = loop.parse_args(["--preset", "tiny", "--steps", "3", "--loss", "elbo", "--compile", "--lr", "1e-4"])
    assert (cfg.preset, cfg.steps, cfg.loss, cfg.compile, cfg.lr) == ("tiny", 3, "elbo", "on", 1e-4)
    assert dataclasses.asdict(loop.parse_args([])) == dataclasses.asdict(loop.TrainConfig())


def test_lr_warms_up_then_decays_to_its_floor():
    cfg = loop.TrainConfig(lr=1e-3, warmup=10, min_lr_frac=0.1)
    lrs = [loop.lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert loop.lr_at(100, 100, cfg) == pytest.approx(1e-4)


def test_elbo_loss_weights_masked_slots_by_one_over_t(tokenizer):
    model = _tiny_model()
    b = E.build_batch(_sources(), tokenizer, random.Random(2), CFG)
    with torch.no_grad():
        mean = loop.compute_losses(model, b, loop.TrainConfig(loss="mean", ctx_loss_weight=0))
        elbo = loop.compute_losses(model, b, loop.TrainConfig(loss="elbo", ctx_loss_weight=0))
    assert float(mean["loss"]) == pytest.approx(float(mean["canvas_loss"]))
    assert float(elbo["loss"]) == pytest.approx(float(elbo["elbo"]))
    # weights sum, per example, to (masked slots) / (t * slots): about 1 on average, never 0
    sel = b["targets"] >= 0
    per_example = torch.zeros(int(b["example"][sel].max()) + 1).index_add_(0, b["example"][sel], b["weights"][sel])
    assert (per_example[per_example > 0] > 0).all() and int((per_example > 0).sum()) == int(b["n_examples"])


def test_pad_weight_tilts_the_mean_loss_toward_real_tokens(tokenizer):
    model = _tiny_model()
    b = E.build_batch(_sources(), tokenizer, random.Random(2), CFG)
    sel = b["targets"] >= 0
    is_pad = b["targets"][sel] == T.PAD_ID
    assert is_pad.any() and (~is_pad).any()
    with torch.no_grad():
        plain = loop.compute_losses(model, b, loop.TrainConfig(ctx_loss_weight=0))
        no_pad = loop.compute_losses(model, b, loop.TrainConfig(ctx_loss_weight=0, pad_weight=0.0))
        h = model.hidden(b["tokens"], b["positions"], b["mask"])[0]
        ce = torch.nn.functional.cross_entropy(model.lm_head(h[sel]).float(), b["targets"][sel], reduction="none")
    assert float(no_pad["loss"]) == pytest.approx(float(ce[~is_pad].mean()), rel=1e-5)  # PAD slots count for nothing
    assert float(no_pad["canvas_loss"]) == pytest.approx(float(plain["canvas_loss"]))  # the logged mean is unchanged


def test_sigterm_ends_a_run_after_its_step_with_a_checkpoint(corpus_dir, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dlm_ls.model.train.loop", "--preset", "tiny", "--corpus", str(corpus_dir),
           "--tokenizer", str(corpus_dir / "tokenizer.json"), "--out", str(out), "--seq-len", str(CFG.seq_len),
           "--batch-size", "2", "--steps", "100000", "--threads", "1", "--eval-batches", "1", "--log-every", "1",
           "--checkpoint-minutes", "0", "--compile", "off"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        def steps_logged() -> int:  # complete lines only: the run is still writing the file
            text = (out / "log.jsonl").read_text() if (out / "log.jsonl").exists() else ""
            return sum('"loss"' in line for line in text.split("\n")[:-1])

        while steps_logged() < 3:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr and proc.stderr.read()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    last = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert last["final"] and last["stopped_by"] == "SIGTERM"
    state = torch.load(out / "latest" / "train_state.pt", weights_only=True)
    assert state["step"] == last["step"] >= 3  # the checkpoint holds every step that ran: resume loses nothing


def test_a_stage_started_from_a_shipped_folder_keeps_the_whole_chain_on_its_card(tokenizer, corpus_dir, tmp_path):
    from dlm_ls.model.train import ship

    first, shipped, third = tmp_path / "a", tmp_path / "shipped", tmp_path / "c"
    loop.train(_run_cfg(corpus_dir, first, steps=2, eval_batches=0), tokenizer, progress=False)
    ship.main(["--run", str(first), "--out", str(shipped), "--manifest", str(tmp_path / "none.json")])
    # the runs' folders may be gone by the next stage: the shipped folder carries its own chain
    loop.train(_run_cfg(corpus_dir, third, steps=1, eval_batches=0, init_from=str(shipped)), tokenizer, progress=False)
    loop.train(_run_cfg(corpus_dir, third, steps=3, eval_batches=0, resume=str(third)), tokenizer, progress=False)
    import shutil

    shutil.rmtree(first)
    for _ in range(2):  # shipped over the folder it started from, twice (once more with the eval, say)
        ship.main(["--run", str(third), "--out", str(shipped), "--manifest", str(tmp_path / "none.json")])
    final = shipped
    chain = json.loads((final / ship.STAGES_FILE).read_text())
    assert [s["run"] for s in chain] == [str(first), str(third)] and [s["steps"] for s in chain] == [2, 3]
    assert chain[1]["tokens"] == 3 * 2 * CFG.seq_len
    card = (final / "DATA_CARD.md").read_text()
    assert "trained in 2 stages" in card and "Resumed at step 1:" in card and "(its log is not here)" not in card


def test_reshipping_a_chain_through_a_run_lists_each_run_once(tokenizer, corpus_dir, tmp_path):
    """shipped -> run b -> run c, c shipped over `shipped` twice: the second ship reads the first's
    stages file (which lists b and c already) at the chain's root, and must not list b again."""
    from dlm_ls.model.train import ship

    a, shipped, b, c = tmp_path / "a", tmp_path / "shipped", tmp_path / "b", tmp_path / "c"
    none = ["--manifest", str(tmp_path / "none.json")]
    loop.train(_run_cfg(corpus_dir, a, steps=1, eval_batches=0), tokenizer, progress=False)
    ship.main(["--run", str(a), "--out", str(shipped), *none])
    loop.train(_run_cfg(corpus_dir, b, steps=2, eval_batches=0, init_from=str(shipped)), tokenizer, progress=False)
    loop.train(_run_cfg(corpus_dir, c, steps=1, eval_batches=0, init_from=str(b / "latest")), tokenizer, progress=False)
    for _ in range(2):
        ship.main(["--run", str(c), "--out", str(shipped), *none])
    chain = json.loads((shipped / ship.STAGES_FILE).read_text())
    assert [s["run"] for s in chain] == [str(a), str(b), str(c)] and [s["steps"] for s in chain] == [1, 2, 1]


def test_resume_keeps_the_runs_own_seed_so_its_data_order_goes_on(tokenizer, corpus_dir, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    loop.train(_run_cfg(corpus_dir, straight, steps=4, seed=3), tokenizer, progress=False)
    loop.train(_run_cfg(corpus_dir, split, steps=2, seed=3), tokenizer, progress=False)
    loop.train(_run_cfg(corpus_dir, split, steps=4, resume=str(split)), tokenizer, progress=False)  # no --seed given
    a, b = _losses(straight), _losses(split)
    assert abs(a[4] - b[4]) <= 1e-6
