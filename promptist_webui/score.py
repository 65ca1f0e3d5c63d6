"""The always-visible "Promptist score" script: score every generated image (CLIP relevance to the user's
prompt, LAION aesthetics, optionally PickScore) into its infotext; "best of N" keeps the best of a batch."""

from __future__ import annotations

import re

import torch

from promptist_core.aesthetic import DEFAULT_AESTHETIC_HEAD
from promptist_core.clip_models import DEFAULT_CLIP_MODEL
from promptist_core.rewards import PRESET_NAMES, ImageScore, RewardScorer, load_scorer

from .errors import AFTER_SAMPLING, guarded
from .host import IN_WEBUI, devices, gr, models_dirs, scripts, shared
from .infotext import (
    EXTRA_NETWORK_TAG,
    INFOTEXT_BEST_OF,
    INFOTEXT_ORIGINAL,
    INFOTEXT_PRESET,
    INFOTEXT_SCORE,
    INFOTEXT_TERMS,
    SCORE_TITLE,
)
from .job_models import models_ready, plan
from .vram import after_job, ready, scorer_modules

# A1111 emphasis syntax means nothing to CLIP's text encoder (nor do extra-network tags).
EMPHASIS_WEIGHT = re.compile(r":\s*-?\d+(?:\.\d+)?\s*(?=[)\]])")


def plain_text(prompt: str) -> str:
    """'(a cat:1.2) <lora:x:1>' -> 'a cat': the words CLIP should compare the image with (approximate)."""
    text = EXTRA_NETWORK_TAG.sub(" ", prompt)
    text = EMPHASIS_WEIGHT.sub("", text)
    text = re.sub(r"[()\[\]]", "", text)
    return re.sub(r"\s{2,}", " ", text).strip(" ,") or prompt.strip()


def reference_prompts(p, count: int, batch_number: int = 0) -> list[str]:
    """The user's prompts for this batch: the originals if Promptist rewrote them, else p.prompts."""
    originals = (getattr(p, "extra_generation_params", None) or {}).get(INFOTEXT_ORIGINAL)
    start = batch_number * int(getattr(p, "batch_size", count) or count)
    if isinstance(originals, list) and len(originals) >= start + count:
        prompts = originals[start:start + count]
    else:
        prompts = list(p.prompts)[:count]
    return [plain_text(t) for t in prompts]


def batch_to_images(images) -> torch.Tensor:
    """The webui's list of [C, H, W] tensors in 0..1 -> one [B, H, W, C] batch."""
    return torch.stack([img.detach().float() for img in images]).permute(0, 2, 3, 1)


def score_processing(p, pp, scorer: RewardScorer, *, preset: str = "promptist", best_of_n: bool = False,
                     batch_number: int = 0) -> list[ImageScore]:
    """Score the batch in `pp.images`, write the scores into the infotext, and keep the best if asked.

    Called from the script's `postprocess_batch_list`, where `p.prompts` etc. hold this batch's values.
    With `best_of_n`, `pp.images`, `p.prompts`, `p.negative_prompts`, `p.seeds` and `p.subseeds` are cut to
    the best image, as the webui requires of a script that changes the batch size.
    """
    # 1. score against the user's prompts (no plain-prompt images here: absolute aesthetics)
    count = len(pp.images)
    if count == 0:
        return []
    scores = scorer(batch_to_images(pp.images), reference_prompts(p, count, batch_number), preset=preset)

    # 2. infotext: lists hold one value per image of this batch (the webui indexes them by position)
    params = p.extra_generation_params
    params[INFOTEXT_SCORE] = [f"{s.total:.3f}" for s in scores]
    params[INFOTEXT_TERMS] = [_terms(s) for s in scores]
    params[INFOTEXT_PRESET] = preset

    # 3. best of N: keep the best image and everything the webui pairs with it
    if best_of_n and count > 1:
        best = max(range(count), key=lambda i: scores[i].total)
        pp.images = [pp.images[best]]
        for name in ("prompts", "negative_prompts", "seeds", "subseeds"):
            values = getattr(p, name, None)
            if isinstance(values, list) and len(values) == count:
                setattr(p, name, [values[best]])
        params[INFOTEXT_SCORE] = [params[INFOTEXT_SCORE][best]]
        params[INFOTEXT_TERMS] = [params[INFOTEXT_TERMS][best]]
        params[INFOTEXT_BEST_OF] = f"{best + 1}/{count}"
    return scores


def _terms(s: ImageScore) -> str:
    parts = [f"aes {s.aesthetic:.3f}", f"cos {s.clip_cosine:.4f}", f"rel {s.relevance_term:.3f}"]
    if s.pick is not None:
        parts.append(f"pick {s.pick:.2f}")
    return "; ".join(parts)


def scorer_settings(settings: dict) -> tuple[str, str, str | None]:
    """(CLIP, aesthetic head, PickScore or None) as the Settings page names them."""
    return (settings.get("promptist_score_clip", DEFAULT_CLIP_MODEL) or DEFAULT_CLIP_MODEL,
            settings.get("promptist_score_aesthetic", DEFAULT_AESTHETIC_HEAD) or DEFAULT_AESTHETIC_HEAD,
            settings.get("promptist_score_pick", "") or None)


def loaded_scorer(preset: str) -> RewardScorer:
    opts = shared.opts.data
    device = "cpu" if opts.get("promptist_score_device", "gpu") == "cpu" else devices.device
    clip, aesthetic, pick = scorer_settings(opts)
    scorer = load_scorer(clip, aesthetic, pick_model=pick, preset=preset, models_dir=models_dirs(shared.models_path),
                         device=device)
    ready(scorer_modules(scorer), device)  # parked in RAM after the last job
    return scorer

def score_and_release(p, pp, scorer, **options) -> None:
    """Score the batch on the score device, then the models leave the GPU again (vram.after_job)."""
    opts = shared.opts.data
    ready(scorer_modules(scorer), "cpu" if opts.get("promptist_score_device", "gpu") == "cpu" else devices.device)
    try:
        score_processing(p, pp, scorer, **options)
    finally:
        after_job(opts, scorer_modules(scorer))

if IN_WEBUI:

    class PromptistScoreScript(scripts.Script):
        def title(self):
            return SCORE_TITLE

        def show(self, is_img2img):
            return scripts.AlwaysVisible

        def ui(self, is_img2img):
            with gr.Accordion(SCORE_TITLE, open=False):
                enabled = gr.Checkbox(label="Score images (scores go into the infotext)", value=False,
                                      elem_id=self.elem_id("promptist_score_enabled"))
                best_of_n = gr.Checkbox(label="Best of N: keep the best image of each batch", value=False,
                                        elem_id=self.elem_id("promptist_score_best_of_n"))
                preset = gr.Dropdown(label="Reward", choices=list(PRESET_NAMES), value="promptist",
                                     elem_id=self.elem_id("promptist_score_preset"))
            self.infotext_fields = [(preset, INFOTEXT_PRESET),
                                    (enabled, lambda params: INFOTEXT_PRESET in params),
                                    (best_of_n, lambda params: INFOTEXT_BEST_OF in params)]
            return [enabled, best_of_n, preset]

        def before_process(self, p, enabled=False, best_of_n=False, preset="promptist", *args):
            if enabled or best_of_n:
                plan(p, score_preset=preset)  # checked with the policy before either runs (job_models)

        def process(self, p, enabled=False, best_of_n=False, preset="promptist", *args):
            # Load the models before sampling: a missing model stops the job before any image is made.
            if (enabled or best_of_n) and models_ready(p, shared.opts.data, models_dirs(shared.models_path)):
                # loaded to check them; they wait in RAM while the image is sampled (vram.after_job)
                guarded(p, "loading the scoring models", lambda: setattr(p, "_promptist_scorer", loaded_scorer(preset)))
                after_job(shared.opts.data, scorer_modules(p._promptist_scorer) if hasattr(p, "_promptist_scorer")
                          else [])

        def postprocess_batch_list(self, p, pp, enabled=False, best_of_n=False, preset="promptist", *args,
                                   **kwargs):
            scorer = getattr(p, "_promptist_scorer", None)
            if not (enabled or best_of_n) or scorer is None:
                return
            guarded(p, "scoring the images", lambda: score_and_release(
                p, pp, scorer, preset=preset, best_of_n=best_of_n, batch_number=kwargs.get("batch_number", 0)),
                at=AFTER_SAMPLING)
