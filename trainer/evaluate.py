"""Does it help on my model? One evaluation of prompt policies (and a LoRA) on the user's own SD model.

For every prompt and every seed, each variant draws one image with the SAME seed: plain (the prompt as
typed), one or more policies (by name or folder, any decoding mode, DF-Prompt policies included), and
optionally a LoRA on the model. Comparisons are therefore paired: two images of one (prompt, seed)
differ only by the variant. Every image gets every reward term we have (aesthetic, CLIP relevance to the
plain prompt, PickScore where a PickScore model is loaded, each preset's total); each variant gets its
mean with a 95% interval, its paired win rate against plain (and against a chosen baseline variant) with
a 95% interval, and its rewrites.

Intervals (both use the PROMPT as the unit, because images of one prompt under several seeds are not
independent evidence):
- mean: Student-t interval over the per-prompt means (each prompt's mean over its seeds).
- win rate: over pairs (one pair per prompt and seed), a win counts 1, a tie (|diff| <= 1e-6) 1/2, a loss 0.
  Its interval is the Wilson score interval with n = the number of prompts and successes = rate * n:
  each prompt counts as one trial. With one seed per prompt that is the exact Wilson interval of the
  pairs; with more seeds it is conservative (it never counts correlated seeds as new prompts).

Layout: `check_variants` (every variant is loaded and checked before any image is made), `evaluate`
(data in, `EvaluationResult` out), then the edges: `format_table`, `make_grid`, `render_html`,
`write_outputs`. Example:

    >>> from trainer.evaluate import Variant, evaluate, write_outputs
    >>> result = evaluate(prompts, [Variant("plain"), Variant("promptist-mini")], generator, scorer, seeds=2)
    >>> print(format_table(result)); write_outputs(result, "runs/eval")
"""

from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import html
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .policy.rewards import image_seed

PLAIN = "plain"
TIE = 1e-6
ROOT = Path(__file__).resolve().parents[1]
PROMPT_SETS = {  # shipped held-out prompt sets (see data/*/LICENSE)
    "coco": ROOT / "data" / "coco" / "captions_val2017.txt",
    "diffusiondb": ROOT / "data" / "diffusiondb" / "prompts.txt",
}
INTERVAL_METHOD = {
    "mean": "95% Student-t interval over per-prompt means (each prompt's mean over its seeds)",
    "win_rate": ("95% Wilson score interval, n = prompts (each prompt one trial; exact Wilson for one seed per "
                 "prompt, conservative for more); win 1, tie (|diff| <= 1e-6) 1/2, loss 0 per (prompt, seed) pair"),
}
# Decoding options a policy variant may set (PromptOptimizer.__call__'s keywords) and their types.
DECODING_OPTIONS = {"mode": str, "num_beams": int, "max_new_tokens": int, "length_penalty": float,
                    "num_beam_groups": int, "diversity_penalty": float, "temperature": float, "top_k": int,
                    "top_p": float, "seed": int, "head_choice": str, "keep_prompt": bool,
                    "no_repeat_ngram_size": int, "trim_to_clip_window": bool}

Progress = Callable[[int, int], None]


class VariantError(ValueError):
    """A variant that cannot run (missing folder, malformed policy or LoRA), raised before any image."""


# ---------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------


@dataclass
class Variant:
    """One column of the evaluation.

    Args:
        name: the column's name; `policy` defaults to it unless it is `plain`.
        policy: a policy name (models folder, Hub id, `promptist-mini`) or folder; None = the prompt as typed.
        options: decoding keywords for the policy (`mode`, `num_beams`, `keep_prompt`, ...).
        lora: a kohya LoRA file applied to the generator's UNet for this variant's images (or the
            already attached modules, {path: LoRALinear}); at most one LoRA file per evaluation.
        optimizer: an already loaded `PromptOptimizer` (hosts pass theirs); wins over `policy`.
    """

    name: str
    policy: str | None = None
    options: dict = field(default_factory=dict)
    lora: str | Path | dict | None = None
    optimizer: object = None

    def __post_init__(self):
        if self.policy is None and self.name != PLAIN and self.optimizer is None and self.lora is None:
            self.policy = self.name

    def describe(self) -> dict:
        lora = self.lora if isinstance(self.lora, (str, Path)) or self.lora is None else "(attached modules)"
        policy = self.policy or (getattr(self.optimizer, "name", None) if self.optimizer is not None else None)
        return {"name": self.name, "policy": policy, "options": dict(self.options),
                "lora": None if lora is None else str(lora)}


def _convert(key: str, text: str):
    kind = DECODING_OPTIONS[key]
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{key} must be true or false; got {text!r}")
        return text.lower() in ("true", "1", "yes")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{key} must be {kind.__name__}; got {text!r}") from None


def parse_variant(spec: str) -> Variant:
    """`SOURCE[,key=value...]` -> Variant. SOURCE is `plain`, a policy name or folder; keys: `name=` (the
    column), `lora=FILE`, and the decoding options (`mode=diverse`, `keep_prompt=true`, `seed=3`, ...).
    Examples: `promptist-mini`, `runs/sft,mode=sample,seed=1,name=sft-sampled`, `plain,lora=tpo.safetensors`."""
    source, *pairs = [part.strip() for part in spec.split(",")]
    if not source:
        raise VariantError(f"variant {spec!r}: no policy given (use plain, a policy name or a folder)")
    name, lora, options = None, None, {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not value.strip():
            raise VariantError(f"variant {spec!r}: {pair!r} is not key=value")
        if key == "name":
            name = value.strip()
        elif key == "lora":
            lora = value.strip()
        elif key in DECODING_OPTIONS:
            try:
                options[key] = _convert(key, value.strip())
            except ValueError as e:
                raise VariantError(f"variant {spec!r}: {e}") from None
        else:
            raise VariantError(f"variant {spec!r}: unknown option {key!r} (name, lora, "
                               f"{', '.join(DECODING_OPTIONS)})")
    policy = None if source == PLAIN else source
    default_name = source if not (pairs and (options or lora)) else spec.replace(" ", "")
    return Variant(name or default_name, policy, options, lora)


@dataclass
class _Ready:
    """A checked variant: its rewriter (None = plain) and its LoRA modules (None = the model as it is)."""

    variant: Variant
    optimizer: object
    loras: dict | None


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def check_variants(variants: Sequence[Variant], generator, *, models_dir=None, device="cpu",
                   allow_download: bool | None = None) -> list[_Ready]:
    """Load every variant's policy and LoRA, or raise one `VariantError` naming the first bad variant.
    Nothing is drawn here: this runs before any image is made."""
    from promptist_core.optimizer import PromptOptimizer, load_optimizer

    # 1. names: unique, plain first (every comparison is against it)
    names = [v.name for v in variants]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise VariantError(f"variant names must be unique; {', '.join(map(repr, duplicates))} given twice "
                           "(add name=... to one of them)")
    for v in variants:
        unknown = sorted(set(v.options) - set(DECODING_OPTIONS))
        if unknown:
            raise VariantError(f"variant {v.name!r}: unknown decoding option(s) {', '.join(unknown)}")
    lora_files = {str(Path(v.lora).expanduser().resolve()) for v in variants if isinstance(v.lora, (str, Path))}
    if len(lora_files) > 1:
        raise VariantError(f"one LoRA file per evaluation (they attach to the same UNet); got {sorted(lora_files)}")
    # 2. each variant loads (policies are cached by load_optimizer; a LoRA attaches once)
    ready, attached = [], {}
    for v in variants:
        try:
            optimizer = v.optimizer
            if optimizer is None and v.policy is not None:
                optimizer = load_optimizer(v.policy, models_dir=models_dir, device=device,
                                           allow_download=allow_download)
            if optimizer is not None and not isinstance(optimizer, PromptOptimizer) and not callable(optimizer):
                raise ValueError(f"optimizer must be a PromptOptimizer, got {type(optimizer).__name__}")
            if optimizer is not None:
                PromptOptimizer._check_options(
                    v.options.get("mode", "beam"), 1, v.options.get("num_beams", 8),
                    v.options.get("max_new_tokens", 75), v.options.get("num_beam_groups"),
                    v.options.get("diversity_penalty", 1.0), v.options.get("temperature", 1.0),
                    v.options.get("top_k", 50), v.options.get("top_p", 1.0), 16, v.options.get("seed"),
                    v.options.get("no_repeat_ngram_size"), v.options.get("min_modifiers"))
            elif v.options:
                raise ValueError(f"decoding options {sorted(v.options)} need a policy (this variant has none)")
            loras = None
            if isinstance(v.lora, dict):
                loras = v.lora
            elif v.lora is not None:
                key = str(Path(v.lora).expanduser().resolve())
                if key not in attached:
                    attached[key] = _attach_lora(generator, Path(v.lora).expanduser())
                loras = attached[key]
        except VariantError:
            raise
        except Exception as e:  # one line naming the variant, whatever failed inside
            where = v.policy or v.lora or "plain"
            raise VariantError(f"variant {v.name!r} ({where}): {_one_line(e)}") from None
        ready.append(_Ready(v, optimizer, loras))
    return ready


def _attach_lora(generator, path: Path) -> dict:
    from .tpo.lora import load_kohya_lora

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such LoRA file (give a kohya-format .safetensors LoRA)")
    unet = getattr(getattr(generator, "pipe", None), "unet", None)
    if unet is None:
        raise ValueError("this image generator has no diffusers UNet to apply a LoRA file to (in a host, load "
                         "the LoRA on the MODEL instead and evaluate that model)")
    loras = load_kohya_lora(unet, path)
    for lora in loras.values():  # off except while its own variant's images are drawn
        lora.enabled = False
    return loras


def rewrite_all(ready: Sequence[_Ready], prompts: Sequence[str]) -> dict[str, list[str]]:
    """Each variant's rewrite of every prompt (plain: the prompt itself)."""
    out = {}
    for r in ready:
        if r.optimizer is None:
            out[r.variant.name] = list(prompts)
            continue
        try:
            if callable(r.optimizer) and not hasattr(r.optimizer, "tokenizer"):
                rewrites = list(r.optimizer(list(prompts)))  # a plain function: prompts -> rewrites
            else:
                rewrites = [o.prompt for o in r.optimizer(list(prompts), **r.variant.options)]
        except Exception as e:
            raise VariantError(f"variant {r.variant.name!r}: rewriting failed: {_one_line(e)}") from None
        if len(rewrites) != len(prompts) or not all(isinstance(t, str) and t.strip() for t in rewrites):
            raise VariantError(f"variant {r.variant.name!r}: expected one non-empty rewrite per prompt")
        out[r.variant.name] = rewrites
    return out


# ---------------------------------------------------------------------------------------------
# Statistics (pure)
# ---------------------------------------------------------------------------------------------

# Two-sided 95% Student-t quantiles t(0.975, df) for df = 1..30; beyond, the Cornish-Fisher expansion.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]
Z975 = 1.959964


def t975(df: int) -> float:
    if df < 1:
        return math.inf
    if df <= len(_T975):
        return _T975[df - 1]
    z = Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class MeanCI:
    mean: float
    low: float
    high: float
    n: int  # prompts


def mean_ci(per_prompt: Sequence[float]) -> MeanCI:
    """Mean and 95% t interval of per-prompt values (one interval of zero width with a single prompt is
    not claimed: it is infinite)."""
    n = len(per_prompt)
    if n == 0:
        raise ValueError("no values for a mean")
    m = sum(per_prompt) / n
    if n == 1:
        return MeanCI(m, -math.inf, math.inf, 1)
    sd = math.sqrt(sum((x - m) ** 2 for x in per_prompt) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return MeanCI(m, m - half, m + half, n)


def wilson(successes: float, n: int, z: float = Z975) -> tuple[float, float]:
    """Wilson score interval of a proportion successes / n (successes may be fractional: ties count half)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class PairedWinRate:
    """How often a variant's image beats the other's image of the same (prompt, seed)."""

    win_rate: float  # (wins + ties / 2) / pairs
    low: float  # 95% Wilson interval, prompts as trials (see the module docstring)
    high: float
    wins: int
    ties: int
    losses: int
    prompts: int


def paired_win_rate(a: Sequence[float], b: Sequence[float], prompt_of: Sequence[int], *,
                    tie: float = TIE) -> PairedWinRate:
    """Win rate of scores `a` over `b` (one entry per pair), with the pair's prompt index in `prompt_of`."""
    if not (len(a) == len(b) == len(prompt_of)) or not a:
        raise ValueError(f"win rate needs paired scores of one length; got {len(a)}, {len(b)}, {len(prompt_of)}")
    diff = [x - y for x, y in zip(a, b, strict=True)]
    wins, losses = sum(d > tie for d in diff), sum(d < -tie for d in diff)
    ties = len(diff) - wins - losses
    rate = (wins + ties / 2) / len(diff)
    prompts = len(set(prompt_of))
    low, high = wilson(rate * prompts, prompts)
    return PairedWinRate(rate, low, high, wins, ties, losses, prompts)


def per_prompt_means(values: Sequence[float], prompt_of: Sequence[int]) -> list[float]:
    sums: dict[int, list[float]] = {}
    for v, p in zip(values, prompt_of, strict=True):
        sums.setdefault(p, []).append(v)
    return [sum(vs) / len(vs) for _, vs in sorted(sums.items())]


def preset_totals(aesthetic: torch.Tensor, plain_aesthetic: torch.Tensor, cosine: torch.Tensor,
                  pick: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Each preset's total from the raw terms; the Promptist delta is against the plain image of the same
    (prompt, seed). Presets that need PickScore are left out when there is none."""
    from promptist_core.rewards import PRESETS, pick_term, relevance_term

    totals = {}
    for name, preset in PRESETS.items():
        if preset.pick_weight and pick is None:
            continue
        aes = aesthetic - plain_aesthetic if preset.aesthetic_delta else aesthetic
        rel = relevance_term(cosine, scale=preset.relevance_scale, offset=preset.relevance_offset,
                             floor=preset.cosine_floor)
        total = preset.aesthetic_weight * aes + preset.relevance_weight * rel
        if preset.pick_weight:
            total = total + preset.pick_weight * pick_term(pick, offset=preset.pick_offset)
        totals[f"total_{name}"] = total
    return totals


# ---------------------------------------------------------------------------------------------
# The evaluation
# ---------------------------------------------------------------------------------------------


@dataclass
class ImageRecord:
    """One image: where it sits (prompt, seed, variant), what was drawn, and its scores."""

    prompt_index: int
    prompt: str
    seed_index: int
    seed: int
    variant: str
    rewrite: str
    image_sha256: str = ""
    scores: dict[str, float] = field(default_factory=dict)


@dataclass
class VariantSummary:
    name: str
    spec: dict
    means: dict[str, MeanCI]  # by metric
    delta_vs_plain: dict[str, MeanCI]  # paired mean difference, per-prompt t interval
    win_vs_plain: dict[str, PairedWinRate]
    win_vs_baseline: dict[str, PairedWinRate] | None
    identical_to_plain: int  # images byte-identical to plain's image of the same (prompt, seed)


@dataclass
class EvaluationResult:
    prompts: list[str]
    variants: list[str]
    metrics: list[str]
    metric: str  # the one shown in the table, the grid and win rates first
    baseline: str | None
    records: list[ImageRecord]
    rewrites: dict[str, list[str]]
    summaries: list[VariantSummary]
    settings: dict
    grid_images: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)  # (prompt, variant) -> uint8 HWC

    def summary(self, name: str) -> VariantSummary:
        return next(s for s in self.summaries if s.name == name)

    def to_json(self) -> dict:
        return {"settings": self.settings, "metric": self.metric, "baseline": self.baseline,
                "metrics": self.metrics, "intervals": INTERVAL_METHOD, "prompts": self.prompts,
                "variants": [{**asdict(s), "rewrites": self.rewrites[s.name]} for s in self.summaries]}


def _prompt_seeds(prompts: Sequence[str], seeds: int | Sequence[int], seed: int) -> list[list[int]]:
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"seeds per prompt must be at least 1; got {seeds}")
        return [[image_seed(p, k, seed) for k in range(seeds)] for p in prompts]
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds is empty")
    return [list(seeds) for _ in prompts]


def _uint8(image: torch.Tensor) -> torch.Tensor:
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


@contextlib.contextmanager
def _lora_state(all_loras: Sequence[dict], mine: dict | None):
    """Only this variant's LoRA on (plain and policies: the model as it is)."""
    before = [{k: m.enabled for k, m in loras.items()} for loras in all_loras]
    for loras in all_loras:
        for m in loras.values():
            m.enabled = False
    for m in (mine or {}).values():
        m.enabled = True
    try:
        yield
    finally:
        for loras, state in zip(all_loras, before, strict=True):
            for k, m in loras.items():
                m.enabled = state[k]


def evaluate(
    prompts: Sequence[str],
    variants: Sequence[Variant | str],
    generator,
    scorer,
    seeds: int | Sequence[int] = 1,
    *,
    seed: int = 0,
    steps: int = 25,
    guidance: float = 7.5,
    size: tuple[int, int] = (512, 512),
    metric: str = "total_promptist",
    baseline: str | None = None,
    batch_size: int | None = None,
    score_batch: int = 32,
    grid_prompts: int = 8,
    models_dir=None,
    device: str = "cpu",
    allow_download: bool | None = None,
    progress: Progress | None = None,
    image_sink: Callable[[list[ImageRecord], torch.Tensor], None] | None = None,
) -> EvaluationResult:
    """Draw every (prompt, seed) with every variant, score, and compare (data in, data out).

    Args:
        prompts: the user's plain prompts (relevance is measured against them).
        variants: `Variant`s or specs for `parse_variant`; plain is added first when missing.
        generator: an `ImageGenerator` (promptist_core.generators); a LoRA variant needs its `pipe.unet`.
        scorer: a `RewardScorer` (or anything with its `rewards(images, prompts, preset=...)`).
        seeds: seeds per prompt (derived from `seed` and the prompt, as tpo-eval and PPO do), or the seeds.
        metric: the score for the table, the grid and the headline win rates (any of `result.metrics`).
        baseline: a second variant every other one is also compared with (e.g. the bundled policy).
        batch_size: images per generator call; default: as many (prompt, seed)s as the generator's own
            `batch_size` holds, all variants of each together (at least one (prompt, seed) per call).
        grid_prompts: prompts whose first-seed images are kept for the grid and the report.
        progress: called as (images done, images in all) before and after each generator call; raise
            from it to stop (ComfyUI's Cancel).
        image_sink: called with each generator call's records and images (to save them).
    """
    from promptist_core.optimizer import check_prompts
    from promptist_core.rewards import RewardPreset

    # 1. check inputs and every variant before any image is made
    prompts = check_prompts(list(prompts))
    variants = [parse_variant(v) if isinstance(v, str) else v for v in variants]
    if not any(v.name == PLAIN for v in variants):
        variants.insert(0, Variant(PLAIN))
    if not any(v.name == PLAIN and v.policy is None and v.lora is None and v.optimizer is None for v in variants):
        raise VariantError("the variant named plain must be the prompt as typed (no policy, no LoRA)")
    names = [v.name for v in variants]
    if baseline is not None and baseline not in names:
        raise VariantError(f"baseline {baseline!r} is not one of the variants ({', '.join(names)})")
    prompt_seeds = _prompt_seeds(prompts, seeds, seed)
    ready = check_variants(variants, generator, models_dir=models_dir, device=device, allow_download=allow_download)
    all_loras = [r.loras for r in ready if r.loras]
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}")

    # 2. rewrites (cheap next to images; a failure here still comes before any image)
    rewrites = rewrite_all(ready, prompts)

    # 3. images: one group per model state (LoRA on/off), within it (prompt, seed) major, variants adjacent
    groups: dict[int, list[_Ready]] = {}
    for r in ready:
        groups.setdefault(id(r.loras) if r.loras else 0, []).append(r)
    records: list[ImageRecord] = []
    grid: dict[tuple[int, str], torch.Tensor] = {}
    pending: list[tuple[ImageRecord, torch.Tensor]] = []
    raw = RewardPreset("raw", aesthetic_delta=False, pick_weight=0.0)
    total = len(prompts) * len(prompt_seeds[0]) * len(ready)
    done = 0

    def score(batch):
        images = torch.stack([im for _, im in batch])
        terms = scorer.rewards(images, [rec.prompt for rec, _ in batch], preset=raw)
        for i, (rec, _) in enumerate(batch):
            rec.scores = {"aesthetic": float(terms.aesthetic[i]), "clip_cosine": float(terms.clip_cosine[i])}
            if terms.pick is not None:
                rec.scores["pick"] = float(terms.pick[i])

    for group in groups.values():
        jobs = [ImageRecord(p, prompts[p], k, s, r.variant.name, rewrites[r.variant.name][p])
                for p in range(len(prompts)) for k, s in enumerate(prompt_seeds[p]) for r in group]
        # the variants of one (prompt, seed) always share a call; as many whole sets as the generator batches
        per_call = batch_size or max(1, int(getattr(generator, "batch_size", 1)) // len(group)) * len(group)
        with _lora_state(all_loras, group[0].loras):
            for start in range(0, len(jobs), per_call):
                chunk = jobs[start:start + per_call]
                if progress is not None:
                    progress(done, total)
                images = generator.generate([j.rewrite for j in chunk], [j.seed for j in chunk], steps=steps,
                                            guidance=guidance, size=size)
                done += len(chunk)
                for rec, image in zip(chunk, images, strict=True):
                    pixels = _uint8(image)
                    rec.image_sha256 = hashlib.sha256(pixels.numpy().tobytes()).hexdigest()[:16]
                    if rec.seed_index == 0 and rec.prompt_index < grid_prompts:
                        grid[(rec.prompt_index, rec.variant)] = pixels
                    pending.append((rec, image.detach().float().cpu()))
                if image_sink is not None:
                    image_sink(chunk, images)
                records.extend(chunk)
                if len(pending) >= score_batch:
                    score(pending)
                    pending = []
                if progress is not None:
                    progress(done, total)
    if pending:
        score(pending)

    # 4. preset totals (the Promptist delta needs plain's image of the same prompt and seed)
    order = {n: i for i, n in enumerate(names)}
    records.sort(key=lambda r: (r.prompt_index, r.seed_index, order[r.variant]))
    plain_of = {(r.prompt_index, r.seed_index): r for r in records if r.variant == PLAIN}
    has_pick = all("pick" in r.scores for r in records)
    aes = torch.tensor([r.scores["aesthetic"] for r in records])
    plain_aes = torch.tensor([plain_of[(r.prompt_index, r.seed_index)].scores["aesthetic"] for r in records])
    cos = torch.tensor([r.scores["clip_cosine"] for r in records])
    pick = torch.tensor([r.scores["pick"] for r in records]) if has_pick else None
    from promptist_core.rewards import relevance_term

    rel = relevance_term(cos)
    totals = preset_totals(aes, plain_aes, cos, pick)
    for i, r in enumerate(records):
        r.scores["relevance"] = float(rel[i])
        for key, values in totals.items():
            r.scores[key] = float(values[i])
    metrics = ["aesthetic", "clip_cosine", "relevance", *(["pick"] if has_pick else []), *totals]
    if metric not in metrics:
        raise ValueError(f"metric must be one of {', '.join(metrics)}; got {metric!r}")

    # 5. per variant: means, paired differences and win rates
    by_variant = {n: [r for r in records if r.variant == n] for n in names}
    summaries = []
    for r in ready:
        mine = by_variant[r.variant.name]
        prompt_of = [x.prompt_index for x in mine]

        def column(rows, key):
            return [x.scores[key] for x in rows]

        means = {m: mean_ci(per_prompt_means(column(mine, m), prompt_of)) for m in metrics}
        plain_rows = by_variant[PLAIN]
        deltas = {m: mean_ci(per_prompt_means([a - b for a, b in zip(column(mine, m), column(plain_rows, m),
                                                                         strict=True)], prompt_of))
                  for m in metrics}
        wins = {m: paired_win_rate(column(mine, m), column(plain_rows, m), prompt_of) for m in metrics}
        vs_base = None
        if baseline is not None:
            base_rows = by_variant[baseline]
            vs_base = {m: paired_win_rate(column(mine, m), column(base_rows, m), prompt_of) for m in metrics}
        identical = sum(a.image_sha256 == b.image_sha256 for a, b in zip(mine, plain_rows, strict=True))
        summaries.append(VariantSummary(r.variant.name, r.variant.describe(), means, deltas, wins, vs_base,
                                        identical))
    settings = {"prompts": len(prompts), "seeds_per_prompt": len(prompt_seeds[0]), "images": len(records),
                "seed": seed, "steps": steps, "guidance": guidance, "size": list(size),
                "generator": type(generator).__name__, "fingerprint": getattr(generator, "fingerprint", "")}
    return EvaluationResult(prompts, names, metrics, metric, baseline, records, rewrites, summaries, settings, grid)


# ---------------------------------------------------------------------------------------------
# Edges: table, grid, report, files
# ---------------------------------------------------------------------------------------------


def _ci(c: MeanCI) -> str:
    if not math.isfinite(c.low):
        return f"{c.mean:.3f}"
    return f"{c.mean:.3f} [{c.low:.3f}, {c.high:.3f}]"


def _wr(w: PairedWinRate | None) -> str:
    return "-" if w is None else f"{100 * w.win_rate:.0f}% [{100 * w.low:.0f}, {100 * w.high:.0f}]"


def format_table(result: EvaluationResult) -> str:
    """The terminal table: per variant, each metric's mean [95% CI], and win rates on the chosen metric."""
    shown = [m for m in result.metrics if m != "relevance"]
    header = ["variant", *shown, f"win vs plain ({result.metric})"]
    if result.baseline:
        header.append(f"win vs {result.baseline}")
    rows = [header]
    for s in result.summaries:
        row = [s.name, *[_ci(s.means[m]) for m in shown],
               "-" if s.name == PLAIN else _wr(s.win_vs_plain[result.metric])]
        if result.baseline:
            row.append("-" if s.name == result.baseline else _wr(s.win_vs_baseline[result.metric]))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    st = result.settings
    lines.append(f"{st['prompts']} prompts x {st['seeds_per_prompt']} seeds, paired; intervals 95%: mean t over "
                 "prompts, win rate Wilson over prompts (ties 1/2)")
    return "\n".join(lines)


def make_grid(result: EvaluationResult, *, cell: int = 192):
    """grid.png as a PIL image: rows = prompts (first seed), columns = variants, each cell labelled with its
    score on `result.metric`."""
    from PIL import Image, ImageDraw

    rows = sorted({p for p, _ in result.grid_images})
    cols = result.variants
    label_h, head_h, left = 16, 18, 0
    scores = {(r.prompt_index, r.variant): r.scores.get(result.metric) for r in result.records if r.seed_index == 0}
    canvas = Image.new("RGB", (left + cell * len(cols), head_h + (cell + label_h) * max(1, len(rows))), "white")
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(cols):
        draw.text((left + j * cell + 4, 3), name[:cell // 7], fill="black")
    for i, p in enumerate(rows):
        y = head_h + i * (cell + label_h)
        for j, name in enumerate(cols):
            pixels = result.grid_images.get((p, name))
            if pixels is None:
                continue
            tile = Image.fromarray(pixels.numpy()).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (left + j * cell, y))
            value = scores.get((p, name))
            text = f"{result.metric.replace('total_', '')} {value:.3f}" if value is not None else ""
            draw.text((left + j * cell + 4, y + cell + 2), text, fill="black")
    return canvas


def _png_b64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def render_html(result: EvaluationResult, grid=None) -> str:
    """A self-contained report (no external files or scripts): the table, the grid, and each kept image
    with its rewrite and score under it."""
    from PIL import Image

    grid = grid if grid is not None else make_grid(result)
    esc = html.escape
    head = "".join(f"<th>{esc(m)}</th>" for m in result.metrics)
    extra = f"<th>win vs {esc(result.baseline)}</th>" if result.baseline else ""
    body = []
    for s in result.summaries:
        cells = "".join(f"<td>{esc(_ci(s.means[m]))}</td>" for m in result.metrics)
        win = "-" if s.name == PLAIN else _wr(s.win_vs_plain[result.metric])
        base = ("" if not result.baseline else
                f"<td>{'-' if s.name == result.baseline else esc(_wr(s.win_vs_baseline[result.metric]))}</td>")
        body.append(f"<tr><td><b>{esc(s.name)}</b></td>{cells}<td>{esc(win)}</td>{base}</tr>")
    scores = {(r.prompt_index, r.variant): r for r in result.records if r.seed_index == 0}
    rows = []
    for p in sorted({p for p, _ in result.grid_images}):
        cells = []
        for name in result.variants:
            pixels = result.grid_images.get((p, name))
            rec = scores.get((p, name))
            if pixels is None or rec is None:
                cells.append("<td></td>")
                continue
            src = _png_b64(Image.fromarray(pixels.numpy()))
            cells.append(f'<td><img src="data:image/png;base64,{src}" width="192" height="192" '
                         f'style="image-rendering:pixelated"><div class="s">{esc(result.metric)} '
                         f'{rec.scores[result.metric]:.3f}</div><div class="r">{esc(rec.rewrite)}</div></td>')
        rows.append(f"<tr><th class='p'>{esc(result.prompts[p])}</th>{''.join(cells)}</tr>")
    columns = "".join(f"<th>{esc(n)}</th>" for n in result.variants)
    st = result.settings
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Promptist evaluation</title>
<style>body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px;vertical-align:top;font-size:13px}}.r{{max-width:192px;color:#333}}
.s{{font-weight:bold}}th.p{{max-width:160px;text-align:left}}</style></head><body>
<h1>Promptist evaluation</h1>
<p>{st['prompts']} prompts &times; {st['seeds_per_prompt']} seeds, every variant with the same seeds (paired);
{st['steps']} steps, guidance {st['guidance']}, {st['size'][0]}&times;{st['size'][1]}, generator
{esc(str(st['generator']))}. Headline metric: <b>{esc(result.metric)}</b>.</p>
<h2>Table</h2>
<table id="summary"><tr><th>variant</th>{head}<th>win vs plain ({esc(result.metric)})</th>{extra}</tr>
{''.join(body)}</table>
<p>Intervals (95%): mean: {esc(INTERVAL_METHOD['mean'])}; win rate: {esc(INTERVAL_METHOD['win_rate'])}.
An interval for the win rate that lies above 50% means the variant wins more often than plain on these prompts.</p>
<h2>Grid</h2>
<img id="grid" alt="grid" src="data:image/png;base64,{_png_b64(grid)}">
<h2>Images and rewrites (first seed)</h2>
<table id="images"><tr><th>prompt</th>{columns}</tr>{''.join(rows)}</table>
</body></html>
"""


CSV_FIELDS = ["prompt_index", "prompt", "seed_index", "seed", "variant", "rewrite", "image_sha256"]


def write_outputs(result: EvaluationResult, folder: Path | str) -> dict[str, Path]:
    """results.csv (one row per image), summary.json, grid.png and report.html in `folder`."""
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / name for name in ("results.csv", "summary.json", "grid.png", "report.html")}
    with paths["results.csv"].open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=[*CSV_FIELDS, *result.metrics])
        writer.writeheader()
        for r in result.records:
            writer.writerow({**{k: getattr(r, k) for k in CSV_FIELDS}, **r.scores})
    paths["summary.json"].write_text(json.dumps(_finite(result.to_json()), indent=1, allow_nan=False) + "\n",
                                     encoding="utf-8")
    grid = make_grid(result)
    grid.save(paths["grid.png"])
    paths["report.html"].write_text(render_html(result, grid), encoding="utf-8")
    return paths


def save_images_to(folder: Path | str) -> Callable[[list[ImageRecord], torch.Tensor], None]:
    """An `image_sink` writing each image as FOLDER/<prompt>_<seed>_<variant>.png."""
    from PIL import Image

    folder = Path(folder).expanduser()

    def sink(records: list[ImageRecord], images: torch.Tensor) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for rec, image in zip(records, images, strict=True):
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in rec.variant)
            Image.fromarray(_uint8(image).numpy()).save(folder / f"{rec.prompt_index:04d}_{rec.seed_index}_{safe}.png")

    return sink


def _finite(value):
    """JSON has no infinity: an interval that cannot be given (one prompt) is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def read_prompts(spec: str, *, limit: int | None = None, column: str = "prompt") -> list[str]:
    """Prompts to evaluate on: `coco` (held-out COCO val captions), `diffusiondb` (CC0 DiffusionDB
    prompts), or a prompt file read like a corpus."""
    from .policy.corpus import read_corpus

    path = PROMPT_SETS.get(spec, spec)
    return read_corpus(path, column=column, limit=limit).prompts
