"""Does a TPO LoRA make better images than its base model? Win rates on held-out prompts.

This is `trainer.evaluate` with two variants: `base` (the model with the LoRA off) and `lora` (base + LoRA),
every (prompt, seed) drawn by both with the SAME seed, so the only difference between the two images of a
pair is the LoRA. Our scorer (promptist_core.rewards) gives, per image: PickScore (when a PickScore model
is loaded), the LAION aesthetic score and CLIP relevance to the prompt. Reported, in the JSON tpo-eval has
always printed: the LoRA's win rate over the base for PickScore and aesthetics (ties count half, as in the
TPO paper's pairwise win rates) with its standard error, the mean score of each side, and mean CLIP
relevance of each (a LoRA that wins on aesthetics by ignoring the prompt shows up there); plus the 95%
Wilson interval over prompts that `trainer.evaluate` gives every win rate.

The LoRA is loaded with `trainer.tpo.lora.load_kohya_lora` (our own module, no peft) onto the pipeline's
UNet; the base images come from the same UNet with the adapters off.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..evaluate import PLAIN, Variant, evaluate
from ..policy.rewards import image_seed


@dataclass(frozen=True)
class WinRate:
    """How often the LoRA's image beats the base image of the same (prompt, seed)."""

    win_rate: float  # wins + ties / 2, over pairs
    stderr: float  # binomial standard error of the win rate
    wins: int
    ties: int
    losses: int
    base_mean: float
    lora_mean: float


def win_rate(lora: torch.Tensor, base: torch.Tensor, *, tie: float = 1e-6) -> WinRate:
    """Pairwise win rate of `lora` over `base` (two score tensors of the same pairs)."""
    if lora.shape != base.shape or lora.numel() == 0:
        raise ValueError(f"win rate needs two score lists of one length; got {tuple(lora.shape)} and "
                         f"{tuple(base.shape)}")
    diff = lora.double() - base.double()
    wins, losses = int((diff > tie).sum()), int((diff < -tie).sum())
    n = diff.numel()
    ties = n - wins - losses
    rate = (wins + ties / 2) / n
    return WinRate(rate, math.sqrt(rate * (1 - rate) / n), wins, ties, losses, float(base.mean()),
                   float(lora.mean()))


def evaluation_seeds(prompts: Sequence[str], images_per_prompt: int, seed: int) -> tuple[list[str], list[int]]:
    """(prompt, seed) for every image: the same seed for the base and the LoRA image of a pair."""
    pairs = [(p, image_seed(p, k, seed)) for p in prompts for k in range(images_per_prompt)]
    return [p for p, _ in pairs], [s for _, s in pairs]


def compare_lora(generator, loras: dict, scorer, prompts: Sequence[str], *, images_per_prompt: int = 1,
                 seed: int = 0, steps: int = 25, guidance: float = 7.5, size: tuple[int, int] = (512, 512),
                 save_images: Path | None = None, out: Path | None = None) -> dict:
    """Draw base and base + LoRA images with shared seeds and score them; returns the JSON report.

    Args:
        generator: an `ImageGenerator` whose UNet carries `loras` (trainer.tpo.lora.load_kohya_lora).
        loras: {module path: LoRALinear}, switched off for the base images.
        scorer: a `RewardScorer`; PickScore is reported when it has a PickScore model.
        save_images: a folder for `NNNN_base.png` / `NNNN_lora.png` side by side (optional).
        out: a folder for the evaluation's results.csv, summary.json, grid.png and report.html (optional).
    """
    if not prompts:
        raise ValueError("no prompts to evaluate on")
    if images_per_prompt < 1:
        raise ValueError(f"images per prompt must be at least 1; got {images_per_prompt}")
    sink = _pair_saver(Path(save_images), images_per_prompt) if save_images is not None else None
    # 1. the same (prompt, seed) through the base (adapters off) and through base + LoRA, scored
    result = evaluate(prompts, [Variant(PLAIN), Variant("lora", lora=loras)], generator, scorer, images_per_prompt,
                      seed=seed, steps=steps, guidance=guidance, size=size, metric="aesthetic", image_sink=sink)
    # 2. the tpo-eval report: per-pair win rates (standard error) and each side's means
    rows = {name: [r for r in result.records if r.variant == name] for name in (PLAIN, "lora")}

    def scores(name: str, key: str) -> torch.Tensor:
        return torch.tensor([r.scores[key] for r in rows[name]], dtype=torch.float64)

    lora_summary = result.summary("lora")

    def with_interval(key: str) -> dict:
        w = lora_summary.win_vs_plain[key]
        return {**asdict(win_rate(scores("lora", key), scores(PLAIN, key))), "ci95": [w.low, w.high]}

    report = {
        "prompts": len(result.prompts),
        "images_per_prompt": images_per_prompt,
        "pairs": len(rows[PLAIN]),
        "seed": seed,
        "steps": steps,
        "guidance": guidance,
        "size": list(size),
        "pickscore": with_interval("pick") if "pick" in result.metrics else None,
        "aesthetic": with_interval("aesthetic"),
        "clip_relevance": {"base_mean": float(scores(PLAIN, "clip_cosine").mean()),
                           "lora_mean": float(scores("lora", "clip_cosine").mean())},
        "identical_pairs": lora_summary.identical_to_plain,
    }
    if save_images is not None:
        report["images"] = str(save_images)
    if out is not None:
        from .evaluate import write_outputs

        report["outputs"] = {k: str(v) for k, v in write_outputs(result, out).items()}
    return report


def _pair_saver(folder: Path, images_per_prompt: int):
    from PIL import Image

    def sink(records, images) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for rec, image in zip(records, images, strict=True):
            array = (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
            side = "base" if rec.variant == PLAIN else "lora"
            Image.fromarray(array).save(folder / f"{rec.prompt_index * images_per_prompt + rec.seed_index:04d}_{side}.png")

    return sink


def held_out_prompts(spec: str | Path, *, column: str = "prompt", limit: int | None = None) -> list[str]:
    """Prompts to evaluate on: a prompt file (read like a corpus), or a TPO data folder (its `valid`
    captions: prompts the LoRA never trained on)."""
    from ..policy.corpus import CorpusError, read_corpus
    from .data import pairs_file, read_tpo_data

    path = Path(spec).expanduser()
    if path.is_dir():
        captions = list(dict.fromkeys(i.caption for i in read_tpo_data(path, check_images=False)
                                      if i.split == "valid"))
        if not captions:
            raise CorpusError(pairs_file(path), "no 'valid' items to evaluate on; build the data with "
                                                "--valid-fraction above 0, or pass a prompt file")
        return captions[:limit] if limit else captions
    return read_corpus(path, column=column, limit=limit).prompts


def parse_size(text: str) -> tuple[int, int]:
    """`512` or `768x512` (width x height) -> (width, height)."""
    width, _, height = text.lower().partition("x")
    from promptist_core.generators import MAX_IMAGE_SIDE

    try:
        size = (int(width), int(height or width))
    except ValueError:
        raise ValueError(f"--size must be WIDTH or WIDTHxHEIGHT (e.g. 512 or 768x512); got {text!r}") from None
    if any(not 8 <= side <= MAX_IMAGE_SIDE or side % 8 for side in size):
        raise ValueError(f"--size: width and height must be multiples of 8 between 8 and {MAX_IMAGE_SIDE}; "
                         f"got {text!r}")
    return size
