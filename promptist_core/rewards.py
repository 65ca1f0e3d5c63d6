"""Image rewards: CLIP relevance, LAION aesthetics and PickScore, combined by a preset.

What the method optimizes and what users read: "is the optimized prompt's image better, and is it
still my picture?". Formulas (relevance is always measured against the user's plain prompt x):

- relevance: `f_rel = min(20 * cos(x, img(y)) - 5.6, 0)`, cos of L2-normalized CLIP ViT-L/14
  text and image embeddings (no logit scale).
- aesthetics: a LAION head on the normalized ViT-L/14 image embedding. Promptist uses the delta
  `f_aes = aes(img(y)) - aes(img(x))`; PAE uses the absolute score.
- PickScore (optional): `logit_scale.exp() * cos` with PickScore's CLIP-H; PAE adds `min(pick - 18, 0)`
  (and, as PAE's code does, clamps the CLIP cosine at 0 first, so its relevance term is >= -5.6).

Presets: `promptist` = delta-aes + rel; `pae` = aes + rel + pick term. One image encoding serves
relevance and aesthetics, and text embeddings are cached per prompt, so scoring a PPO batch costs
one CLIP image pass. Example:

    >>> from promptist_core.rewards import load_scorer
    >>> scorer = load_scorer()                          # ViT-L/14 (OpenAI) + the improved head
    >>> scorer(images, "a cat", baseline_images=plain_images)[0].total
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .aesthetic import DEFAULT_AESTHETIC_HEAD, AestheticHead, load_aesthetic_head
from .clip_models import DEFAULT_CLIP_MODEL, DEFAULT_PICKSCORE_MODEL, ClipEncoder, image_batches, load_clip
from .model_needs import check_needs, scorer_needs

# ---------------------------------------------------------------------------------------------
# Presets and formulas (pure)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RewardPreset:
    """How the terms combine: `total = a * f_aes + r * f_rel + p * f_pick`."""

    name: str = "custom"
    aesthetic_weight: float = 1.0
    # Promptist: subtract the plain prompt's image score (needs baseline images or scores).
    aesthetic_delta: bool = True
    relevance_weight: float = 1.0
    relevance_scale: float = 20.0
    relevance_offset: float = 5.6
    # PAE's code clamps the cosine at 0 first (`max(cos, 0)`), so its relevance term bottoms out at -5.6.
    cosine_floor: float | None = None
    pick_weight: float = 0.0
    pick_offset: float = 18.0

    def with_weights(self, *, aesthetic: float | None = None, relevance: float | None = None,
                     pick: float | None = None) -> RewardPreset:
        """A copy with some weights changed (None keeps the preset's)."""
        changes = {k: v for k, v in (("aesthetic_weight", aesthetic), ("relevance_weight", relevance),
                                      ("pick_weight", pick)) if v is not None}
        return replace(self, name=f"{self.name}+custom" if changes else self.name, **changes)


PRESETS: dict[str, RewardPreset] = {
    "promptist": RewardPreset("promptist"),
    "pae": RewardPreset("pae", aesthetic_delta=False, cosine_floor=0.0, pick_weight=1.0),
}
PRESET_NAMES = tuple(PRESETS)
# Images per CLIP forward pass: more only multiplies the memory of one pass.
MAX_BATCH_SIZE = 256


def check_batch_size(batch_size: int) -> int:
    """Checked before any model is loaded: a typed 10**9 is an error, not an out-of-memory crash."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ValueError(f"batch_size must be between 1 and {MAX_BATCH_SIZE}; got {batch_size!r}")
    return batch_size


def get_preset(preset: str | RewardPreset) -> RewardPreset:
    if isinstance(preset, RewardPreset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}; got {preset!r}")
    return PRESETS[preset]


def relevance_term(cosine: torch.Tensor, *, scale: float = 20.0, offset: float = 5.6,
                   floor: float | None = None) -> torch.Tensor:
    """`min(scale * cos - offset, 0)`: no bonus above cos 0.28, a growing penalty below.

    `floor` clamps the cosine from below first (PAE: 0, so the penalty never exceeds 5.6).
    """
    if floor is not None:
        cosine = torch.clamp(cosine, min=floor)
    return torch.clamp(scale * cosine - offset, max=0.0)


def pick_term(pick: torch.Tensor, *, offset: float = 18.0) -> torch.Tensor:
    """`min(pick - offset, 0)`: PAE's penalty for PickScores below 18."""
    return torch.clamp(pick - offset, max=0.0)


def clip_cosine(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of (N, D) image and (N, D) text embeddings."""
    return (F.normalize(image_embeddings.float(), dim=-1) * F.normalize(text_embeddings.float(), dim=-1)).sum(-1)


def aesthetic_from_embeddings(head: AestheticHead, embeddings: torch.Tensor) -> torch.Tensor:
    """The head's score for CLIP image embeddings (N, D); they are L2-normalized first, as the heads expect."""
    if embeddings.ndim == 1:
        embeddings = embeddings.unsqueeze(0)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be shaped (N, D); got {tuple(embeddings.shape)}")
    if head.embed_dim != embeddings.shape[-1]:
        raise ValueError(f"the aesthetic head expects {head.embed_dim}-dim CLIP embeddings; got "
                         f"{embeddings.shape[-1]}-dim ones (shape {tuple(embeddings.shape)})")
    with torch.no_grad():
        return head(F.normalize(embeddings.float(), dim=-1)).float()


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass
class ImageScore:
    """One image's reward and its parts."""

    index: int  # position in the input batch
    prompt: str  # the text relevance was measured against (the user's plain prompt)
    aesthetic: float  # the head's score of this image (about 1..10)
    aesthetic_baseline: float | None  # the plain prompt's image score, when given
    aesthetic_term: float  # aesthetic - baseline (or aesthetic when there is no baseline / no delta)
    clip_cosine: float  # cos(prompt, image), CLIP ViT-L/14, no logit scale
    relevance_term: float  # min(20 * cos - 5.6, 0)
    pick: float | None  # PickScore, when a PickScore model is loaded
    pick_term: float | None  # min(pick - 18, 0)
    total: float  # the preset's weighted sum

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RewardTerms:
    """The same numbers as tensors (N,), for trainers. Missing parts are None."""

    aesthetic: torch.Tensor
    aesthetic_baseline: torch.Tensor | None
    aesthetic_term: torch.Tensor
    clip_cosine: torch.Tensor
    relevance_term: torch.Tensor
    pick: torch.Tensor | None
    pick_term: torch.Tensor | None
    total: torch.Tensor

    def to_scores(self, prompts: Sequence[str]) -> list[ImageScore]:
        def at(t, i):
            return None if t is None else float(t[i])

        return [ImageScore(i, prompts[i], float(self.aesthetic[i]), at(self.aesthetic_baseline, i),
                           float(self.aesthetic_term[i]), float(self.clip_cosine[i]), float(self.relevance_term[i]),
                           at(self.pick, i), at(self.pick_term, i), float(self.total[i]))
                for i in range(len(self.total))]


def format_table(scores: Sequence[ImageScore]) -> str:
    """A plain-text table, one row per image, for a node's STRING output or a terminal."""
    header = f"{'#':>3} {'total':>8} {'aes':>7} {'aes_term':>8} {'cos':>7} {'rel':>7} {'pick':>7}"
    rows = [header]
    for s in scores:
        pick = f"{s.pick:7.2f}" if s.pick is not None else f"{'-':>7}"
        rows.append(f"{s.index:>3} {s.total:8.3f} {s.aesthetic:7.3f} {s.aesthetic_term:8.3f} "
                    f"{s.clip_cosine:7.4f} {s.relevance_term:7.3f} {pick}")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------
# The scorer
# ---------------------------------------------------------------------------------------------


class RewardScorer:
    """CLIP + aesthetic head (+ PickScore) scoring batches of images against prompts.

    A plain object: data in (images, prompts), dataclasses out. Build with `load_scorer`, or from
    models you loaded yourself.
    """

    def __init__(self, clip: ClipEncoder, aesthetic_head: AestheticHead, *, pick: ClipEncoder | None = None,
                 preset: str | RewardPreset = "promptist", batch_size: int = 8, text_cache_size: int = 4096):
        """
        Args:
            clip: the CLIP for relevance and aesthetics (ViT-L/14 for the published heads).
            aesthetic_head: a LAION head of the same embedding size as `clip`.
            pick: PickScore's CLIP (optional; needed by presets with a pick weight).
            preset: `promptist`, `pae`, or a RewardPreset with your weights.
            batch_size: images per CLIP forward pass.
            text_cache_size: prompts whose text embeddings are kept.
        """
        if aesthetic_head.embed_dim != clip.embed_dim:
            raise ValueError(
                f"the aesthetic head expects {aesthetic_head.embed_dim}-dim CLIP embeddings but CLIP "
                f"'{clip.name}' gives {clip.embed_dim}-dim ones; the LAION heads need ViT-L/14"
            )
        check_batch_size(batch_size)
        self.clip, self.aesthetic_head, self.pick = clip, aesthetic_head, pick
        self.preset = get_preset(preset)
        self.batch_size = batch_size
        self.text_cache_size = text_cache_size
        self._text_cache: dict[int, OrderedDict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()

    # -- building blocks ----------------------------------------------------------------------

    def image_embeddings(self, images) -> torch.Tensor:
        """L2-normalized CLIP image embeddings (N, D) of the relevance/aesthetic CLIP."""
        return self.clip.encode_images(images, batch_size=self.batch_size)

    def text_embeddings(self, prompts: Sequence[str], encoder: ClipEncoder | None = None) -> torch.Tensor:
        """Normalized text embeddings (N, D), each distinct prompt encoded once and then cached."""
        encoder = encoder or self.clip
        with self._lock:
            cache = self._text_cache.setdefault(id(encoder), OrderedDict())
            missing = list(dict.fromkeys(p for p in prompts if p not in cache))
            if missing:
                for prompt, emb in zip(missing, encoder.encode_texts(missing), strict=True):
                    cache[prompt] = emb
            for p in prompts:
                cache.move_to_end(p)
            out = torch.stack([cache[p] for p in prompts])
            while len(cache) > self.text_cache_size:
                cache.popitem(last=False)
        return out

    def aesthetic_scores(self, images=None, *, embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """The aesthetic head's score (N,) of images, or of precomputed CLIP embeddings."""
        if embeddings is None:
            embeddings = self.image_embeddings(images)
        return aesthetic_from_embeddings(self.aesthetic_head, embeddings)

    # -- the reward ---------------------------------------------------------------------------

    def rewards(
        self,
        images,
        prompts: str | Sequence[str],
        *,
        baseline_images=None,
        baseline_aesthetic: float | Sequence[float] | torch.Tensor | None = None,
        preset: str | RewardPreset | None = None,
    ) -> RewardTerms:
        """Reward terms as tensors (N,) on the CPU.

        Args:
            images: the images to score: float tensor [B, H, W, C] in 0..1, PIL images, or a list.
            prompts: the user's plain prompt x (one for all images, or one per image). Relevance
                and PickScore are measured against it, never against the optimized prompt.
            baseline_images: images of the plain prompt, for Promptist's delta. One per image (same
                seeds: paired), or any other number (their mean score is the baseline).
            baseline_aesthetic: precomputed plain-prompt aesthetic score(s), instead of images.
            preset: overrides the scorer's preset for this call.
        """
        # 1. check inputs
        preset = get_preset(preset) if preset is not None else self.preset
        if baseline_images is not None and baseline_aesthetic is not None:
            raise ValueError("give baseline_images or baseline_aesthetic, not both")
        if preset.pick_weight and self.pick is None:
            raise ValueError(f"preset '{preset.name}' has a PickScore weight ({preset.pick_weight}) but no "
                             "PickScore model is loaded; load one or set the pick weight to 0")
        images = image_batches(images)  # validated and converted once (PIL -> tensors), shared below
        n = sum(b.shape[0] for b in images)
        texts = check_score_prompts(prompts, n)

        # 2. one image encoding shared by relevance and aesthetics; text embeddings cached
        image_emb = self.image_embeddings(images)
        text_emb = self.text_embeddings(texts).to(image_emb.device)
        cosine = clip_cosine(image_emb, text_emb).cpu()
        aesthetic = aesthetic_from_embeddings(self.aesthetic_head, image_emb).cpu()

        # 3. the plain prompt's aesthetic score, for the delta
        baseline = self._baseline(n, baseline_images, baseline_aesthetic) if preset.aesthetic_delta else None
        aes_term = aesthetic - baseline if baseline is not None else aesthetic

        # 4. PickScore on its own CLIP
        pick = pick_t = None
        if self.pick is not None:
            pick_img = self.pick.encode_images(images, batch_size=self.batch_size)
            pick_txt = self.text_embeddings(texts, self.pick).to(pick_img.device)
            pick = (self.pick.logit_scale * clip_cosine(pick_img, pick_txt)).cpu()
            pick_t = pick_term(pick, offset=preset.pick_offset)

        # 5. combine
        rel = relevance_term(cosine, scale=preset.relevance_scale, offset=preset.relevance_offset,
                             floor=preset.cosine_floor)
        total = preset.aesthetic_weight * aes_term + preset.relevance_weight * rel
        if pick_t is not None and preset.pick_weight:
            total = total + preset.pick_weight * pick_t
        return RewardTerms(aesthetic, baseline, aes_term, cosine, rel, pick, pick_t, total)

    def __call__(self, images, prompts: str | Sequence[str], **kwargs) -> list[ImageScore]:
        """One ImageScore per image, in input order (see `rewards` for the arguments)."""
        terms = self.rewards(images, prompts, **kwargs)
        return terms.to_scores(check_score_prompts(prompts, len(terms.total)))

    score = __call__

    def _baseline(self, n: int, baseline_images, baseline_aesthetic) -> torch.Tensor | None:
        if baseline_images is not None:
            values = self.aesthetic_scores(baseline_images).cpu()
        elif baseline_aesthetic is not None:
            values = torch.as_tensor(baseline_aesthetic, dtype=torch.float32).flatten().cpu()
        else:
            return None
        if values.numel() == n:
            return values
        return values.mean().expand(n).clone()


def check_score_prompts(prompts: str | Sequence[str], n: int) -> list[str]:
    """One prompt per image: a single prompt is repeated; otherwise the counts must match."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a string or a list of strings (the user's plain prompt)")
    if len(prompts) not in (1, n):
        raise ValueError(f"got {len(prompts)} prompts for {n} images: give one prompt, or one per image")
    for i, p in enumerate(prompts):
        if not p.strip():
            raise ValueError(f"prompt {i + 1} is empty: relevance needs the prompt the image should show")
    return list(prompts) * n if len(prompts) == 1 else list(prompts)


def load_scorer(
    clip_model: str = DEFAULT_CLIP_MODEL,
    aesthetic: str = DEFAULT_AESTHETIC_HEAD,
    *,
    pick_model: str | None = None,
    preset: str | RewardPreset = "promptist",
    clip_architecture: str | None = None,
    models_dir: Path | str | Sequence[Path | str] | None = None,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = None,
    allow_download: bool | None = None,
    batch_size: int = 8,
) -> RewardScorer:
    """Load CLIP, the aesthetic head and (for `pick_model`, e.g. yuvalkirstain/PickScore_v1) PickScore.

    Models are cached by load_clip; the scorer itself is cheap to build. Missing models raise one
    MissingModelsError naming each (model_needs.check_needs).
    """
    preset = get_preset(preset)
    check_batch_size(batch_size)
    if preset.pick_weight and not pick_model:
        pick_model = DEFAULT_PICKSCORE_MODEL
    # Every missing model in one message before any loads (else one per attempt, for a user offline).
    check_needs(scorer_needs(clip_model, aesthetic, pick_model=pick_model, preset=preset,
                             clip_architecture=clip_architecture, models_dir=models_dir,
                             allow_download=allow_download))
    common = dict(models_dir=models_dir, device=device, dtype=dtype, allow_download=allow_download)
    clip = load_clip(clip_model, architecture=clip_architecture, **common)
    head = load_aesthetic_head(aesthetic, models_dir=models_dir, allow_download=allow_download)
    pick = load_clip(pick_model, **common) if pick_model else None
    return RewardScorer(clip, head, pick=pick, preset=preset, batch_size=batch_size)
