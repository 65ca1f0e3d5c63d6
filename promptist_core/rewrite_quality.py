"""Is a rewrite one a user would keep? The checks a person makes reading it, as numbers.

A policy is judged on prompts it never saw by what its output reads like, not by its loss:
- kept: every content word of the user's prompt is in the rewrite (the subject survives);
- added: how many comma-separated modifiers the rewrite adds (at least two to count as engineered);
- clean: no modifier twice, no word three times in a row, no control characters;
- fits: at most 77 CLIP tokens with start and end, as Stable Diffusion's text encoder counts them;
- specific: the added modifiers are not the one set the policy writes most often (a fixed tail scores 0);
- real: the added words are words of the corpus (no broken subwords like "HORORORO").
`bench/policy_quality.py` prints them for the bundled policy; `tests/test_bundled_policy.py` asserts them.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .clip_tokens import CLIP_CONTEXT, count_clip_tokens

WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
# Words that carry no subject: a rewrite may rephrase them ("a" -> "an", "is" dropped).
STOPWORDS = frozenset(
    "a an the of on in at to and or with by for from is are was were be been being it its this that these those "
    "there here his her their our your my as into onto over under near next up down out off some two one".split())


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def content_words(prompt: str) -> set[str]:
    return {w for w in words(prompt) if w not in STOPWORDS}


def added_modifiers(prompt: str, rewrite: str) -> list[str]:
    """The comma-separated items of `rewrite` that are not part of `prompt`, normalised, in order."""
    source = " ".join(words(prompt))
    rest = rewrite
    if " ".join(words(rewrite)).startswith(source):  # the prompt kept in front: what follows it is added
        rest = _after_words(rewrite, len(words(prompt)))
    items = [" ".join(words(item)) for item in rest.split(",")]
    return [item for item in items if item and item not in source]


def _after_words(text: str, count: int) -> str:
    """`text` after its first `count` words (as `words` finds them)."""
    matches = list(WORD.finditer(text.lower()))
    return text[matches[count - 1].end():] if 0 < count <= len(matches) else text


def is_clean(rewrite: str, modifiers: Sequence[str]) -> bool:
    if CONTROL.search(rewrite) or len(set(modifiers)) != len(modifiers):
        return False
    tokens = words(rewrite)
    return not any(tokens[i] == tokens[i + 1] == tokens[i + 2] for i in range(len(tokens) - 2))


@dataclass
class QualityReport:
    """Shares over the judged prompts (0..1) and the mean number of added modifiers."""

    prompts: int
    kept: float
    added: float
    mean_modifiers: float
    clean: float
    fits: float
    specific: float
    real: float
    most_common_tail: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def judge(prompts: Sequence[str], rewrites: Sequence[str], vocabulary: Iterable[str]) -> QualityReport:
    """The checks above over (prompt, rewrite) pairs; `vocabulary` is the corpus's words (`words` of it)."""
    if len(prompts) != len(rewrites) or not prompts:
        raise ValueError(f"need one rewrite per prompt and at least one prompt; got {len(prompts)} prompts, "
                         f"{len(rewrites)} rewrites")
    vocabulary = set(vocabulary)
    kept = added = clean = fits = 0
    modifier_count = 0
    new_words = real_words = 0
    tails: list[frozenset[str]] = []
    for prompt, rewrite in zip(prompts, rewrites, strict=True):
        modifiers = added_modifiers(prompt, rewrite)
        kept += content_words(prompt) <= set(words(rewrite))
        added += len(modifiers) >= 2
        modifier_count += len(modifiers)
        clean += is_clean(rewrite, modifiers)
        fits += count_clip_tokens(rewrite) + 2 <= CLIP_CONTEXT
        tails.append(frozenset(modifiers))
        prompt_words = set(words(prompt))
        for word in (w for m in modifiers for w in m.split() if w not in prompt_words):
            new_words += 1
            real_words += word in vocabulary
    common, _ = Counter(tails).most_common(1)[0]
    n = len(prompts)
    return QualityReport(
        prompts=n, kept=kept / n, added=added / n, mean_modifiers=modifier_count / n, clean=clean / n,
        fits=fits / n, specific=sum(t != common for t in tails) / n,
        real=real_words / new_words if new_words else 1.0, most_common_tail=", ".join(sorted(common)))


def corpus_vocabulary(lines: Iterable[str]) -> set[str]:
    return {w for line in lines for w in words(line)}


def frequent_modifiers(lines: Iterable[str], count: int) -> list[str]:
    """The corpus's `count` most frequent comma-separated modifiers (items after the first), normalised."""
    counter: Counter[str] = Counter()
    for line in lines:
        for item in line.split(",")[1:]:
            item = " ".join(words(item))
            if item:
                counter[item] += 1
    return [m for m, _ in counter.most_common(count)]
