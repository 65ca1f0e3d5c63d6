"""What PPO maximises: a reward for each (plain prompt, rewrite), from images or from a function.

`ImageReward` draws N images of the rewrite and of the plain prompt with the same seeds (the
aesthetic delta is then paired, not noise against noise), scores them with the `RewardScorer`, and
caches the plain prompt's aesthetic score by (prompt, seed, generator settings): after the first pass
the plain images cost nothing. `TextReward` wraps any Python function, for experiments and tests that
need no image model. Both return a `RewardBatch`.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol


@dataclass
class RewardBatch:
    total: list[float]  # one per (plain, rewrite)
    terms: dict[str, list[float]] = field(default_factory=dict)  # named parts, for the logs


class RewardFunction(Protocol):
    def __call__(self, plains: list[str], rewrites: list[str]) -> RewardBatch: ...


def _check_values(values, n: int, where: str) -> list[float]:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"{where} must return a list of numbers") from None
    if len(out) != n:
        raise ValueError(f"{where} returned {len(out)} rewards for {n} rewrites")
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{where} returned a reward that is not a finite number: {out}")
    return out


class TextReward:
    """`f(plains, rewrites) -> list[float]`, e.g. `--text-reward my_rewards:likes_vivid`."""

    def __init__(self, function: Callable[[list[str], list[str]], Sequence[float]], name: str = "text"):
        self.function, self.name = function, name

    @classmethod
    def from_spec(cls, spec: str) -> TextReward:
        """`module:function`, importable from the working directory or PYTHONPATH."""
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            raise ValueError(f"--text-reward must look like module:function; got {spec!r}")
        if str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        try:
            function = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot load the text reward {spec!r}: {e}") from None
        if not callable(function):
            raise ValueError(f"the text reward {spec!r} is not a function")
        return cls(function, spec)

    def __call__(self, plains: list[str], rewrites: list[str]) -> RewardBatch:
        return RewardBatch(_check_values(self.function(list(plains), list(rewrites)), len(rewrites), self.name))


def image_seed(prompt: str, index: int, seed: int = 0) -> int:
    """The seed of image `index` of `prompt`: the same for the plain prompt and its rewrite."""
    digest = hashlib.sha256(f"{seed}\0{index}\0{prompt}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


class BaselineCache:
    """Aesthetic score of the plain prompt's image, by (prompt, seed, generator fingerprint).

    Kept in every checkpoint (JSON), so a resumed run neither redraws nor rescores."""

    def __init__(self, entries: dict[str, float] | None = None):
        self.entries = dict(entries or {})
        self.hits = self.misses = 0

    @staticmethod
    def key(fingerprint: str, prompt: str, seed: int) -> str:
        return f"{fingerprint}\0{seed}\0{prompt}"

    def get(self, key: str) -> float | None:
        value = self.entries.get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value


class ImageReward:
    """Images of the rewrite (and, once, of the plain prompt) scored by a `RewardScorer` preset."""

    def __init__(self, generator, scorer, *, preset: str = "promptist", images_per_prompt: int = 2,
                 steps: int = 20, guidance: float = 7.5, size: tuple[int, int] = (512, 512), seed: int = 0,
                 cosine_floor: float | None = 0.0, cache: BaselineCache | None = None, fingerprint: str = ""):
        from promptist_core.rewards import get_preset

        if not 1 <= images_per_prompt <= 16:
            raise ValueError(f"images_per_prompt must be between 1 and 16; got {images_per_prompt}")
        self.generator, self.scorer = generator, scorer
        self.preset = replace(get_preset(preset), cosine_floor=cosine_floor)
        self.n, self.steps, self.guidance, self.size, self.seed = images_per_prompt, steps, guidance, size, seed
        self.cache = cache or BaselineCache()
        self.seconds: dict[str, float] = {}  # of the last call: plain_images, rewrite_images, scoring
        self.fingerprint = (f"{type(generator).__name__}:{fingerprint or getattr(generator, 'fingerprint', '')}:"
                            f"{steps}:{guidance}:{size[0]}x{size[1]}")

    def _draw(self, prompts: list[str], seeds: list[int]):
        return self.generator.generate(prompts, seeds, steps=self.steps, guidance=self.guidance, size=self.size)

    def __call__(self, plains: list[str], rewrites: list[str]) -> RewardBatch:
        # 1. seeds shared by each plain prompt and its rewrite
        clock = time.perf_counter()
        self.seconds = {"plain_images": 0.0}
        seeds = [image_seed(p, i, self.seed) for p in plains for i in range(self.n)]
        plain_rep = [p for p in plains for _ in range(self.n)]
        # 2. the plain prompts' aesthetic scores: cached, else drawn and scored once
        baseline = None
        if self.preset.aesthetic_delta:
            keys = [BaselineCache.key(self.fingerprint, p, s) for p, s in zip(plain_rep, seeds, strict=True)]
            todo = [k for k in dict.fromkeys(keys) if self.cache.get(k) is None]
            if todo:
                first = [keys.index(k) for k in todo]
                drawn = self._draw([plain_rep[i] for i in first], [seeds[i] for i in first])
                self.seconds["plain_images"] = time.perf_counter() - clock
                self.cache.entries.update(zip(todo, self.scorer.aesthetic_scores(drawn).tolist(), strict=True))
            baseline = [self.cache.entries[k] for k in keys]
        # 3. the rewrites' images, scored against the plain prompt
        clock = time.perf_counter()
        images = self._draw([r for r in rewrites for _ in range(self.n)], seeds)
        self.seconds["rewrite_images"] = time.perf_counter() - clock
        clock = time.perf_counter()
        terms = self.scorer.rewards(images, plain_rep, baseline_aesthetic=baseline, preset=self.preset)
        self.seconds["scoring"] = time.perf_counter() - clock
        # 4. the mean over each prompt's images
        def per_prompt(t) -> list[float]:
            return t.view(len(plains), self.n).mean(1).tolist()

        named = {"aes": per_prompt(terms.aesthetic_term), "rel": per_prompt(terms.relevance_term)}
        if terms.pick_term is not None and self.preset.pick_weight:
            named["pick"] = per_prompt(terms.pick_term)
        return RewardBatch(per_prompt(terms.total), named)
