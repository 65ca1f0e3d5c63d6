"""Does a TPO LoRA make better images than its base model? Win rates on held-out prompts.

For every held-out prompt and seed, the base model (LoRA off) and base + LoRA draw one image each with
the SAME seed, so the only difference between the two images is the LoRA. Our scorer
(promptist_core.rewards) then gives, per pair: PickScore (when a PickScore model is loaded), the
LAION aesthetic score and CLIP relevance to the prompt. Reported: the LoRA's win rate over the base
for PickScore and aesthetics (ties count half, as in the TPO paper's pairwise win rates) with its
standard error, the mean score of each side, and mean CLIP relevance of each (a LoRA that wins on
aesthetics by ignoring the prompt shows up there).

The LoRA is loaded with `trainer.tpo.lora.load_kohya_lora` (our own module, no peft) onto the pipeline's
UNet; the base images come from the same UNet with the adapters off.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..policy.rewards import image_seed
from .lora import adapters_enabled


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
                 save_images: Path | None = None) -> dict:
    """Draw base and base + LoRA images with shared seeds and score them; returns the JSON report.

    Args:
        generator: an `ImageGenerator` whose UNet carries `loras` (trainer.tpo.lora.load_kohya_lora).
        loras: {module path: LoRALinear}, switched off for the base images.
        scorer: a `RewardScorer`; PickScore is reported when it has a PickScore model.
        save_images: a folder for `NNNN_base.png` / `NNNN_lora.png` side by side (optional).
    """
    if not prompts:
        raise ValueError("no prompts to evaluate on")
    if images_per_prompt < 1:
        raise ValueError(f"images per prompt must be at least 1; got {images_per_prompt}")
    texts, seeds = evaluation_seeds(prompts, images_per_prompt, seed)
    # 1. the same (prompt, seed) through the base (adapters off) and through base + LoRA
    with adapters_enabled(loras, False):
        base_images = generator.generate(texts, seeds, steps=steps, guidance=guidance, size=size)
    with adapters_enabled(loras, True):
        lora_images = generator.generate(texts, seeds, steps=steps, guidance=guidance, size=size)
    # 2. scores against the prompt
    base, lora = scorer.rewards(base_images, texts), scorer.rewards(lora_images, texts)
    report = {
        "prompts": len(prompts),
        "images_per_prompt": images_per_prompt,
        "pairs": len(texts),
        "seed": seed,
        "steps": steps,
        "guidance": guidance,
        "size": list(size),
        "pickscore": asdict(win_rate(lora.pick, base.pick)) if lora.pick is not None else None,
        "aesthetic": asdict(win_rate(lora.aesthetic, base.aesthetic)),
        "clip_relevance": {"base_mean": float(base.clip_cosine.mean()), "lora_mean": float(lora.clip_cosine.mean())},
        "identical_pairs": int(sum(bool(torch.equal(a, b)) for a, b in zip(base_images, lora_images, strict=True))),
    }
    if save_images is not None:
        _save_pairs(Path(save_images), base_images, lora_images)
        report["images"] = str(save_images)
    return report


def _save_pairs(folder: Path, base: torch.Tensor, lora: torch.Tensor) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, (a, b) in enumerate(zip(base, lora, strict=True)):
        for name, image in (("base", a), ("lora", b)):
            array = (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
            Image.fromarray(array).save(folder / f"{i:04d}_{name}.png")


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
    try:
        size = (int(width), int(height or width))
    except ValueError:
        raise ValueError(f"--size must be WIDTH or WIDTHxHEIGHT (e.g. 512 or 768x512); got {text!r}") from None
    return size
