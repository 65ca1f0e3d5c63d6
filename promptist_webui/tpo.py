"""Train TPO (LoRA) in the webui: the TPO `Denoiser` over the loaded checkpoint, and the Train TPO button.

The webui owns the model (`shared.sd_model`); training borrows it. A1111 (1.10) and Forge (classic) share
the legacy members used here: `get_learned_conditioning` (a tensor, or SDXL's dict with `crossattn` and
`vector`), `encode_first_stage` / `get_first_stage_encoding`. They differ in the UNet call: A1111's
`apply_model(x_t, t, cond)` returns the raw prediction (epsilon or v) for timesteps, with the schedule in
`alphas_cumprod`; Forge's UNet is a ComfyUI-style patcher (`forge_objects.unet`) whose
`model.apply_model(x, sigma, ...)` returns the denoised latent. Those two calls are the only guarded
difference. The LoRA is hooked onto the UNet's attention projections (trainer.tpo.host_unet) and taken
off when the job ends, so the webui's model is as before; the file goes into the Lora folder, named as
A1111's `<lora:...>`, Forge and ComfyUI read it. The loop is trainer.tpo.train.train_tpo.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from promptist_core.fingerprint import weights_fingerprint
from trainer.training_run import TPO_PANELS

from .errors import PromptistError
from .train import WebuiProgress, _training, run_folder, user_errors

DATA_FOLDER = "data"
SOURCES = ("prompts", "folder")
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # = trainer.tpo.lora.DEFAULT_TARGETS


class WebuiDenoiser:
    """The loaded checkpoint of A1111 or Forge with a hooked LoRA, as a TPO `Denoiser`.

    `close()` (or leaving the `with` block) removes the hooks and restores the UNet's gradient and
    checkpointing flags. Captions are encoded once each and kept on the CPU."""

    def __init__(self, sd_model, *, rank: int = 8, alpha: float | None = None,
                 targets: Iterable[str] = DEFAULT_TARGETS, device: torch.device | str = "cpu", resolution: int = 512,
                 seed: int = 0, model_name: str = "", model_hash: str | None = None):
        from trainer.tpo.host_unet import HookLoRASet, frozen_without_checkpointing, trainable_copies

        self.sd_model, self.device, self.resolution = sd_model, torch.device(device), int(resolution)
        self.model_name, self.model_hash, self.seed = model_name, model_hash, int(seed)
        self.forge = getattr(sd_model, "forge_objects", None) is not None
        self.sdxl = bool(getattr(sd_model, "is_sdxl", False))
        self._stack = contextlib.ExitStack()
        if self.forge:
            self._use_checkpoint_objects(sd_model)
            self.unet_patcher = sd_model.forge_objects.unet
            self.diffusion_model = self.unet_patcher.model.diffusion_model
            sigmas = getattr(self.unet_patcher.model.predictor, "sigmas", None)
            if sigmas is None or sigmas.ndim != 1 or len(sigmas) < 2:
                raise ValueError("TPO trains SD 1.x, 2.x and SDXL (discrete-timestep UNet) checkpoints; the loaded "
                                 "one has no discrete noise schedule")
            self._sigmas = sigmas.detach().float().to(self.device).clone()
            self._alphas_cumprod = 1.0 / (1.0 + self._sigmas ** 2)
        else:
            self.diffusion_model = sd_model.model.diffusion_model
            alphas = getattr(sd_model, "alphas_cumprod_original", None)
            alphas = alphas if alphas is not None else sd_model.alphas_cumprod
            self._alphas_cumprod = torch.as_tensor(alphas).detach().float().to(self.device).clone()
            self.parameterization = prediction_type(sd_model)
        self.num_train_timesteps = len(self._alphas_cumprod)
        with torch.inference_mode(False):
            trainable_copies(self.diffusion_model)  # Forge loads checkpoints under inference mode
        self._stack.enter_context(frozen_without_checkpointing(self.diffusion_model))
        self.lora_set = HookLoRASet(self.diffusion_model, rank, alpha if alpha is not None else rank, targets,
                                    self.device, seed)
        self._stack.callback(self.lora_set.remove)
        self.loras = self.lora_set.loras
        self._texts: dict[str, Any] = {}
        self._latents_fingerprint: str | None = None

    def _use_checkpoint_objects(self, sd_model) -> None:
        """Forge/Neo: after a job with `<lora:...>`, `sd_model.forge_objects` holds the patchers with that
        LoRA (merged into the weights when loaded); the job trains the checkpoint's own (as each generation
        starts from `forge_objects_original`), and gives the last job's back when it ends."""
        original = getattr(sd_model, "forge_objects_original", None)
        if original is None or not hasattr(original, "shallow_copy"):
            return
        previous = sd_model.forge_objects
        sd_model.forge_objects = original.shallow_copy()
        self._stack.callback(setattr, sd_model, "forge_objects", previous)

    def close(self) -> None:
        """Take the LoRA off the webui's UNet and restore its flags."""
        self._stack.close()

    def __enter__(self) -> WebuiDenoiser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def load(self) -> None:
        """Forge: put the UNet on the compute device (its memory manager moves models in and out)."""
        if self.forge:
            from backend import memory_management

            memory_management.load_model_gpu(self.unet_patcher)
            from trainer.tpo.host_unet import trainable_copies

            with torch.inference_mode(False):  # what the move (under Forge's inference mode) made
                trainable_copies(self.diffusion_model)

    def encode_captions(self, texts: Iterable[str]) -> None:
        """Encode every caption up front: the text encoder is then never needed in mid-training."""
        for text in dict.fromkeys(texts):
            self._encode_one(text)

    # --- the Denoiser protocol -----------------------------------------------------------------------

    def encode_text(self, texts: list[str]) -> Any:
        conds = [self._encode_one(t) for t in texts]
        if isinstance(conds[0], dict):
            return {k: torch.cat(_common_length([c[k] for c in conds]) if k == "crossattn" else [c[k] for c in conds])
                    .to(self.device) for k in conds[0]}
        return torch.cat(_common_length(conds)).to(self.device)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be float [B, H, W, 3] in 0..1; got shape {tuple(images.shape)}")
        first_stage = getattr(self.sd_model, "first_stage_model", None)
        dtype = next(first_stage.parameters()).dtype if isinstance(first_stage, nn.Module) else torch.float32
        device = next(first_stage.parameters()).device if isinstance(first_stage, nn.Module) else self.device
        pixels = images.permute(0, 3, 1, 2).to(device, dtype) * 2 - 1
        # Forge/Neo (and A1111 SDXL) encode a draw from the VAE's distribution: seeded, so a new run's
        # cached latents are the same for the same images and seed; the webui's RNG is left as it was
        with torch.random.fork_rng(devices=[pixels.device] if pixels.device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            encoded = self.sd_model.encode_first_stage(pixels)
        if not isinstance(encoded, torch.Tensor):  # A1111 SD 1.x/2.x: the distribution's mode, not a draw (latents are cached)
            encoded = encoded.mode()
        return self.sd_model.get_first_stage_encoding(encoded).float().clone().to(self.device)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        a = self._alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        return a.sqrt() * latents + (1 - a).sqrt() * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What `predict` should return: the noise (predictions are converted to epsilon)."""
        return noise

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Any) -> torch.Tensor:
        if self.forge:  # the denoised latent from x = x_0 + sigma * eps and sigma, as ComfyUI
            sigma = self._sigmas[timesteps]
            x = noisy.float() * (1 + sigma ** 2).sqrt().view(-1, 1, 1, 1)
            extra = {"y": cond["vector"]} if isinstance(cond, dict) else {}
            hidden = cond["crossattn"] if isinstance(cond, dict) else cond
            denoised = self.unet_patcher.model.apply_model(x, sigma, c_crossattn=hidden, **extra)
            return (x - denoised.float()) / sigma.view(-1, 1, 1, 1)
        out = self.sd_model.apply_model(noisy, timesteps, cond).float()
        if self.parameterization == "v":  # v = a eps - s x0  =>  eps = a v + s x_t
            a = self._alphas_cumprod[timesteps].view(-1, 1, 1, 1)
            out = a.sqrt() * out + (1 - a).sqrt() * noisy.float()
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.lora_set.parameters()

    def adapters(self, enabled: bool) -> contextlib.AbstractContextManager:
        from trainer.tpo.lora import adapters_enabled

        return adapters_enabled(self.loras, enabled)

    def save_lora(self, path: Path | str, metadata: dict, *, dtype: torch.dtype = torch.float16) -> Path:
        from trainer.tpo.lora import save_kohya_lora

        return save_kohya_lora(path, self.loras, {**self.base_metadata(), **metadata}, dtype=dtype)

    @property
    def latents_fingerprint(self) -> str:
        """sha256 (16 hex digits) of the first-stage model's class and weights: cached latents are reused
        only for the same VAE."""
        if self._latents_fingerprint is None:
            first_stage = (self.sd_model.forge_objects.vae.first_stage_model if self.forge
                           else getattr(self.sd_model, "first_stage_model", None))
            self._latents_fingerprint = weights_fingerprint(
                [type(first_stage).__name__], first_stage if isinstance(first_stage, nn.Module) else None)
        return self._latents_fingerprint

    # --- helpers ---------------------------------------------------------------------------------------

    def _encode_one(self, text: str):
        if text not in self._texts:
            with torch.no_grad():
                cond = self.sd_model.get_learned_conditioning(self._conditioning([text]))
            # copies outside inference mode (Forge encodes under it), on the CPU until used
            self._texts[text] = ({k: v.detach().float().cpu().clone() for k, v in cond.items()}
                                 if isinstance(cond, dict) else cond.detach().float().cpu().clone())
        return self._texts[text]

    def _conditioning(self, texts: list[str]):
        """The prompts as the webui's SdConditioning at the training size (SDXL's size conditioning reads it)."""
        try:
            from modules.prompt_parser import SdConditioning
        except ImportError:
            return texts
        return SdConditioning(texts, width=self.resolution, height=self.resolution)

    def base_metadata(self) -> dict[str, str]:
        """kohya/modelspec metadata naming the base model (kind, checkpoint name and hash)."""
        width = self.diffusion_model_context_dim()
        version = "sdxl_base_v1-0" if self.sdxl else ("sd_v2" if width == 1024 else "sd_v1")
        arch = "stable-diffusion-xl-v1-base" if self.sdxl else ("stable-diffusion-v2" if width == 1024 else
                                                                "stable-diffusion-v1")
        meta = {"ss_base_model_version": version, "ss_v2": str(width == 1024 and not self.sdxl),
                "ss_sd_model_name": self.model_name, "modelspec.architecture": f"{arch}/lora",
                "modelspec.sai_model_spec": "1.0.0"}
        if self.model_hash:
            meta["ss_sd_model_hash"] = self.model_hash
        return meta

    def diffusion_model_context_dim(self) -> int | None:
        """The cross-attention width (768 SD 1.x, 1024 SD 2.x, 2048 SDXL): an attn2.to_k's input size."""
        for path, module in self.diffusion_model.named_modules():
            if path.endswith("attn2.to_k") and hasattr(module, "in_features"):
                return module.in_features
        return None


def prediction_type(sd_model) -> str:
    """A1111: "eps" or "v" (ldm's `parameterization`; sgm's denoiser scaling for SDXL)."""
    kind = getattr(sd_model, "parameterization", None)
    if kind is None:
        scaling = type(getattr(getattr(sd_model, "denoiser", None), "scaling", None)).__name__
        kind = "v" if scaling.startswith("V") else "eps"
    if kind not in ("eps", "v"):
        raise ValueError(f"the loaded checkpoint predicts {kind!r}; TPO trains epsilon- and v-prediction models")
    return kind


def _common_length(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Token states of different lengths (prompts over 75 tokens) repeated to a common length, as the
    webui does for a batch of prompts of different lengths."""
    import math

    lengths = {t.shape[1] for t in tensors}
    if len(lengths) == 1:
        return tensors
    common = math.lcm(*lengths)
    return [t.repeat(1, common // t.shape[1], 1) for t in tensors]


# --- the Train TPO button -----------------------------------------------------------------------------

def lora_dir(cmd_opts, models_path: str) -> Path:
    """The webui's Lora folder (what `<lora:name:1>` and the Lora tab list): --lora-dir, else models/Lora."""
    given = getattr(cmd_opts, "lora_dir", None)
    return Path(given) if given else Path(models_path) / "Lora"


def refresh_loras() -> None:
    """Let the webui's Lora extension list the new file now (A1111's and Forge's `networks` module)."""
    networks = sys.modules.get("networks")
    if networks is not None and hasattr(networks, "list_available_networks"):
        try:
            networks.list_available_networks()
        except Exception as e:  # the file is saved; only the list is stale until the Lora tab's refresh
            print(f"[promptist] the Lora list was not refreshed ({type(e).__name__}: {e}); press Refresh in "
                  "the Lora tab", file=sys.stderr)


def clear_loaded_loras() -> None:
    """A1111: the LoRAs of the last job's prompt stay merged into the UNet until its next forward; with
    none wanted, the first training forward restores the checkpoint's own weights (A1111 keeps them)."""
    networks = sys.modules.get("networks")
    loaded = getattr(networks, "loaded_networks", None)
    if isinstance(loaded, list):
        loaded.clear()


def gather_data(source: str, prompts: str, folder: str, generator, data: Path, *, seed: int, steps: int,
                cfg: float, resolution: int):
    """The run's images with captions: drawn once from `prompts` by the webui, or read from an image
    folder with same-name .txt captions."""
    from trainer.tpo.data import gather_folder, gather_prompts

    if source == "folder":
        if not folder or not folder.strip():
            raise ValueError("Image folder is empty: give a folder of images with same-name .txt captions")
        path = Path(folder.strip()).expanduser()
        if not path.is_dir():
            raise ValueError(f"Image folder: no such folder {folder!r}")
        return gather_folder(path)
    lines = [line.strip() for line in (prompts or "").splitlines() if line.strip()]
    if not lines:
        raise ValueError("Captions is empty: give the prompts to draw, one per line (they are the captions)")
    return gather_prompts(lines, generator, data / "images", seed=seed, steps=steps, guidance=cfg,
                          size=(resolution, resolution), source={"kind": "prompts", "sd": generator.fingerprint})


def train_tpo_in_webui(state, loaded_model, generator, models_root: Path, loras: Path, *, source: str = "prompts",
                       prompts: str = "", folder: str = "", save_name: str, loss: str = "tdpo", steps: int = 500,
                       rank: int = 8, beta: float = 0.0, lr: float = 1e-5, batch_size: int = 4, grad_accum: int = 4,
                       resolution: int = 512, seed: int = 0, save_every: int = 100, negatives_per_caption: int = 2,
                       valid_fraction: float = 0.1, image_steps: int = 20, cfg: float = 7.0,
                       device: str | torch.device = "cpu") -> tuple:
    """The Train TPO button: a LoRA of the loaded checkpoint by TDPO / TKTO on caption pairs, written to
    `loras/<save name>.safetensors`; the run (data, checkpoints, curves) is `models_root/<save name>`, and
    pressing Train again with the same save name continues it. `loaded_model()` gives the webui's model
    once the images are drawn (Forge loads its checkpoint at the first job). Returns (curve image, HTML)."""
    from trainer.checkpoint import list_checkpoints
    from trainer.progress import StopTraining
    from trainer.runtime import local_runtime
    from trainer.tpo.caption_edits import editor_from_spec
    from trainer.tpo.data import build_run_data
    from trainer.tpo.train import TPOConfig, load_latent_pairs, train_tpo

    from .train import _finished

    if source not in SOURCES:
        raise PromptistError(f"Images from must be one of {', '.join(SOURCES)}; got {source!r}", status_code=422)
    out = run_folder(models_root, save_name)
    lora_path = Path(loras) / f"{save_name}.safetensors"
    resume = bool(list_checkpoints(out))
    steps, save_every = int(steps), int(save_every)
    progress = WebuiProgress(state, out, TPO_PANELS, f"TPO ({loss})")
    state.job, state.job_count, state.textinfo = "Promptist TPO", steps, "Promptist TPO: preparing the images"
    data = out / DATA_FOLDER
    with _training("training (TPO)"):
        gathered = user_errors(gather_data, source, prompts, folder, generator, data, seed=int(seed),
                               steps=int(image_steps), cfg=float(cfg), resolution=int(resolution))
        count = user_errors(build_run_data, data, gathered, editor_from_spec("rules", seed=int(seed)),
                            editor_name="rules", negatives_per_caption=int(negatives_per_caption), seed=int(seed),
                            valid_fraction=float(valid_fraction), resume=resume, label="Save name")
        sd_model = loaded_model()
        if not sd_model or not hasattr(sd_model, "get_learned_conditioning"):
            raise PromptistError("No Stable Diffusion checkpoint is loaded: choose one at the top of the page")
        info = getattr(sd_model, "sd_checkpoint_info", None)
        model_name, model_hash = getattr(info, "name_for_extra", "") or "", getattr(info, "sha256", None)
        config = TPOConfig(data=str(data), sd=model_name or None, out=str(lora_path), run_dir=str(out), loss=loss,
                           beta=float(beta) or None, rank=int(rank), lr=float(lr), warmup_steps=min(100, steps // 10),
                           batch_size=int(batch_size), grad_accum=int(grad_accum), max_steps=steps,
                           resolution=int(resolution), seed=int(seed), eval_every=save_every, save_every=save_every,
                           log_every=1, device=str(device), tensorboard=False)
    if generator.stop_requested or state.interrupted or getattr(state, "stopping_generation", False):
        return progress.image(), _message(f"TPO interrupted while its images were drawn; those drawn are kept in "
                                          f"{data / 'images'}: press Train again with the same save name to continue.")
    clear_loaded_loras()
    stopped, result = False, None
    with _training("training (TPO)"), WebuiDenoiser(sd_model, rank=int(rank), device=device,
                                                     resolution=int(resolution), seed=int(seed), model_name=model_name,
                                                     model_hash=model_hash) as denoiser:
        state.textinfo = "Promptist TPO: encoding the images and captions"
        pairs = load_latent_pairs(data, denoiser, resolution=int(resolution), batch_size=int(batch_size))
        denoiser.encode_captions([t for p in pairs.train + pairs.valid for t in (p.chosen, p.rejected)])
        denoiser.load()
        try:
            result = train_tpo(config, denoiser, pairs, callback=progress, resume=resume,
                               runtime=local_runtime(device, config.precision))
        except StopTraining:
            stopped = True
    if result is None:
        return _finished("TPO", out, progress, resume, stopped)
    refresh_loras()
    numbers = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in (
        ("steps", result.steps), ("items", count), ("loss", result.loss), ("accuracy", result.accuracy),
        ("held-out accuracy", result.valid_accuracy)) if v is not None)
    return progress.image(), _message(f"TPO {'resumed and finished' if resume else 'finished'}: {numbers}. Saved "
                                      f"{lora_path}; use it with <lora:{save_name}:1> in a prompt (run folder: {out}).")


def _message(text: str) -> str:
    import html

    return f"<p>{html.escape(text)}</p>"
