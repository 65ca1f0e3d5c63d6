"""The graph's MODEL, CLIP and VAE as an `ImageGenerator`: what PPO draws its reward images with.

Encode (one conditioning entry per DF-Prompt segment, as Promptist DF-Prompt Encode does) -> sample
with `comfy.sample.sample` (the user's sampler, scheduler, steps and cfg) -> VAE decode. ComfyUI's own
functions load the models through `comfy.model_management`, so they share VRAM with the rest of the
graph and with the learner. Everything runs under `torch.inference_mode()`, as ComfyUI's own nodes
do (the host's weights are inference tensors, and its patching writes them in place), even when the
caller trains under `inference_mode(False)`; the images come back as ordinary tensors.
"""

from __future__ import annotations

import hashlib
import logging

import torch

from promptist_core.dfprompt import parse
from promptist_core.generators import check_generate_args

from .dfprompt import DFPromptEncode

logger = logging.getLogger("promptist")

try:  # the choices KSampler offers; a short list when ComfyUI is absent (tests, headless)
    from comfy.samplers import KSampler as _KSampler

    SAMPLERS, SCHEDULERS = list(_KSampler.SAMPLERS), list(_KSampler.SCHEDULERS)
except ImportError:
    SAMPLERS = ["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_sde", "ddim", "uni_pc"]
    SCHEDULERS = ["normal", "karras", "exponential", "simple", "sgm_uniform", "beta"]


class ComfyGenerator:
    """One image per (prompt, seed) from the graph's models; prompts may be DF-Prompts.

    Images of the same prompt that arrive one after another (PPO asks for N per prompt) are sampled
    as one batch of at most `batch_size`; the starting noise of each image comes from its own seed,
    so a (prompt, seed) pair always gives the same image (ancestral samplers add noise seeded by the
    batch's first seed, which is the same each time the pair is asked for).
    """

    def __init__(self, model, clip, vae, *, sampler_name: str = "euler", scheduler: str = "normal",
                 negative: str = "", batch_size: int = 4):
        if model is None or clip is None or vae is None:
            raise ValueError("the generator needs the graph's MODEL, CLIP and VAE (one of them is None)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1; got {batch_size}")
        self.model, self.clip, self.vae = model, clip, vae
        self.sampler_name, self.scheduler, self.negative = sampler_name, scheduler, negative
        self.batch_size = batch_size
        self._negative: dict[int, list] = {}  # by steps (a DF negative's timing depends on them)
        self.fingerprint = self._fingerprint()

    def _fingerprint(self) -> str:
        """Names the image source for the baseline cache (ImageReward adds steps, cfg and size): the
        sampler, scheduler, negative prompt and a hash of the UNet's first weight and of its patches
        (another checkpoint or LoRA must not reuse cached plain-prompt scores)."""
        h = hashlib.sha256(f"{self.sampler_name}\0{self.scheduler}\0{self.negative}".encode())
        with torch.inference_mode():
            inner = getattr(self.model, "model", None)
            first = next(iter(inner.parameters()), None) if isinstance(inner, torch.nn.Module) else None
            if first is not None:
                h.update(first.detach().flatten()[:4096].float().cpu().numpy().tobytes())
        patches = getattr(self.model, "patches", None) or {}
        h.update(str(sorted((k, len(v)) for k, v in patches.items())).encode())
        return h.hexdigest()[:16]

    def _encode(self, text: str, steps: int) -> list:
        """Conditioning for one prompt: a DF-Prompt gives one entry per segment (exact step timing
        for `steps`); text that is not a valid DF-Prompt (a policy may write a stray '[') is plain text."""
        try:
            parse(text)
        except ValueError as e:
            logger.debug("[promptist] encoding %r as plain text: %s", text, e)
            return self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text))
        return DFPromptEncode.run(self.clip, text, timing="steps", steps=steps)[0]

    def generate(self, prompts: list[str], seeds: list[int], *, steps: int = 20, guidance: float = 7.5,
                 size: tuple[int, int] = (512, 512)) -> torch.Tensor:
        import comfy.model_management
        import comfy.sample

        check_generate_args(prompts, seeds, steps, guidance, size)
        width, height = size
        images = []
        with torch.inference_mode():
            if steps not in self._negative:
                self._negative[steps] = self._encode(self.negative, steps)
            # 1. runs of the same prompt, cut into batches
            runs, start = [], 0
            while start < len(prompts):
                end = start + 1
                while end < len(prompts) and prompts[end] == prompts[start] and end - start < self.batch_size:
                    end += 1
                runs.append((start, end))
                start = end
            for start, end in runs:
                # 2. conditioning, starting noise from each image's own seed
                positive = self._encode(prompts[start], steps)
                latent = torch.zeros([end - start, 4, height // 8, width // 8],
                                     device=comfy.model_management.intermediate_device())
                latent = comfy.sample.fix_empty_latent_channels(self.model, latent)
                noise = torch.cat([comfy.sample.prepare_noise(latent[:1], int(s)) for s in seeds[start:end]])
                # 3. sample (no preview callback: the trainer checks Cancel between its steps) and decode
                samples = comfy.sample.sample(self.model, noise, steps, guidance, self.sampler_name, self.scheduler,
                                              positive, self._negative[steps], latent, denoise=1.0, disable_pbar=True,
                                              seed=int(seeds[start]))
                decoded = self.vae.decode(samples)
                images.append(decoded.reshape(-1, *decoded.shape[-3:]).float().clamp(0, 1).cpu())
            out = torch.cat(images)
        return out.clone()  # outside inference mode: an ordinary tensor the trainer may use freely
