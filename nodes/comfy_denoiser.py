"""The TPO `Denoiser` over a ComfyUI graph's MODEL, CLIP and VAE.

Inside ComfyUI the trainer never owns the UNet: it trains a clone of the graph's MODEL (a ModelPatcher)
that carries our LoRA as weight wrappers (`ModelPatcher.add_weight_wrapper`, as ComfyUI's own
TrainLoraNode does). ComfyUI applies a wrapper to a Linear's weight at every forward
(W + up @ down * alpha / rank), only on the clone that holds it, and keeps managing the model's memory
as usual; the original MODEL is untouched.

Noise follows the DDPM schedule the model was trained with (alpha_bar = 1 / (1 + sigma^2) from
`model_sampling.sigmas`); predictions go through `model.apply_model`, which returns the denoised
latent for EPS and v-prediction models alike, and are converted back to epsilon, so the errors match
the diffusers path. The LoRA is saved under kohya names of the *diffusers* module paths
(`comfy.utils.unet_to_diffusers` maps ComfyUI's ldm paths), the one key format ComfyUI, A1111 and
diffusers all load.

SD3 (a CONST, flow-matching MODEL) is trained in its own prediction space: x_t = (1 - sigma) x_0 + sigma eps
with the MODEL's ModelSamplingDiscreteFlow sigmas (its shift, also one set by ModelSamplingSD3), target the
velocity eps - x_0, which `(x - denoised) / sigma` gives back from `apply_model`. Its LoRA sits on the
MMDiT's fused qkv weights as row slices (diffusers' to_q/to_k/to_v) and is saved as `lora_transformer_*`,
the names ComfyUI's LoraLoader maps for SD3. Other prediction kinds and flow models are refused by
`check_supported`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from promptist_core.fingerprint import weights_fingerprint

from . import comfy_host

# trainer.* is imported where used: a foreign package named `trainer` must not stop the pack from loading
# (the entry point then reports training as unavailable).
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # = trainer.tpo.lora.DEFAULT_TARGETS
TEXT_CACHE_LIMIT = 65536  # encoded captions kept (77 x 768 floats each for SD 1.x)


class WeightLoRA(nn.Module):
    """A LoRA as a weight function: `weight -> weight + up @ down * alpha / rank` (fp32 factors, cast to
    the weight's type). Same parameters, initialisation and kohya tensors as trainer.tpo.lora.LoRALinear."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float, device: torch.device):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1; got {rank}")
        self.rank, self.alpha = int(rank), float(alpha)
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.up = nn.Linear(rank, out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        self.enabled = True

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        delta = (self.up.weight.to(weight.device) @ self.down.weight.to(weight.device)) * (self.alpha / self.rank)
        return weight + delta.to(weight.dtype)


@dataclass
class ComfyCond:
    """Token states [B, L, D] of each caption and, for models that take it (SDXL), the pooled embedding."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None


def diffusers_module_names(base_model) -> dict[str, str]:
    """ComfyUI ldm module path (`input_blocks.1.1.transformer_blocks.0.attn1.to_q`) -> diffusers path
    (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`), from `comfy.utils.unet_to_diffusers`."""
    import comfy.utils

    unet_config = base_model.model_config.unet_config
    names = {}
    for diffusers_key, ldm_key in comfy.utils.unet_to_diffusers(unet_config).items():
        if diffusers_key.endswith(".weight") and ldm_key.endswith(".weight"):
            names[ldm_key[:-len(".weight")]] = diffusers_key[:-len(".weight")]
    return names


def _lcm_length(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Token states of different lengths (prompts over 75 tokens) repeated to a common length, as
    ComfyUI's CONDCrossAttn.concat does, so a batch can be stacked."""
    lengths = {t.shape[1] for t in tensors}
    if len(lengths) == 1:
        return tensors
    common = math.lcm(*lengths)
    return [t.repeat(1, common // t.shape[1], 1) for t in tensors]


def trainable_copies(module: nn.Module) -> int:
    """Inference tensors of `module` swapped for normal copies (trainer.tpo.host_unet.trainable_copies):
    ComfyUI loads models under `torch.inference_mode()`, and such tensors cannot be saved for backward."""
    from trainer.tpo.host_unet import trainable_copies as swap

    return swap(module)


PREDICTIONS = ("EPS", "V_PREDICTION", "EDM", "X0", "IMG_TO_IMG", "CONST", "COSMOS_RFLOW")  # comfy.model_sampling
FLOW_MODELS = ("SD3",)  # comfy.model_base classes of the flow models TPO trains


def prediction_kind(sampling) -> str | None:
    """The comfy.model_sampling prediction mixin of `sampling` (its most derived one: "V_PREDICTION" for a
    v model, "CONST" for flow matching), by class name; None when it has none of them."""
    return next((c.__name__ for c in type(sampling).__mro__ if c.__name__ in PREDICTIONS), None)


def model_sampling(model):
    """The sampling the graph samples MODEL with (ModelSamplingSD3 and the like set it as an object patch)."""
    get_object = getattr(model, "get_model_object", None)
    return get_object("model_sampling") if get_object is not None else model.model.model_sampling


def check_supported(model) -> str | None:
    """MODEL's prediction kind (`prediction_kind`), or a one-line refusal naming a model TPO has no loss for:
    epsilon and v-prediction UNets (SD 1.x, 2.x, SDXL) and SD3's flow matching are covered; EDM, x0, Cosmos,
    Flux and other flow models are not. Cheap: the node calls it before drawing or encoding anything."""
    base_model, sampling = model.model, model_sampling(model)
    prediction = prediction_kind(sampling)
    kinds = [c.__name__ for c in type(base_model).__mro__]
    if prediction in (None, "EPS", "V_PREDICTION") or (prediction == "CONST" and any(k in FLOW_MODELS for k in kinds)):
        return prediction
    raise ValueError(f"TPO does not train {type(base_model).__name__} models ({type(sampling).__name__}, {prediction} "
                     "prediction): it trains epsilon and v-prediction UNets (SD 1.x, 2.x, SDXL) and SD3 (flow)")


class RowSlicedLoRA(nn.Module):
    """Several LoRAs on row slices of one weight (SD3's fused qkv: to_q, to_k, to_v): `weight -> weight +
    [delta_q; delta_k; delta_v]`, zeros where no LoRA sits."""

    def __init__(self, out_features: int, rows: list[tuple[int, WeightLoRA]]):
        super().__init__()
        self.out_features = out_features
        self.offsets = [offset for offset, _ in rows]
        self.parts = nn.ModuleList(lora for _, lora in rows)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        blocks, end = [], 0
        for offset, lora in zip(self.offsets, self.parts, strict=True):
            if offset > end:
                blocks.append(weight.new_zeros(offset - end, weight.shape[1]))
            size = lora.up.weight.shape[0]
            blocks.append(lora(weight.new_zeros(size, weight.shape[1])))  # its delta (zeros when disabled)
            end = offset + size
        if end < weight.shape[0]:
            blocks.append(weight.new_zeros(weight.shape[0] - end, weight.shape[1]))
        return weight + torch.cat(blocks)


class ComfyDenoiser:
    """A clone of ComfyUI's MODEL with our LoRA on its attention projections, as a TPO `Denoiser`."""

    def __init__(self, model, clip, vae, *, rank: int = 8, alpha: float | None = None,
                 targets: Iterable[str] = DEFAULT_TARGETS, device: torch.device | None = None):
        self.patcher = model.clone()
        self.clip, self.vae = clip, vae
        self.base = self.patcher.model
        sampling = model_sampling(self.patcher)
        self.prediction = check_supported(self.patcher)
        self.flow = self.prediction == "CONST"
        sigmas = getattr(sampling, "sigmas", None)
        if sigmas is None or sigmas.ndim != 1 or len(sigmas) < 2:
            raise ValueError(f"TPO trains SD 1.x, 2.x, SDXL (discrete-timestep UNet) and SD3 models; this MODEL "
                             f"samples with {type(sampling).__name__}, which has no discrete noise schedule")
        self.device = device or comfy_host.load_device()
        self._sigmas = sigmas.detach().float().to(self.device).clone()
        self._alphas_cumprod = 1.0 / (1.0 + self._sigmas ** 2)
        self.num_train_timesteps = len(self._sigmas)
        targets = tuple(targets)
        alpha = float(alpha if alpha is not None else rank)
        self.base.requires_grad_(False)
        self.loras: dict[str, WeightLoRA] = {}  # diffusers path -> LoRA
        if self.flow:
            self._attach_transformer_loras(targets, rank, alpha)
        else:
            self._attach_unet_loras(targets, rank, alpha)
        if not self.loras:
            raise ValueError(f"no Linear layer of the diffusion model ends with any of {', '.join(targets)}")
        self._texts: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._latents_fingerprint: str | None = None

    def _attach_unet_loras(self, targets: tuple[str, ...], rank: int, alpha: float) -> None:
        """One weight wrapper per targeted Linear of the UNet, saved under its diffusers path."""
        names = diffusers_module_names(self.base)
        if not names:
            raise ValueError(f"{type(self.base).__name__} is not a UNet model (SD 1.x, 2.x, SDXL): TPO's LoRA "
                             "targets its attention projections")
        for path, module in self.base.diffusion_model.named_modules():
            if not isinstance(module, nn.Linear) or not any(path == t or path.endswith("." + t) for t in targets):
                continue
            if path not in names:
                raise ValueError(f"no diffusers name for ComfyUI module {path}: cannot save a LoRA for it that "
                                 "A1111 and diffusers load")
            lora = WeightLoRA(module.out_features, module.in_features, rank, alpha, self.device)
            self.patcher.add_weight_wrapper(f"diffusion_model.{path}.weight", lora)
            self.loras[names[path]] = lora

    def _attach_transformer_loras(self, targets: tuple[str, ...], rank: int, alpha: float) -> None:
        """SD3's MMDiT: `targets` name diffusers SD3Transformer2DModel modules (`transformer_blocks.0.attn.to_q`);
        ComfyUI fuses q, k and v into one `qkv` Linear, so each of them is a LoRA on a row slice of that weight
        (the slices `comfy.utils.mmdit_to_diffusers` gives, which ComfyUI's LoraLoader applies them to)."""
        import comfy.utils

        slices: dict[str, list[tuple[int, int, str]]] = {}
        mapping = comfy.utils.mmdit_to_diffusers(self.base.model_config.unet_config, output_prefix="")
        for diffusers_key, to in mapping.items():
            path = diffusers_key[:-len(".weight")]
            if not diffusers_key.endswith(".weight") or not any(path == t or path.endswith("." + t) for t in targets):
                continue
            ldm_key, (offset, size) = (to, (0, None)) if isinstance(to, str) else (to[0], to[1][1:])
            slices.setdefault(ldm_key[:-len(".weight")], []).append((offset, size, path))
        for ldm_path, parts in sorted(slices.items()):
            try:
                module = self.base.diffusion_model.get_submodule(ldm_path)
            except AttributeError:
                continue  # e.g. attn2 of a block without x_block self-attention
            if not isinstance(module, nn.Linear):
                continue
            rows = []
            for offset, size, path in sorted(parts):
                lora = WeightLoRA(size or module.out_features, module.in_features, rank, alpha, self.device)
                self.loras[path] = lora
                rows.append((offset, lora))
            self.patcher.add_weight_wrapper(f"diffusion_model.{ldm_path}.weight", RowSlicedLoRA(module.out_features, rows))

    def load(self) -> None:
        """Put the clone on the compute device with its wrappers in place (evicting other models: training
        needs the whole UNet resident, as TrainLoraNode asks)."""
        mm = comfy_host.model_management
        if mm is not None:
            mm.load_models_gpu([self.patcher], memory_required=1e20, force_full_load=True)
        trainable_copies(self.base)

    def encode_captions(self, texts: Iterable[str]) -> None:
        """Encode every caption once up front: CLIP then never has to be loaded (and the UNet moved out
        of the way) in mid-training."""
        self.encode_text(list(dict.fromkeys(texts)))

    # --- the Denoiser protocol -----------------------------------------------------------------------

    def encode_text(self, texts: list[str]) -> ComfyCond:
        hidden, pooled = [], []
        for text in texts:
            if text not in self._texts:
                with torch.no_grad():
                    cond, pool = self.clip.encode_from_tokens(self.clip.tokenize(text), return_pooled=True)
                if len(self._texts) >= TEXT_CACHE_LIMIT:
                    self._texts.clear()
                self._texts[text] = (cond.detach().float().cpu(), None if pool is None else pool.detach().float().cpu())
            cond, pool = self._texts[text]
            hidden.append(cond)
            pooled.append(pool)
        hidden = torch.cat(_lcm_length(hidden)).to(self.device)
        pooled = torch.cat(pooled).to(self.device) if all(p is not None for p in pooled) else None
        return ComfyCond(hidden, pooled)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be float [B, H, W, 3] in 0..1; got shape {tuple(images.shape)}")
        latents = self.vae.encode(images.float().cpu())
        return self.base.process_latent_in(latents.float()).to(self.device)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.flow:  # x_t = (1 - sigma) x_0 + sigma eps, sigma from ModelSamplingDiscreteFlow (its shift)
            sigma = self._sigmas[timesteps].view(-1, 1, 1, 1)
            return (1 - sigma) * latents + sigma * noise
        a = self._alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        return a.sqrt() * latents + (1 - a).sqrt() * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        # epsilon models and v ones (predict converts) aim at the noise; flow models at the velocity
        return noise - latents if self.flow else noise

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: ComfyCond) -> torch.Tensor:
        # ComfyUI's models take x = x_0 + sigma * eps (the DDPM x_t times sqrt(1 + sigma^2)) and the sigma,
        # and return the denoised x_0 whatever they predict; eps = (x - x_0) / sigma.
        # Flow (CONST): x is x_t itself and denoised = x - v * sigma, so the same formula gives the velocity v.
        sigma = self._sigmas[timesteps]
        x = noisy.float() if self.flow else noisy.float() * (1 + sigma ** 2).sqrt().view(-1, 1, 1, 1)
        extra = {}
        adm = self._adm(cond, noisy)
        if adm is not None:
            extra["y"] = adm
        denoised = self.base.apply_model(x, sigma, c_crossattn=cond.hidden, **extra)
        return (x - denoised.float()) / sigma.view(-1, 1, 1, 1)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, lora in sorted(self.loras.items()) for p in (lora.down.weight, lora.up.weight)]

    def adapters(self, enabled: bool) -> contextlib.AbstractContextManager:
        from trainer.tpo.lora import adapters_enabled

        return adapters_enabled(self.loras, enabled)

    def save_lora(self, path: Path | str, metadata: dict, *, dtype: torch.dtype = torch.float16) -> Path:
        from trainer.tpo.lora import save_kohya_lora

        if self.flow:  # lora_transformer_<diffusers path>: the names ComfyUI's LoraLoader maps for SD3
            from trainer.tpo.lora import TRANSFORMER_PREFIX

            base = {"ss_base_model_version": "sd3", "modelspec.architecture": "stable-diffusion-v3-medium/lora",
                    "modelspec.sai_model_spec": "1.0.0"}
            return save_kohya_lora(path, self.loras, {**base, **metadata}, dtype=dtype, prefix=TRANSFORMER_PREFIX)
        return save_kohya_lora(path, self.loras, {**self.base_metadata(), **metadata}, dtype=dtype)

    @property
    def latents_fingerprint(self) -> str:
        """sha256 (16 hex digits) of the VAE's class and weights and of the model's latent scaling: cached
        latents are reused only for the same encoder."""
        if self._latents_fingerprint is None:
            first_stage = getattr(self.vae, "first_stage_model", None)
            labels = [type(self.vae).__name__, type(getattr(self.base, "latent_format", None)).__name__]
            self._latents_fingerprint = weights_fingerprint(labels, first_stage if isinstance(first_stage, nn.Module)
                                                            else None)
        return self._latents_fingerprint

    # --- helpers ---------------------------------------------------------------------------------------

    def _adm(self, cond: ComfyCond, noisy: torch.Tensor) -> torch.Tensor | None:
        """SDXL's vector conditioning (pooled text + size/crop ids at the latents' size); None for SD 1.x/2.x."""
        encode_adm = getattr(self.base, "encode_adm", None)
        if cond.pooled is None or encode_adm is None:
            return None
        height, width = (s * 8 for s in noisy.shape[-2:])
        rows = [encode_adm(pooled_output=p[None], width=width, height=height, target_width=width,
                           target_height=height, crop_w=0, crop_h=0, device=noisy.device) for p in cond.pooled]
        if any(r is None for r in rows):
            return None
        return torch.cat(rows).to(noisy.device)

    def base_metadata(self) -> dict[str, str]:
        """kohya/modelspec metadata naming the kind of base model (SD 1.x, 2.x, SDXL) by its text width."""
        width = self.base.model_config.unet_config.get("context_dim")
        sdxl = width == 2048
        version = "sdxl_base_v1-0" if sdxl else ("sd_v2" if width == 1024 else "sd_v1")
        arch = "stable-diffusion-xl-v1-base" if sdxl else ("stable-diffusion-v2" if width == 1024 else
                                                           "stable-diffusion-v1")
        from trainer.tpo.lora_layout import LAYOUT_METADATA_KEY, UNetLayout

        meta = {"ss_base_model_version": version, "ss_v2": str(width == 1024), "modelspec.architecture": f"{arch}/lora",
                "modelspec.sai_model_spec": "1.0.0"}
        try:  # the block layout, which hosts check the LoRA against (trainer.tpo.lora_layout)
            meta[LAYOUT_METADATA_KEY] = UNetLayout.from_ldm_unet_config(self.base.model_config.unet_config).to_json()
        except (KeyError, TypeError, ValueError):  # a unet_config of another shape: saved without it
            pass
        return meta
