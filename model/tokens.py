"""The special tokens of the infill layout, with ids fixed at the start of the vocabulary.

Fixed ids let the engine, the training loop and the tokenizer agree without reading
each other. This module knows nothing of torch or of text beyond the token strings.

Single hole (the cursor):

    <|suf|> suffix <|pre|> prefix <|mid|> | canvas: middle tokens, <|pad|> ... <|pad|>
    └──────── context: causal, cached ───┘   └── canvas: sees context + whole canvas ──┘

k holes (s_0 h_0 s_1 h_1 ... h_{k-1} s_k):

    <|suf|> s_k <|pre|> s_0 <|hole_0|> s_1 ... <|hole_{k-2}|> s_{k-1} <|mid|>
        | canvas_{k-1} <|hole_0|> canvas_0 ... <|hole_{k-2}|> canvas_{k-2}

The last hole always sits at the end of the context behind <|mid|>, so one hole is
just the k = 1 case. The other holes are named by a sentinel in the context and
again in front of their own canvas.
"""

ENDOFTEXT = "<|endoftext|>"
PAD = "<|pad|>"  # ends a middle: everything from the first pad on is not code
MASK = "<|mask|>"  # a canvas slot not yet decided
SUF = "<|suf|>"
PRE = "<|pre|>"
MID = "<|mid|>"
LINE = "<|line|>"  # reserved for the rest-of-line layout (DESIGN.md); unused by v1 models
MAX_HOLES = 8
HOLES = tuple(f"<|hole_{i}|>" for i in range(MAX_HOLES - 1))  # the k-th hole is <|mid|>

SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, PAD, MASK, SUF, PRE, MID, LINE, *HOLES)
SPECIAL_IDS: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}

ENDOFTEXT_ID = SPECIAL_IDS[ENDOFTEXT]
PAD_ID = SPECIAL_IDS[PAD]
MASK_ID = SPECIAL_IDS[MASK]
SUF_ID = SPECIAL_IDS[SUF]
PRE_ID = SPECIAL_IDS[PRE]
MID_ID = SPECIAL_IDS[MID]
LINE_ID = SPECIAL_IDS[LINE]
HOLE_IDS = tuple(SPECIAL_IDS[h] for h in HOLES)
NUM_SPECIAL = len(SPECIAL_TOKENS)
