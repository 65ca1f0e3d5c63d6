"""DF-Prompt policy (PAE, Mo et al. CVPR 2024): a prompt policy that also picks a weight and a time range
for every modifier it writes.

The policy is our causal LM plus two bias-free linear heads on its final hidden state: a weight head over
`PAE_WEIGHTS` (0.5 .. 1.5) and a range head over `PAE_RANGES` (0-0.5, 0-1, 0.5-1), PAE's classes in PAE's
order. Unlike PAE (one sample per BPE token, then the mode per modifier) there is **one decision per
modifier**: the heads are read at the hidden state of the step that emits the token closing the modifier
(its comma, or the eos after the last one), where the whole modifier text is known. The action of that step
is (token, weight, range), log-prob = token + weight + range.

What is a modifier: the response (the text after " Rephrase:") is split at commas; a piece that only repeats
the user's prompt (or one of its comma-separated parts) and an empty piece get no decision. The DF-Prompt
is the user's prompt verbatim, then the modifiers: plain text at weight 1.0 over 0-1, else `[text:a-b:w]`.

Files, next to the LM of a policy folder: `dfprompt_heads.safetensors` (`weight.weight` [5, d],
`range.weight` [3, d]) and `promptist_dfprompt.json` (format version and the classes).
This module never imports trainer or a host.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .dfprompt import PAE_RANGES, PAE_WEIGHTS, Modifier, format_prompt, parse

HEADS_FILE = "dfprompt_heads.safetensors"
CONFIG_FILE = "promptist_dfprompt.json"
FORMAT_VERSION = 1
DEFAULT_WEIGHT = PAE_WEIGHTS.index(1.0)  # 2
DEFAULT_RANGE = PAE_RANGES.index((0.0, 1.0))  # 1
HEAD_CHOICES = ("argmax", "sample")


def pae_prior(classes: int, default: int, sd: float = 0.5) -> list[float]:
    """PAE's stage-1 head targets in expectation: round(N(default, sd)) clipped to the classes, i.e. about
    68% on the default and 16% on each neighbour (PAE draws a fresh target per token and step instead)."""
    def cdf(x: float) -> float:
        return 0.5 * (1.0 + math.erf((x - default) / (sd * math.sqrt(2.0))))

    edges = [-math.inf] + [c + 0.5 for c in range(classes - 1)] + [math.inf]
    return [cdf(edges[c + 1]) - cdf(edges[c]) for c in range(classes)]


class DFHeads(nn.Module):
    """The weight and range heads: bias-free linear maps of the LM's final hidden state."""

    def __init__(self, width: int, weights: Sequence[float] = PAE_WEIGHTS,
                 ranges: Sequence[tuple[float, float]] = PAE_RANGES):
        super().__init__()
        self.weights = tuple(float(w) for w in weights)
        self.ranges = tuple((float(a), float(b)) for a, b in ranges)
        self.weight = nn.Linear(width, len(self.weights), bias=False)
        self.range = nn.Linear(width, len(self.ranges), bias=False)
        nn.init.normal_(self.weight.weight, std=0.02)  # GPT-2's init: near-uniform choices before stage 1
        nn.init.normal_(self.range.weight, std=0.02)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and range logits (fp32, on the heads' device) for hidden states [..., d]. The hidden states
        may live elsewhere: a host's memory manager moves the LM, not these small heads."""
        hidden = hidden.to(device=self.weight.weight.device, dtype=self.weight.weight.dtype)
        return self.weight(hidden).float(), self.range(hidden).float()

    def describe(self) -> dict:
        return {"format": FORMAT_VERSION, "weights": list(self.weights), "ranges": [list(r) for r in self.ranges],
                "default_weight": DEFAULT_WEIGHT, "default_range": DEFAULT_RANGE}


def has_heads(folder: Path | str) -> bool:
    return (Path(folder) / HEADS_FILE).is_file() and (Path(folder) / CONFIG_FILE).is_file()


def save_heads(heads: DFHeads, folder: Path | str) -> None:
    """Write the heads' tensors and description into a (policy) folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    save_file({k: v.detach().contiguous().cpu().float() for k, v in heads.state_dict().items()},
              str(folder / HEADS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(heads.describe(), indent=1) + "\n", encoding="utf-8")


def load_heads(folder: Path | str) -> DFHeads | None:
    """The heads saved in `folder`, or None when it is a plain policy. Refuses files it cannot read exactly."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not has_heads(folder):
        return None
    try:
        meta = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder / CONFIG_FILE} cannot be read: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{folder / CONFIG_FILE}: format {meta.get('format') if isinstance(meta, dict) else '?'}, "
                         f"this version reads {FORMAT_VERSION}")
    tensors = load_file(str(folder / HEADS_FILE))
    if set(tensors) != {"weight.weight", "range.weight"}:
        raise ValueError(f"{folder / HEADS_FILE} holds {sorted(tensors)}, expected weight.weight and range.weight")
    heads = DFHeads(tensors["weight.weight"].shape[1], meta["weights"], [tuple(r) for r in meta["ranges"]])
    heads.load_state_dict(tensors)  # strict: the shapes must match the classes the JSON names
    return heads


# --- modifiers and decisions ---------------------------------------------------------------------

@dataclass(frozen=True)
class Piece:
    """A comma-separated piece of a response. `end` is the index (in the response tokens) of the token
    that closes it, where its decision is taken; None for a piece with no decision (empty, or echoing
    the user's prompt)."""

    text: str
    end: int | None


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def split_response(source: str, tokens: Sequence[int], tokenizer) -> list[Piece]:
    """The pieces of a response (token ids ending with eos) and their decision positions.

    A piece closes at the token holding its comma, the last one at the eos; two pieces never share a
    position (a token holding two commas closes one decision)."""
    eos = tokenizer.eos_token_id
    tokens = list(tokens)
    if not tokens or tokens[-1] != eos:
        raise ValueError("a response must end with the eos token")
    body = tokens[:-1]
    texts = tokenizer.decode(body, skip_special_tokens=True).split(",")
    closes = [i for i, tok in enumerate(body) for _ in range(tokenizer.decode([tok]).count(","))]
    closes = closes[:len(texts) - 1] + [len(body)] * (len(texts) - len(closes))  # the rest close at the eos
    source_norm = _norm(source)
    echoes = {_norm(p) for p in source.split(",")}
    pieces, taken = [], set()
    for text, end in zip(texts, closes, strict=True):
        text = text.strip()
        n = _norm(text)
        if not n or n in echoes or n in source_norm or end in taken:
            pieces.append(Piece(text, None))
        else:
            taken.add(end)
            pieces.append(Piece(text, end))
    return pieces


def _escape(text: str) -> str:
    """Modifier text that the DF grammar reads back as itself: no backslashes, brackets escaped."""
    return text.replace("\\", "").replace("[", "\\[").replace("]", "\\]")


def compose(source: str, pieces: Sequence[Piece], choices: dict[int, tuple[int, int]],
            weights: Sequence[float] = PAE_WEIGHTS, ranges: Sequence[tuple[float, float]] = PAE_RANGES) -> str:
    """The DF-Prompt: `source` verbatim, then each decided piece as plain text (weight 1.0 over 0-1) or
    `[text:a-b:w]`. `choices` maps a piece's `end` to (weight class, range class). The result round-trips
    through `dfprompt.parse` / `format_prompt`; a source the grammar rejects gets its brackets escaped."""
    try:
        parse(source)
    except ValueError:
        source = _escape(source)
    parts = [source]
    for piece in pieces:
        if piece.end is None:
            continue
        text = _escape(piece.text)
        w, (a, b) = weights[choices[piece.end][0]], ranges[choices[piece.end][1]]
        parts.append(text if (w, a, b) == (1.0, 0.0, 1.0) else Modifier(text, a, b, w).format())
    out = ", ".join(p for p in parts if p)
    assert format_prompt(out) == out, out  # the grammar's contract, not user input
    return out


def choose(w_logits: torch.Tensor, r_logits: torch.Tensor, how: str = "argmax",
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Classes from head logits [N, C]: the most likely (inference default: reproducible, the policy's
    mode) or sampled (`sample`: the policy itself, as rollouts draw it)."""
    if how not in HEAD_CHOICES:
        raise ValueError(f"head choice must be one of {', '.join(HEAD_CHOICES)}; got {how!r}")
    if how == "argmax":
        return w_logits.argmax(-1), r_logits.argmax(-1)
    w = torch.multinomial(w_logits.float().softmax(-1).cpu(), 1, generator=generator).squeeze(-1)
    r = torch.multinomial(r_logits.float().softmax(-1).cpu(), 1, generator=generator).squeeze(-1)
    return w.to(w_logits.device), r.to(r_logits.device)
