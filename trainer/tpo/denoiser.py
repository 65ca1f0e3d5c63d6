"""What the TPO trainer needs of a diffusion model: the `Denoiser` protocol, and its diffusers implementation.

A trainer never owns the diffusion model (DESIGN.md). TPO asks a denoiser to encode captions and images,
noise latents, predict the noise with or without its LoRA, hand over the LoRA's parameters and save
them. Headless that is `DiffusersDenoiser` (SD 1.x, 2.x, SDXL); inside ComfyUI an adapter over the graph's
MODEL/CLIP/VAE implements the same few members, so the same `train_tpo` loop runs on both.

The losses compare `predict` with `target` in the model's own prediction space: epsilon (the noise) for SD
1.x/2.x/SDXL (a v-prediction model's output is converted to it, so the errors mean the same on every UNet),
the flow velocity `noise - x_0` for flow-matching models (SD3: `DiffusersFlowDenoiser`), whose `add_noise`
is the matching interpolation x_t = (1 - sigma) x_0 + sigma noise. A model of another kind is refused
when the denoiser is built, before any step.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from promptist_core.fingerprint import weights_fingerprint
from promptist_core.quiet import no_fp32_cast_note

from .lora import DEFAULT_TARGETS, TRANSFORMER_PREFIX, adapters_enabled, attach_lora, save_kohya_lora
from .lora_layout import LAYOUT_METADATA_KEY, UNetLayout


@runtime_checkable
class Denoiser(Protocol):
    """A diffusion model with a trainable LoRA, seen from the TPO trainer.

    Tensors the trainer passes are on `device`; latents and noise are float32 [B, C, h, w]; timesteps are
    int64 [B] in 0 .. num_train_timesteps - 1. `cond` is whatever `encode_text` returns: the trainer only
    passes it back to `predict`, for a batch of the same size in the same order."""

    num_train_timesteps: int
    device: torch.device
    latents_fingerprint: str  # names the image encoder (and its settings): latents cached under it

    def encode_text(self, texts: list[str]) -> Any:
        """Conditioning for each caption (frozen text encoder, no gradient)."""
        ...

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Latents of images float [B, H, W, C] in 0..1 (ComfyUI's IMAGE layout), scaled as the UNet expects."""
        ...

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t in the model's training noising: sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise (DDPM), or
        (1 - sigma_t) x_0 + sigma_t noise (flow matching, sigma_t as the model samples it)."""
        ...

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What `predict` should return for `add_noise(latents, noise, timesteps)`: the noise (epsilon models,
        and v-prediction ones, whose output `predict` converts), or the velocity noise - latents (flow)."""
        ...

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Any) -> torch.Tensor:
        """The model's prediction for `noisy`, in the space of `target`, with the LoRA as `adapters` sets it."""
        ...

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The LoRA parameters, always in the same order (checkpoints store them by position)."""
        ...

    def adapters(self, enabled: bool) -> contextlib.AbstractContextManager:
        """Context manager: inside, predictions use the LoRA (True) or the base model (False, the reference)."""
        ...

    def save_lora(self, path: Path | str, metadata: dict, *, dtype: torch.dtype = torch.float16) -> Path:
        """Write the LoRA as a kohya-format .safetensors file (atomically) with tensors in `dtype` (fp16 as
        kohya, or fp32); `metadata` joins the file's own."""
        ...


@dataclass
class TextCond:
    """Conditioning of a diffusers UNet: token states, plus SDXL's pooled text embedding."""

    hidden: torch.Tensor  # [B, 77, D]
    pooled: torch.Tensor | None = None  # [B, P], SDXL only


class DiffusersDenoiser:
    """A diffusers UNet2DConditionModel with our LoRA on its attention projections, as a `Denoiser`.

    Built from the parts of a pipeline (`from_pipeline`, or `load_diffusers_denoiser` for what users have);
    `vae` and the tokenizers may be None for work in latent space. The base model is frozen; only the LoRA
    (fp32) trains. SDXL needs its second text encoder: the pooled embedding and the six size/crop time
    ids (original size = target size = the latents' image size, no crop) go in `added_cond_kwargs`."""

    def __init__(self, unet, noise_scheduler, text_encoder, tokenizer, *, vae=None, text_encoder_2=None,
                 tokenizer_2=None, rank: int = 8, alpha: float | None = None,
                 targets: Iterable[str] = DEFAULT_TARGETS, gradient_checkpointing: bool = False, base_model: str = "",
                 base_hash: Callable[[], str | None] | None = None):
        self.unet, self.vae = unet, vae
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.scheduler = noise_scheduler
        self.prediction_type = noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction type {self.prediction_type!r} is not supported (epsilon or v_prediction)")
        self.num_train_timesteps = int(noise_scheduler.config.num_train_timesteps)
        self.sdxl = unet.config.addition_embed_type == "text_time"
        if unet.config.addition_embed_type not in (None, "text_time"):
            raise NotImplementedError(f"UNet with addition_embed_type {unet.config.addition_embed_type!r} is not "
                                      "supported: TPO trains SD 1.x, 2.x and SDXL UNets")
        if self.sdxl:
            if text_encoder_2 is None:
                raise ValueError("an SDXL UNet needs its second text encoder (text_encoder_2) for the pooled embedding")
            pooled = text_encoder_2.config.projection_dim
            time_ids = (unet.config.projection_class_embeddings_input_dim - pooled) // unet.config.addition_time_embed_dim
            if time_ids != 6:
                raise NotImplementedError(f"this SDXL UNet takes {time_ids} time ids (a refiner?); only the SDXL base "
                                          "(6: original size, crop, target size) is supported")
        self.device = unet.device
        for part in (unet, vae, text_encoder, text_encoder_2):
            if part is not None:
                part.requires_grad_(False)
                part.eval()
        self.loras = attach_lora(unet, rank, alpha if alpha is not None else rank, targets)
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            unet.train()  # diffusers checkpoints only in training mode; SD UNets have no dropout
        self.base_model = base_model
        self._base_hash = base_hash
        self._latents_fingerprint: str | None = None
        self._alphas_cumprod = noise_scheduler.alphas_cumprod.to(self.device, torch.float32)
        self._vae_scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8

    @classmethod
    def from_pipeline(cls, pipe, **kwargs) -> DiffusersDenoiser:
        """From a loaded StableDiffusion(XL)Pipeline; its scheduler's config gives the training noise schedule."""
        from diffusers import DDPMScheduler

        return cls(pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config), pipe.text_encoder, pipe.tokenizer,
                   vae=pipe.vae, text_encoder_2=getattr(pipe, "text_encoder_2", None),
                   tokenizer_2=getattr(pipe, "tokenizer_2", None), **kwargs)

    # --- the Denoiser protocol -----------------------------------------------------------------------

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> TextCond:
        if not self.sdxl:
            return TextCond(self.text_encoder(self._tokens(self.tokenizer, texts))[0])
        # SDXL: both encoders' penultimate states side by side; the pooled embedding of the second
        first = self.text_encoder(self._tokens(self.tokenizer, texts), output_hidden_states=True)
        second = self.text_encoder_2(self._tokens(self.tokenizer_2 or self.tokenizer, texts), output_hidden_states=True)
        return TextCond(torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1), second[0])

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            raise ValueError("this denoiser has no VAE: give latents, not images")
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be float [B, H, W, 3] in 0..1; got shape {tuple(images.shape)}")
        dtype = self.vae.dtype
        upcast = dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False)  # SDXL's VAE overflows
        if upcast:
            with no_fp32_cast_note():  # diffusers' note on every cast: not the user's concern
                self.vae.to(torch.float32)
        try:
            pixels = images.permute(0, 3, 1, 2).to(self.device, self.vae.dtype) * 2 - 1
            # The distribution's mean, not a sample: latents are cached once and must not depend on a draw.
            latents = self.vae.encode(pixels).latent_dist.mean.float()
        finally:
            if upcast:
                with no_fp32_cast_note():
                    self.vae.to(dtype)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        a = self._alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        return a.sqrt() * latents + (1 - a).sqrt() * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return noise  # predict returns epsilon, also for v-prediction

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: TextCond) -> torch.Tensor:
        dtype = self.unet.dtype
        extra = {}
        if self.sdxl:
            height, width = (s * self._vae_scale for s in noisy.shape[-2:])
            time_ids = torch.tensor([height, width, 0, 0, height, width], device=noisy.device, dtype=dtype)
            extra["added_cond_kwargs"] = {"text_embeds": cond.pooled.to(dtype),
                                          "time_ids": time_ids.expand(noisy.shape[0], 6)}
        out = self.unet(noisy.to(dtype), timesteps, encoder_hidden_states=cond.hidden.to(dtype), **extra).sample
        if self.prediction_type == "v_prediction":  # v = a eps - s x0  =>  eps = a v + s x_t
            a = self._alphas_cumprod[timesteps].view(-1, 1, 1, 1)
            out = a.sqrt() * out.float() + (1 - a).sqrt() * noisy.float()
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, lora in sorted(self.loras.items()) for p in (lora.down.weight, lora.up.weight)]

    def adapters(self, enabled: bool) -> contextlib.AbstractContextManager:
        return adapters_enabled(self.loras, enabled)

    def save_lora(self, path: Path | str, metadata: dict, *, dtype: torch.dtype = torch.float16) -> Path:
        return save_kohya_lora(path, self.loras, {**self.base_metadata(), **metadata}, dtype=dtype)

    @property
    def latents_fingerprint(self) -> str:
        """sha256 (16 hex digits) of the VAE's class, config and weights: a cache of latents is reused only
        for the same encoder ("no-vae" without one: such a denoiser takes latents, never images)."""
        if self.vae is None:
            return "no-vae"
        if self._latents_fingerprint is None:
            config = json.dumps(dict(self.vae.config), sort_keys=True, default=str)
            self._latents_fingerprint = weights_fingerprint([type(self.vae).__name__, config], self.vae)
        return self._latents_fingerprint

    # --- helpers ---------------------------------------------------------------------------------------

    def base_metadata(self) -> dict[str, str]:
        """kohya/modelspec metadata naming the base model this LoRA was trained on."""
        width = self.unet.config.cross_attention_dim
        version = "sdxl_base_v1-0" if self.sdxl else ("sd_v2" if width == 1024 else "sd_v1")
        arch = "stable-diffusion-xl-v1-base" if self.sdxl else ("stable-diffusion-v2" if width == 1024 else
                                                                "stable-diffusion-v1")
        meta = {"ss_base_model_version": version, "ss_v2": str(width == 1024 and not self.sdxl),
                "ss_sd_model_name": self.base_model, "modelspec.architecture": f"{arch}/lora",
                "modelspec.sai_model_spec": "1.0.0",
                LAYOUT_METADATA_KEY: UNetLayout.from_diffusers_config(self.unet.config).to_json()}
        model_hash = self._base_hash() if self._base_hash is not None else None
        if model_hash:
            meta["ss_sd_model_hash"] = model_hash
        return meta

    def _tokens(self, tokenizer, texts: list[str]) -> torch.Tensor:
        return tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(self.device)


def flow_sigmas(num_train_timesteps: int, shift: float) -> torch.Tensor:
    """sigma_t for timestep index t = 0 .. N-1 of a flow-matching model: the shifted s = (t + 1) / N,
    shift * s / (1 + (shift - 1) * s), as ComfyUI's ModelSamplingDiscreteFlow and diffusers'
    FlowMatchEulerDiscreteScheduler (reversed) define it; timestep N-1 is pure noise (sigma 1)."""
    s = torch.arange(1, num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    return (shift * s / (1 + (shift - 1) * s)).float()


class DiffusersFlowDenoiser(DiffusersDenoiser):
    """A diffusers SD3Transformer2DModel (flow matching) with our LoRA on its attention projections.

    Built from a StableDiffusion3Pipeline: captions are encoded by the pipeline's own `encode_prompt` (CLIP-L,
    CLIP-G and, when present, T5: token states and the pooled vector); the noising is the flow
    interpolation with the scheduler's shift, the prediction and target the velocity noise - x_0. The
    transformer takes the timestep as sigma * N (the pipeline's convention). The LoRA file uses
    `lora_transformer_<diffusers path>` names, which ComfyUI's LoraLoader maps for SD3."""

    def __init__(self, pipe, *, rank: int = 8, alpha: float | None = None, targets: Iterable[str] = DEFAULT_TARGETS,
                 gradient_checkpointing: bool = False, base_model: str = "",
                 base_hash: Callable[[], str | None] | None = None, max_sequence_length: int = 256):
        transformer = getattr(pipe, "transformer", None)
        kind = type(transformer).__name__
        if kind != "SD3Transformer2DModel":
            raise NotImplementedError(f"TPO does not train {type(pipe).__name__} ({kind}): flow-matching models "
                                      "supported headless are SD3 (SD3Transformer2DModel)")
        config = pipe.scheduler.config
        if config.get("use_dynamic_shifting"):
            raise NotImplementedError(f"{type(pipe.scheduler).__name__} with use_dynamic_shifting (resolution-"
                                      "dependent shift) is not supported by TPO; use a fixed shift")
        self.pipe, self.unet, self.vae = pipe, transformer, pipe.vae
        self.scheduler = pipe.scheduler
        self.prediction_type = "flow"
        self.sdxl = False
        self.num_train_timesteps = int(config.num_train_timesteps)
        self.device = transformer.device
        for part in (transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2,
                     getattr(pipe, "text_encoder_3", None)):
            if part is not None:
                part.requires_grad_(False)
                part.eval()
        self.loras = attach_lora(transformer, rank, alpha if alpha is not None else rank, targets)
        if gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
            transformer.train()
        self.base_model, self._base_hash = base_model, base_hash
        self._latents_fingerprint: str | None = None
        self._sigmas = flow_sigmas(self.num_train_timesteps, float(config.get("shift", 1.0))).to(self.device)
        self.max_sequence_length = max_sequence_length  # T5 tokens (zeros without T5), as the pipeline's default

    @classmethod
    def from_pipeline(cls, pipe, **kwargs) -> DiffusersFlowDenoiser:
        return cls(pipe, **kwargs)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> TextCond:
        hidden, _, pooled, _ = self.pipe.encode_prompt(list(texts), None, None, device=self.device,
                                                       do_classifier_free_guidance=False,
                                                       max_sequence_length=self.max_sequence_length)
        return TextCond(hidden.float(), pooled.float())

    def _sigma(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self._sigmas.to(timesteps.device)[timesteps].view(-1, 1, 1, 1)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sigma = self._sigma(timesteps)
        return (1 - sigma) * latents + sigma * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return noise - latents

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: TextCond) -> torch.Tensor:
        dtype = self.unet.dtype
        t = self._sigma(timesteps).flatten() * self.num_train_timesteps
        return self.unet(hidden_states=noisy.to(dtype), timestep=t.to(dtype), encoder_hidden_states=cond.hidden.to(dtype),
                         pooled_projections=cond.pooled.to(dtype), return_dict=False)[0]

    def save_lora(self, path: Path | str, metadata: dict, *, dtype: torch.dtype = torch.float16) -> Path:
        return save_kohya_lora(path, self.loras, {**self.base_metadata(), **metadata}, dtype=dtype,
                               prefix=TRANSFORMER_PREFIX)

    def base_metadata(self) -> dict[str, str]:
        meta = {"ss_base_model_version": "sd3", "ss_sd_model_name": self.base_model,
                "modelspec.architecture": "stable-diffusion-v3-medium/lora", "modelspec.sai_model_spec": "1.0.0"}
        model_hash = self._base_hash() if self._base_hash is not None else None
        if model_hash:
            meta["ss_sd_model_hash"] = model_hash
        return meta


def denoiser_from_pipeline(pipe, **kwargs) -> DiffusersDenoiser:
    """The denoiser for a loaded pipeline: a UNet one (SD 1.x, 2.x, SDXL) or a flow one (SD3); any other
    model is refused here, in one line naming it, before any training step."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None:
        return DiffusersFlowDenoiser.from_pipeline(pipe, **kwargs)
    if getattr(pipe, "unet", None) is None:
        raise NotImplementedError(f"TPO does not train {type(pipe).__name__}: it needs a UNet (SD 1.x, 2.x, SDXL) "
                                  "or an SD3 transformer")
    return DiffusersDenoiser.from_pipeline(pipe, **kwargs)


def _weights_hash(spec: str) -> Callable[[], str | None]:
    """The base model's sha256 (A1111 shows its first 10 digits), computed once when first asked: of the
    checkpoint file, or of a diffusers folder's UNet weights; None for a Hub id."""
    from promptist_core.weights import sha256_of

    cache: list[str | None] = []

    def compute() -> str | None:
        if not cache:
            path = Path(spec).expanduser()
            files = [path] if path.is_file() else sorted((path / "unet").glob("*.safetensors")) if path.is_dir() else []
            cache.append(sha256_of(files[0]) if files else None)
        return cache[0]

    return compute


def load_diffusers_denoiser(spec: str, *, device: str | torch.device | None = "auto",
                            dtype: str | torch.dtype | None = None, config_folder: str | None = None,
                            allow_download: bool | None = None, **kwargs) -> DiffusersDenoiser:
    """A `DiffusersDenoiser` from a diffusers folder, a Hub id or a single-file .safetensors checkpoint,
    loaded by the same code as the image generators (`promptist_core.generators.load_diffusers_generator`);
    `kwargs` go to `DiffusersDenoiser` (rank, alpha, targets, gradient_checkpointing)."""
    from promptist_core.generators import load_diffusers_generator

    pipe = load_diffusers_generator(spec, device=device, dtype=dtype, config_folder=config_folder,
                                    allow_download=allow_download).pipe
    return denoiser_from_pipeline(pipe, base_model=Path(spec).name if Path(spec).exists() else spec,
                                  base_hash=_weights_hash(spec), **kwargs)
