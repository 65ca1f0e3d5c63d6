"""DF-Prompt (Mo et al., "PAE", CVPR 2024): modifiers with a weight and a denoising-time range.

    a red horse on the grass, [anime:0-1:1.5], [detailed:0.85-1:1]

`[text:a-b:w]` gives `text` the weight `w` (> 0) while the noise level is within `a..b`, in PAE's
convention: 1 = the first (noisiest) step, 0 = the last, so `0.5-1` is the first half of the steps and
`0-0.5` the second half. Everything outside the blocks is ordinary prompt text and passes through
untouched, A1111-style `(word:1.2)` included. `\\[` and `\\]` are literal brackets; a backslash escapes
the character after it (the webui's rule), so every unescaped `[` opens a DF block.

This module is pure Python (no torch): the grammar (`parse`, `format_prompt`), the schedule (`schedule`:
PAE's step rule, merged into segments; `percent_schedule`: the ranges as fractions of sampling, for hosts
that switch by percent without knowing the step count) and the text renderers for hosts (`to_a1111`, `to_plain`). The
diffusers renderer is `render_diffusers`; the ComfyUI node is `nodes/dfprompt.py`.

    >>> segments = schedule("a horse, [anime:0-1:1.5], [detailed:0.5-1:1.25]", 20)
    >>> [(s.first_step, s.last_step, s.weighted_text()) for s in segments]
    [(0, 9, 'a horse, (anime:1.5), (detailed:1.25)'), (10, 19, 'a horse, (anime:1.5), ')]
    >>> to_a1111("a horse, [detailed:0.5-1:1.25]", 20)
    'a horse, [(detailed:1.25)::9]'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal

# PAE's policy chooses from these (DESIGN.md); the grammar accepts any range in [0, 1] and any w > 0.
PAE_RANGES = ((0.0, 0.5), (0.0, 1.0), (0.5, 1.0))
PAE_WEIGHTS = (0.5, 0.75, 1.0, 1.25, 1.5)
TARGETS = ("a1111", "plain")
# The most sampling steps a schedule is computed for (ComfyUI's KSampler allows 10000): beyond it a
# typo like 1000000000 would run for hours instead of failing.
MAX_STEPS = 10_000

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_RANGE = re.compile(rf"\s*({_NUMBER})\s*-\s*({_NUMBER})\s*")
_WEIGHT = re.compile(rf"\s*({_NUMBER})\s*")
_LOOKS_LIKE_BLOCK = re.compile(rf"\[[^\[\]]*:\s*{_NUMBER}\s*-\s*{_NUMBER}\s*:\s*{_NUMBER}\s*\]")
# Almost a block: a field that starts like a range (`0-`, `0.5 -`) as the second-last or last field,
# `[anime:0-1:abc]`, `[anime:0-1]`, `[anime:0-x:1]`. The webui's own syntax never has a field like that
# (its `when` is a plain number), so these are DF blocks with a mistake: errors, not the host's text.
_NEAR_BLOCK = re.compile(rf"\[[^\[\]]*:\s*{_NUMBER}\s*-\s*[^\[\]:\s]*\s*(?::[^\[\]:]*)?\]")


class DFPromptError(ValueError):
    """A DF-Prompt that does not parse. `column` is 1-based; the message shows the text around it."""

    def __init__(self, text: str, index: int, expected: str):
        self.text, self.column, self.expected = text, index + 1, expected
        start = max(0, index - 30)
        snippet = text[start:index + 30].replace("\n", " ")
        super().__init__(f"column {index + 1}: {expected}\n  {snippet}\n  {' ' * (index - start)}^")


@dataclass(frozen=True)
class Modifier:
    """One `[text:a-b:w]` block. `text` keeps its escapes (`\\[`), as written."""

    text: str
    start: float  # a: lowest noise level at which it acts (0 = last step)
    end: float  # b: highest noise level (1 = first step)
    weight: float

    def steps(self, num_steps: int) -> range:
        """0-based steps (0 = first, noisiest) where PAE applies it: N - int(b*N) <= i <= N - int(a*N) - 1."""
        n = num_steps
        return range(n - int(self.end * n), n - int(self.start * n))

    def format(self) -> str:
        return f"[{self.text}:{format_number(self.start)}-{format_number(self.end)}:{format_number(self.weight)}]"


Part = str | Modifier


@dataclass(frozen=True)
class DFPrompt:
    """A parsed DF-Prompt: plain text (escapes kept, verbatim) and modifiers, in order."""

    parts: tuple[Part, ...]

    @property
    def modifiers(self) -> tuple[Modifier, ...]:
        return tuple(p for p in self.parts if isinstance(p, Modifier))

    def format(self) -> str:
        return "".join(p if isinstance(p, str) else p.format() for p in self.parts)


class _SegmentText:
    """The text of a segment, shared by step and percent segments.

    `chunks` is the text split by weight: (text, weight) pairs with the escapes kept; plain text
    has weight 1.0, and adjacent chunks of equal weight are merged. Inactive modifiers are absent.
    """

    chunks: tuple[tuple[str, float], ...]

    @property
    def text(self) -> str:
        """The step's prompt without weights or escapes (what a plain text encoder reads)."""
        return "".join(unescape(t) for t, _ in self.chunks)

    @property
    def weighted(self) -> bool:
        return any(w != 1.0 for _, w in self.chunks)

    def weighted_text(self, style: str = "comfy") -> str:
        """The step's prompt in `(text:w)` attention syntax: `comfy` (escapes resolved) or `a1111` (kept)."""
        if style not in ("comfy", "a1111"):
            raise ValueError(f"style must be 'comfy' or 'a1111', got {style!r}")
        out = []
        for t, w in self.chunks:
            t = unescape(t) if style == "comfy" else t
            out.append(t if w == 1.0 else f"({t}:{format_number(w)})")
        return "".join(out)


@dataclass(frozen=True)
class Segment(_SegmentText):
    """Consecutive steps with the same active modifiers: what the model sees from first_step to last_step."""

    first_step: int  # 0-based, inclusive
    last_step: int  # inclusive
    chunks: tuple[tuple[str, float], ...]
    active: tuple[Modifier, ...]

    @property
    def num_steps(self) -> int:
        return self.last_step - self.first_step + 1

    def to_dict(self) -> dict:
        return {"first_step": self.first_step, "last_step": self.last_step, "text": self.text,
                "weighted_text": self.weighted_text("comfy"),
                "chunks": [[unescape(t), w] for t, w in self.chunks],
                "active": [m.format() for m in self.active]}


@dataclass(frozen=True)
class PercentSegment(_SegmentText):
    """A part of sampling with the same active modifiers, as fractions of sampling: 0 = its start (noise
    level 1), 1 = its end. A modifier with PAE range a-b is active from 1-b to 1-a."""

    start_percent: float
    end_percent: float
    chunks: tuple[tuple[str, float], ...]
    active: tuple[Modifier, ...]


def format_number(x: float) -> str:
    """Shortest plain decimal that reads back as the same float: 1.0 -> '1', 1e-05 -> '0.00001'."""
    s = format(Decimal(repr(float(x))), "f")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return s


def unescape(text: str) -> str:
    """Resolve our bracket escapes (`\\[`, `\\]`); other backslashes belong to the host and stay."""
    return re.sub(r"\\([\[\]])", r"\1", text)


def has_dfprompt(text: str) -> bool:
    """True when `text` holds something shaped like a DF block (`[x:a-b:w]`), or almost (`[x:0-1:abc]`,
    which `parse` reports as an error); cheap, for hosts to decide whether to parse."""
    return bool(_LOOKS_LIKE_BLOCK.search(text) or _NEAR_BLOCK.search(text))


def _is_df_block(text: str, start: int, stop: int) -> bool:
    return bool(_LOOKS_LIKE_BLOCK.fullmatch(text, start, stop) or _NEAR_BLOCK.fullmatch(text, start, stop))


def _unescaped(text: str, chars: str, start: int = 0, stop: int | None = None) -> list[int]:
    """Indices of `chars` in text[start:stop] that no backslash escapes."""
    stop = len(text) if stop is None else stop
    found, i = [], start
    while i < stop:
        if text[i] == "\\":
            i += 2
            continue
        if text[i] in chars:
            found.append(i)
        i += 1
    return found


def _strip_field(text: str) -> str:
    """Strip whitespace, but never the space an escaping backslash holds on to (`x\\ `)."""
    stripped = text.strip()
    trailing = len(stripped) - len(stripped.rstrip("\\"))
    if trailing % 2:  # ends in an escaping backslash: keep the character it escapes
        end = text.index(stripped) + len(stripped)
        stripped += text[end:end + 1]
    return stripped


def _parse_block(text: str, open_i: int, close_i: int) -> Modifier:
    colons = _unescaped(text, ":", open_i + 1, close_i)
    if len(colons) < 2:
        raise DFPromptError(text, close_i, "expected a block like [text:0.5-1:1.25] (text, range and weight, "
                                           "separated by ':')")
    c1, c2 = colons[-2], colons[-1]  # the text may hold colons of its own, as in (word:1.2)
    body = _strip_field(text[open_i + 1:c1])
    if not body:
        raise DFPromptError(text, open_i + 1, "expected modifier text before ':'")

    m = _RANGE.fullmatch(text, c1 + 1, c2)
    if m is None:
        at = c1 + 1 + (len(text[c1 + 1:c2]) - len(text[c1 + 1:c2].lstrip()))
        raise DFPromptError(text, at, "expected a range like 0.5-1")
    a, b = float(m.group(1)), float(m.group(2))
    for value, group in ((a, 1), (b, 2)):
        if value > 1.0:
            raise DFPromptError(text, m.start(group), f"expected a range within 0-1, got {m.group(group)}")
    if a > b:
        raise DFPromptError(text, m.start(1), f"expected a range with start <= end, got {m.group(1)}-"
                                              f"{m.group(2)} (write {m.group(2)}-{m.group(1)})")

    m = _WEIGHT.fullmatch(text, c2 + 1, close_i)
    if m is None:
        at = c2 + 1 + (len(text[c2 + 1:close_i]) - len(text[c2 + 1:close_i].lstrip()))
        raise DFPromptError(text, at, "expected a weight like 1.25 (a number > 0)")
    w = float(m.group(1))
    if w <= 0:
        raise DFPromptError(text, m.start(1), f"expected a weight > 0, got {m.group(1)}")
    return Modifier(body, a, b, w)


def parse(text: str, *, host_brackets: bool = False) -> DFPrompt:
    """Parse a DF-Prompt. Raises `DFPromptError` (a ValueError) naming the column and what was expected.

    Args:
        text: the prompt.
        host_brackets: leave every bracket that does not open a DF-shaped block (`[x:a-b:w]`) to the
            host, as plain text: the webui's own `[cat:dog:10]` or `[word]` then keep working beside DF
            blocks. DF-shaped blocks are still checked strictly (range within 0-1, start <= end, w > 0),
            and so are near-blocks whose range field starts like one (`[x:0-1:abc]`, `[x:0-1]`).
    """
    if not isinstance(text, str):
        raise ValueError(f"a DF-Prompt must be a string, got {type(text).__name__}")
    parts: list[Part] = []
    plain_from = i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "]" and not host_brackets:
            raise DFPromptError(text, i, "expected no ']' outside a block (write \\] for a literal bracket)")
        if ch == "[":
            inner = _unescaped(text, "[]", i + 1)
            if host_brackets and not (inner and text[inner[0]] == "]"
                                      and _is_df_block(text, i, inner[0] + 1)):
                i += 1  # the host's bracket
                continue
            if not inner:
                raise DFPromptError(text, i, "expected a ']' closing this block (write \\[ for a literal bracket)")
            if text[inner[0]] == "[":
                raise DFPromptError(text, inner[0], "expected ']' before another '[' (blocks do not nest)")
            if i > plain_from:
                parts.append(text[plain_from:i])
            parts.append(_parse_block(text, i, inner[0]))
            i = plain_from = inner[0] + 1
            continue
        i += 1
    if plain_from < len(text):
        parts.append(text[plain_from:])
    return DFPrompt(tuple(parts))


def format_prompt(prompt: DFPrompt | str) -> str:
    """The normalized text of a DF-Prompt: blocks as `[text:a-b:w]` with plain numbers, the rest verbatim."""
    return (parse(prompt) if isinstance(prompt, str) else prompt).format()


def _as_prompt(prompt: DFPrompt | str) -> DFPrompt:
    return parse(prompt) if isinstance(prompt, str) else prompt


def _check_steps(num_steps) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if num_steps > MAX_STEPS:
        raise ValueError(f"num_steps must be at most {MAX_STEPS} (a sampler's step count), got {num_steps}")
    return num_steps


def schedule(prompt: DFPrompt | str, num_steps: int) -> list[Segment]:
    """The segments of a DF-Prompt over `num_steps` steps: one per run of steps with the same active set."""
    prompt = _as_prompt(prompt)
    n = _check_steps(num_steps)
    spans = {m: m.steps(n) for m in prompt.modifiers}
    segments: list[Segment] = []
    for i in range(n):
        active = tuple(m for m in prompt.modifiers if i in spans[m])
        if segments and segments[-1].active == active:
            segments[-1] = Segment(segments[-1].first_step, i, segments[-1].chunks, active)
            continue
        segments.append(Segment(i, i, _chunks(prompt, active), active))
    return segments


def percent_schedule(prompt: DFPrompt | str) -> list[PercentSegment]:
    """The segments of a DF-Prompt as fractions of sampling, for hosts that switch prompts by percent and
    do not know the step count (ComfyUI's start_percent/end_percent). No step rounding: `schedule` is
    PAE's exact step rule, this is the ranges themselves (a-b -> from 1-b to 1-a)."""
    prompt = _as_prompt(prompt)
    # round(): 1 - 0.85 is 0.15000000000000002, and equal boundaries must meet.
    spans = {m: (round(1 - m.end, 12), round(1 - m.start, 12)) for m in prompt.modifiers}
    points = sorted({0.0, 1.0, *(p for span in spans.values() for p in span)})
    segments: list[PercentSegment] = []
    for lo, hi in zip(points, points[1:], strict=False):
        active = tuple(m for m in prompt.modifiers if spans[m][0] <= lo and hi <= spans[m][1])
        if segments and segments[-1].active == active:
            last = segments[-1]
            segments[-1] = PercentSegment(last.start_percent, hi, last.chunks, active)
            continue
        segments.append(PercentSegment(lo, hi, _chunks(prompt, active), active))
    return segments


# A removed block takes one separator with it: the ", " before it, or (at the start of the prompt, or after a
# space) the ", " or spaces after it, so that no ", , " or trailing ", " is left in the segment's text.
_SEPARATOR_BEFORE = re.compile(r"(?<!\\),\s*$")
_SEPARATOR_AFTER = re.compile(r"^\s*,?\s*")


def _chunks(prompt: DFPrompt, active: tuple[Modifier, ...]) -> tuple[tuple[str, float], ...]:
    kept: list[str | Modifier] = []
    strip_next = False
    for part in prompt.parts:
        if isinstance(part, Modifier) and part not in active:
            # removed from the text of this segment, not merely weighted to 0; and one of its separators
            if kept and isinstance(kept[-1], str) and _SEPARATOR_BEFORE.search(kept[-1]):
                kept[-1] = _SEPARATOR_BEFORE.sub("", kept[-1])
            else:
                strip_next = not kept or (isinstance(kept[-1], str) and (not kept[-1] or kept[-1][-1].isspace()))
            continue
        if isinstance(part, str) and strip_next:
            part = _SEPARATOR_AFTER.sub("", part, count=1)
        strip_next = False
        kept.append(part)
    if strip_next and kept and isinstance(kept[-1], str):  # the last block was removed after a space
        kept[-1] = kept[-1].rstrip()
    chunks: list[tuple[str, float]] = []
    for part in kept:
        t, w = (part, 1.0) if isinstance(part, str) else (part.text, part.weight)
        if chunks and chunks[-1][1] == w:
            chunks[-1] = (chunks[-1][0] + t, w)
        else:
            chunks.append((t, w))
    return tuple(chunks)


def step_texts(prompt: DFPrompt | str, num_steps: int, *, style: str = "a1111") -> list[str]:
    """The weighted prompt of every step, in order (for comparing with a host's own schedule)."""
    return [s.weighted_text(style) for s in schedule(prompt, num_steps) for _ in range(s.num_steps)]


def comfy_percent(step: int, num_steps: int) -> float:
    """ComfyUI's start/end percent for a switch before 0-based `step` of `num_steps`: i/N, up to half a step earlier.

    ComfyUI compares the sampler's sigma with the sigma at timestep (1-p)*999, so p = i/N itself can
    land exactly on a step (sgm_uniform, often simple) and make both neighbours active there. Moving it
    back by delta/N, with delta between (N-1-i)/999 and (N-i)/(N-1), puts it strictly between steps
    i-1 and i for the normal, simple and sgm_uniform schedulers of SD-style models (checked for N <= 150).
    """
    n = _check_steps(num_steps)
    if step <= 0:
        return 0.0
    if step >= n:
        return 1.0
    delta = ((n - 1 - step) / 999 + (n - step) / (n - 1)) / 2
    return (step - delta) / n


# How much earlier than the range says a percent-mode switch happens, as a fraction of sampling.
COMFY_SWITCH_EARLIER = 1e-4


def comfy_switch_percent(p: float) -> float:
    """ComfyUI's start/end percent for a percent-mode switch at fraction `p` of sampling.

    ComfyUI keeps an entry while end_sigma <= sigma <= start_sigma, both ends inclusive, so a step whose
    sigma falls exactly on the switch (p = i/N with the sgm_uniform scheduler, for example) would get both
    neighbouring entries. Moving the switch 0.0001 earlier gives such a step to the later segment alone,
    as PAE's step rule does. The shift is a hundredth of a step at 100 steps.
    """
    return p if p <= 0 or p >= 1 else p - COMFY_SWITCH_EARLIER


def _always_on(m: Modifier, num_steps: int | None) -> bool:
    return (m.start <= 0.0 and m.end >= 1.0) if num_steps is None else len(m.steps(num_steps)) == num_steps


def _a1111_modifier(m: Modifier, num_steps: int | None, first_pass_steps: int | None, before: str = "",
                    after: str = "") -> str:
    """`m` in prompt editing; `before`/`after` are the separator it takes with it while inactive (see _chunks)."""
    core = before + (m.text if m.weight == 1.0 else f"({m.text}:{format_number(m.weight)})") + after
    if num_steps is None:  # fractions of the webui's step count: one step off PAE's rule, see to_a1111
        if m.start == m.end:
            return ""
        shift = 0.0 if first_pass_steps is None else 1.0
        if m.end < 1.0:
            core = f"[{core}:{format_number(round(shift + 1.0 - m.end, 6))}]"
        if m.start > 0.0:
            core = f"[{core}::{format_number(round(shift + 1.0 - m.start, 6))}]"
        return core
    steps = m.steps(num_steps)
    if not steps:
        return ""
    shift = first_pass_steps or 0
    first, last = steps[0], steps[-1]
    if first > 0:  # the webui switches to the `after` part at steps > when
        core = f"[{core}:{first - 1 + shift}]"
    if last < num_steps - 1:  # and uses the `before` part while step <= when
        core = f"[{core}::{last + shift}]"
    return core


def to_a1111(prompt: DFPrompt | str, num_steps: int | None = None, *,
             first_pass_steps: int | None = None) -> str:
    """Render to the webui's own prompt editing and attention syntax, so its parser does the scheduling.

    Args:
        prompt: a DF-Prompt.
        num_steps: the sampling steps of the pass that uses this prompt. With it, integer steps are
            written and the webui's schedule equals PAE's exactly (the webui uses a prompt while
            0-based step <= end_at_step): `[(x:1.25)::9]` is "steps 0..9", `[(x:1.25):9]` "steps 10..".
            Without it, fractions of the step count are written (`[x::0.5]`), which the webui rounds
            one step differently from PAE.
        first_pass_steps: set when rendering a hires-fix prompt: the webui counts that pass's integer
            steps after the first pass's steps (and its fractions from 1.0), so they are shifted.

    One thing the webui cannot express: it never tells step 0 from step 1 (its schedule entries start
    at step 1), so when a range starts or ends between them step 0 gets step 1's prompt.
    """
    prompt = _as_prompt(prompt)
    if num_steps is not None:
        _check_steps(num_steps)
    # Each block that is sometimes off carries one separator inside its brackets, the one `_chunks` removes with
    # it, so the webui's own schedule leaves no ", , " either.
    parts = list(prompt.parts)
    separators: dict[int, tuple[str, str]] = {}
    for i, part in enumerate(parts):
        if isinstance(part, str) or _always_on(part, num_steps):
            continue
        previous = parts[i - 1] if i > 0 else None
        following = parts[i + 1] if i + 1 < len(parts) else None
        found = _SEPARATOR_BEFORE.search(previous) if isinstance(previous, str) else None
        if found:
            parts[i - 1] = previous[:found.start()]
            separators[i] = (found.group(), "")
        elif isinstance(following, str) and (previous is None or previous == "" or
                                             (isinstance(previous, str) and previous[-1].isspace())):
            taken = _SEPARATOR_AFTER.match(following).group()
            parts[i + 1] = following[len(taken):]
            separators[i] = ("", taken)
    return "".join(p if isinstance(p, str) else _a1111_modifier(p, num_steps, first_pass_steps, *separators.get(i, ("", "")))
                   for i, p in enumerate(parts))


def to_plain(prompt: DFPrompt | str) -> str:
    """Every modifier's text in place, without weights or ranges (what a host without DF-Prompt should see)."""
    prompt = _as_prompt(prompt)
    return unescape("".join(p if isinstance(p, str) else p.text for p in prompt.parts))


def to_text(prompt: DFPrompt | str, target: str = "a1111", num_steps: int | None = None) -> str:
    """`to_a1111` or `to_plain` by name (for nodes and the CLI)."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    return to_a1111(prompt, num_steps) if target == "a1111" else to_plain(prompt)
