"""Image generators: what a trainer or a scorer asks for images, whichever host draws them.

A trainer never owns the diffusion model; it receives an `ImageGenerator`. Headless that is
`DiffusersGenerator` (a diffusers pipeline); inside ComfyUI or A1111 an adapter over the host's model
implements the same method. Images come back in ComfyUI's IMAGE layout: float [B, H, W, C] in 0..1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from .dfprompt import MAX_STEPS

# The largest image side a generator is asked for (ComfyUI's own limit is 16384; SDXL works at 1024).
MAX_IMAGE_SIDE = 8192
MAX_GUIDANCE = 100.0  # classifier-free guidance scale (ComfyUI's cfg input goes to 100)
MAX_BATCH_SIZE = 256  # images per pipeline call


def batch_size_problem(batch_size, label: str = "batch_size") -> str | None:
    """Why `batch_size` (images per generator call) cannot be used, or None."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_BATCH_SIZE:
        return (f"{label} must be an integer between 1 and {MAX_BATCH_SIZE} (images per generator call); "
                f"got {batch_size!r}")
    return None


@runtime_checkable
class ImageGenerator(Protocol):
    def generate(self, prompts: list[str], seeds: list[int], *, steps: int, guidance: float,
                 size: tuple[int, int]) -> torch.Tensor:
        """One image per (prompt, seed): float [B, H, W, C] in 0..1; `size` is (width, height)."""
        ...


def check_generate_args(prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float,
                        size: tuple[int, int]) -> None:
    """The checks every generator makes before drawing anything."""
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    if len(seeds) != len(prompts):
        raise ValueError(f"seeds must give one seed per prompt: {len(seeds)} seeds for {len(prompts)} prompts")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be an integer between 1 and {MAX_STEPS}, got {steps!r}")
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not 0 <= guidance <= MAX_GUIDANCE:
        raise ValueError(f"guidance must be a number between 0 and {MAX_GUIDANCE:g}, got {guidance!r}")
    if len(size) != 2 or any(not isinstance(s, int) or not 8 <= s <= MAX_IMAGE_SIDE or s % 8 for s in size):
        raise ValueError(f"size must be (width, height), multiples of 8 up to {MAX_IMAGE_SIDE}, got {size!r}")


class DiffusersGenerator:
    """A diffusers SD/SDXL pipeline as an `ImageGenerator`; prompts may be DF-Prompts.

    Each image gets its own `torch.Generator` seeded with its seed, so an image depends on its
    (prompt, seed) only, not on the batch it was drawn in.
    """

    def __init__(self, pipe, *, weight_mode: str = "a1111", negative_prompt: str | None = None,
                 batch_size: int = 8):
        problem = batch_size_problem(batch_size)
        if problem:
            raise ValueError(problem)
        self.pipe = pipe
        self.weight_mode = weight_mode
        self.negative_prompt = negative_prompt
        self.batch_size = batch_size

    def generate(self, prompts: list[str], seeds: list[int], *, steps: int = 20, guidance: float = 7.5,
                 size: tuple[int, int] = (512, 512)) -> torch.Tensor:
        from .render_diffusers import generate_dfprompt

        check_generate_args(prompts, seeds, steps, guidance, size)
        device = self.pipe._execution_device
        width, height = size
        images = []
        for start in range(0, len(prompts), self.batch_size):
            batch, batch_seeds = prompts[start:start + self.batch_size], seeds[start:start + self.batch_size]
            generators = [torch.Generator(device=device).manual_seed(int(s)) for s in batch_seeds]
            out = generate_dfprompt(self.pipe, list(batch), negative_prompt=self.negative_prompt,
                                    num_inference_steps=steps, guidance_scale=guidance, weight_mode=self.weight_mode,
                                    generator=generators, height=height, width=width, output_type="pt")
            images.append(out.images.float().clamp(0, 1).permute(0, 2, 3, 1).cpu())  # [B,C,H,W] -> [B,H,W,C]
        return torch.cat(images)


# A key only SDXL-family single files have: the second text encoder (OpenCLIP ViT-bigG) of SDXL base.
SDXL_SINGLE_FILE_PREFIX = "conditioner.embedders.1."


def single_file_pipeline_class(path) -> type:
    """The diffusers pipeline for a single-file checkpoint, from its keys: SDXL-family files (SDXL, Pony,
    Illustrious, Segmind Vega, SSD-1B) have two text encoders under `conditioner.embedders`."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            sdxl = any(k.startswith(SDXL_SINGLE_FILE_PREFIX) for k in f.keys())
    except Exception as e:  # safetensors raises its own error type for a truncated or foreign file
        raise ValueError(f"{path}: not a readable .safetensors checkpoint ({e}); download or convert it again") from None
    return StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline


def load_diffusers_generator(spec: str, *, device: str | torch.device | None = "auto",
                             dtype: str | torch.dtype | None = None, config_folder: str | None = None,
                             allow_download: bool | None = None, **kwargs) -> DiffusersGenerator:
    """A `DiffusersGenerator` from what users have: a diffusers folder, a Hub id, or a single-file
    `.safetensors` checkpoint of SD 1.x/2.x or SDXL (the file kept in a host's checkpoints folder;
    `config_folder`, a local diffusers folder of the same architecture, lets it load offline). DPM-Solver++
    as the sampler."""
    from pathlib import Path

    from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

    from .devices import pick_device, pick_dtype
    from .quiet import no_fp32_cast_note
    from .weights import WeightsNotFoundError, downloads_allowed

    problem = batch_size_problem(kwargs["batch_size"]) if "batch_size" in kwargs else None
    if problem:  # before the pipeline loads
        raise ValueError(problem)
    target = pick_device(device)
    torch_dtype = pick_dtype(target, dtype)
    local_only = not downloads_allowed(allow_download)
    path = Path(spec).expanduser()
    common = {"torch_dtype": torch_dtype, "safety_checker": None, "requires_safety_checker": False}
    try:
        with no_fp32_cast_note():  # diffusers' note, printed for each component a single-file load casts
            if path.is_file():
                if path.suffix != ".safetensors":
                    raise ValueError(f"{path}: a single-file checkpoint must be .safetensors (.ckpt files are pickles "
                                     "and are not loaded; convert it)")
                extra = {"config": config_folder} if config_folder else {}
                pipeline_class = single_file_pipeline_class(path)
                if pipeline_class.__name__ == "StableDiffusionXLPipeline":  # takes no safety checker
                    common = {"torch_dtype": torch_dtype}
                pipe = pipeline_class.from_single_file(str(path), local_files_only=local_only, **extra, **common)
            elif path.is_dir():
                if not (path / "model_index.json").is_file():
                    raise ValueError(f"{path} is not a diffusers folder (no model_index.json)")
                pipe = DiffusionPipeline.from_pretrained(str(path), **common)
            elif spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
                pipe = DiffusionPipeline.from_pretrained(spec, local_files_only=local_only, **common)
            else:
                raise WeightsNotFoundError(f"Stable Diffusion model {spec!r} not found: give a diffusers folder, a Hub "
                                           "id (owner/name), or a .safetensors checkpoint file")
    except OSError as e:  # not in the cache and not downloadable, or a broken file
        raise WeightsNotFoundError(f"Stable Diffusion model {spec!r} could not be loaded: {str(e).splitlines()[0]}. "
                                   "Give a local diffusers folder or .safetensors file (with --sd-config for a "
                                   "single file offline).") from None
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    pipe.set_progress_bar_config(disable=True)
    pipe.to(target)
    generator = DiffusersGenerator(pipe, **kwargs)
    generator.fingerprint = f"{spec}:{torch_dtype}"
    return generator
