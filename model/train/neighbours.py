"""Cross-file context for training: chunks of other files of the same package, shown as the server shows them.

At a cursor the language server prepends chunks of other open documents to the prefix, as comment
lines ("# Compare this snippet from utils.py:"; `lsp_server/extra_context.py`). A model that never
saw such a preamble in training has no reason to read it. This module makes the same preamble for a
training example: when a name on the example's middle line is defined (def / class / top-level
assignment) in another file of the same package, a chunk starting at that definition; beside it, or
alone, distractor chunks from other files, so that the model also learns to ignore what does not help.

It knows the corpus (files with their package and path), the Python definition syntax as a regular
expression and the chunk format (model/prompt.py, which the server uses too). It does not know tokens, the layout or the network:
`examples.py` decides where the preamble goes and how many tokens it may take.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from ..prompt import EXTRA_CONTEXT_CHARS, Chunk, format_chunk

# def NAME / class NAME (any indentation), or NAME = / NAME: T = at the start of a line
_DEFINES = re.compile(r"^[ \t]*(?:async[ \t]+)?(?:def|class)[ \t]+([A-Za-z_]\w*)|^([A-Za-z_]\w*)[ \t]*(?::[^=\n]*)?=(?!=)",
                      re.M)
_IDENT = re.compile(r"[A-Za-z_]\w{2,}")  # names of 3+ characters: shorter ones match everywhere


@dataclass(frozen=True)
class NeighbourConfig:
    prob: float = 0.4  # share of single-hole examples that try for a preamble
    distractor_only_prob: float = 0.3  # when no neighbour defines a name on the line: distractors alone, this often
    max_distractors: int = 2
    chunk_lines: tuple[int, int] = (2, 12)  # lines per chunk, drawn uniformly
    max_chars: int = EXTRA_CONTEXT_CHARS  # the server's default extra_context_chars
    max_share: float = 0.5  # the preamble takes at most this share of the example's context budget


class Neighbours:
    """Per package: its files, and which file defines which name. Built by one pass over a corpus split."""

    def __init__(self, corpus, cfg: NeighbourConfig = NeighbourConfig()):
        self.corpus, self.cfg = corpus, cfg
        self.package: list[str] = []
        self.path: list[str] = []
        self.files_of: dict[str, list[int]] = {}
        self.defined_in: dict[tuple[str, str], list[int]] = {}
        for i in range(len(corpus)):
            record = corpus.record(i)
            pkg = record.get("package") or ""
            self.package.append(pkg)
            self.path.append(record.get("path") or f"file_{i}.py")
            self.files_of.setdefault(pkg, []).append(i)
            for name in {a or b for a, b in _DEFINES.findall(record["text"])}:
                self.defined_in.setdefault((pkg, name), []).append(i)

    def preamble(self, index: int, line_text: str, rng: random.Random) -> str:
        """Chunks for an example cut from file `index` whose middle lies on `line_text`; "" for none."""
        cfg = self.cfg
        if rng.random() >= cfg.prob:
            return ""
        pkg = self.package[index]
        siblings = [f for f in self.files_of.get(pkg, ()) if f != index]
        if not siblings:
            return ""
        names = sorted(set(_IDENT.findall(line_text)))
        # a name first, then one of the files defining it: a rare name is as likely as `forward`
        found = {n: fs for n in names if (fs := [f for f in self.defined_in.get((pkg, n), ()) if f != index])}
        chunks: list[Chunk] = []
        if found:
            name = rng.choice(sorted(found))
            chunk = self._chunk_at_definition(rng.choice(found[name]), name, rng)
            if chunk is not None:
                chunks.append(chunk)
        if not chunks and (cfg.max_distractors == 0 or rng.random() >= cfg.distractor_only_prob):
            return ""
        for _ in range(rng.randint(0 if chunks else 1, cfg.max_distractors)):
            chunk = self._random_chunk(rng.choice(siblings), rng)
            if chunk is not None:
                chunks.append(chunk)
        rng.shuffle(chunks)  # the server ranks the best first; position must not be the only clue
        out = ""
        for chunk in chunks:  # paths shown relative to the package, as the server shows workspace paths
            text = format_chunk(chunk, "#", root=f"file:///{pkg}")
            if len(out) + len(text) > cfg.max_chars:
                continue
            out += text
        return out

    def _uri(self, f: int) -> str:
        return f"file:///{self.package[f]}/{self.path[f]}"

    def _lines_from(self, text: str, start: int, rng: random.Random) -> str:
        lines = text[start:].split("\n", self.cfg.chunk_lines[1])[: rng.randint(*self.cfg.chunk_lines)]
        return "\n".join(lines).rstrip()

    def _chunk_at_definition(self, f: int, name: str, rng: random.Random) -> Chunk | None:
        text = self.corpus.text(f)
        for m in _DEFINES.finditer(text):
            if name in (m.group(1), m.group(2)):
                start = text.rfind("\n", 0, m.start() + 1) + 1
                body = self._lines_from(text, start, rng)
                return Chunk(self._uri(f), body, 1.0) if body.strip() else None
        return None

    def _random_chunk(self, f: int, rng: random.Random) -> Chunk | None:
        text = self.corpus.text(f)
        starts = [m.start() for m in _DEFINES.finditer(text)]
        if not starts:
            return None
        start = text.rfind("\n", 0, rng.choice(starts) + 1) + 1
        body = self._lines_from(text, start, rng)
        return Chunk(self._uri(f), body, 0.0) if body.strip() else None

