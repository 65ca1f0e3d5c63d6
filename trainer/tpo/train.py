"""TPO: align a text-to-image model with caption pairs instead of image pairs (TDPO and TKTO).

"Free Lunch Alignment of Text-to-Image Diffusion Models without Preference Image Pairs" (arXiv
2509.25771) applies Diffusion-DPO and Diffusion-KTO to (x, c_w, c_l): an image x, its caption c_w and an
edited caption c_l that no longer matches it. The model learns to denoise x better under c_w than under
c_l, relative to the frozen base. What the user gets is a kohya-format LoRA for their own checkpoint.

For one pair, draw one noise and one timestep (shared by both captions), noise the image's latents, and
take the denoising error e(c) = mean (eps_theta(x_t, t, c) - eps)^2, in the model's own prediction space
(epsilon; for flow-matching models the velocity, e(c) = mean (v_theta(x_t, t, c) - (eps - x_0))^2 with
x_t = (1 - sigma_t) x_0 + sigma_t eps; `Denoiser.add_noise` / `target`). With the reference model (the same
UNet with the LoRA off), D(c) = e_model(c) - e_ref(c); the losses push D(c_w) below D(c_l):
- TDPO: -log sigmoid(-beta/2 * (D(c_w) - clip(D(c_l)))),
- TKTO: g = -D, z0 = max(mean g over the batch, 0) (no gradient), loss = 1 - sigmoid(sign * beta * (g - z0))
  with sign +1 for (x, c_w) and -1 for (x, c_l),
where clip(D) = min(D, negative_clip) when `negative_clip` is set (see its doc).

The loop reads top to bottom: data (latents cached once) -> optimizer (resumed if asked) -> steps (noise,
batched policy and reference forwards, loss, accumulation, clipping, held-out accuracy, checkpoints, the
step callback) -> the LoRA file.

    python -m trainer tpo --data DATA --sd MODEL --out my_tpo.safetensors
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from promptist_core.generators import MAX_IMAGE_SIDE

from ..checkpoint import (
    check_resume_settings,
    counter_generator,
    list_checkpoints,
    load_extra,
    restore_training_state,
    resume_checkpoint,
    save_checkpoint,
)
from ..config import ConfigError, check_bounds, config_to_dict, option
from ..policy.sft import micro_batches
from ..progress import StepCallback, StopTraining, stop_requested
from ..runtime import PRECISIONS, Runtime, adamw, local_runtime, optimizer_step, step_plan
from ..runtime import short_run_notes as runtime_short_run_notes
from ..training_log import CURVES_FILE, TrainingLog
from .denoiser import Denoiser

logger = logging.getLogger(__name__)

LOSSES = ("tdpo", "tkto")
# beta per loss when the config leaves it empty: Salesforce Diffusion-DPO's 5000 (in the -beta/2 form, =
# diffusers' train_diffusion_dpo.py 2500) and Diffusion-KTO's `beta_dpo` 1000.
DEFAULT_BETA = {"tdpo": 5000.0, "tkto": 1000.0}
LORA_PRECISIONS = ("fp16", "fp32")
LATENTS_FOLDER = "latents"
# Settings a resumed run must share with the run it continues, or it would not continue it exactly.
RESUME_FIXED = ("data", "sd", "loss", "rank", "alpha", "targets", "seed", "batch_size", "grad_accum", "resolution",
                "timestep_min", "timestep_max")


@dataclass
class TPOConfig:
    """TPO (TDPO / TKTO) LoRA training on (image, caption, edited caption) triples."""

    data: str | None = option(None, "TPO data folder holding tpo_pairs.jsonl (from `python -m trainer tpo-data`).")
    sd: str | None = option(None, "Base model the LoRA is for: a diffusers folder, a Hub id, or a single-file "
                            ".safetensors checkpoint (SD 1.x, 2.x, SDXL).")
    sd_config: str | None = option(None, "For a single-file checkpoint offline: a local diffusers folder of the "
                                   "same architecture to read its configs from.")
    out: str | None = option(None, "The LoRA file to write (.safetensors, kohya format: ComfyUI LoraLoader, "
                             "A1111 <lora:name:0.8>, diffusers load_lora_weights).")
    run_dir: str | None = option(None, "Folder for checkpoints/, train_log.csv and curves.png. Empty: "
                                 "DATA/runs/<LoRA file name> (not beside the LoRA: a loras folder would list "
                                 "the checkpoint files as LoRAs).")
    loss: str = option("tdpo", "tdpo (Diffusion-DPO on caption pairs) or tkto (Diffusion-KTO: (x, c_w) "
                       "desirable, (x, c_l) undesirable).", choices=LOSSES)
    beta: float | None = option(None, "Strength of the preference (inverse temperature). TDPO uses Salesforce "
                                "Diffusion-DPO's convention, -beta/2 inside the sigmoid: beta 5000 here equals "
                                "diffusers' train_diffusion_dpo.py --beta_dpo 2500. TKTO: Diffusion-KTO's "
                                "beta_dpo. Empty: 5000 for tdpo, 1000 for tkto.", low=0, high=1e7, above=True)
    negative_clip: float | None = option(None, "TPO's clipping of the negative term, in our reading of the "
                                         "paper (unverified): D(c_l) enters the loss as min(D(c_l), this), so once "
                                         "the LoRA's error under the wrong caption is this much above the base "
                                         "model's it stops paying to raise it. Empty: no clip.",
                                         low=-1e6, high=1e6)
    rank: int = option(8, "LoRA rank (diffusers' DPO recipe: 8).", low=1, high=1024)
    alpha: float | None = option(None, "LoRA alpha; the update is scaled by alpha / rank. Empty: alpha = rank.",
                                 low=0, high=1e6, above=True)
    targets: str = option("to_q,to_k,to_v,to_out.0", "Comma-separated ends of the UNet Linear layers that get a "
                          "LoRA (the attention projections, as diffusers' DPO recipe and kohya).")
    lr: float = option(1e-5, "AdamW learning rate of the LoRA (diffusers' DPO recipe: 1e-5), constant after warmup.",
                       low=0, high=1, above=True)
    warmup_steps: int = option(100, "Linear warmup steps from 0 to `lr`.", low=0, high=10_000_000)
    weight_decay: float = option(1e-2, "AdamW weight decay (Salesforce Diffusion-DPO: 1e-2).", low=0, high=1)
    batch_size: int = option(4, "Caption pairs per forward pass (each pair runs the UNet 4 times: 2 captions x "
                             "LoRA on/off).", low=1, high=1024)
    grad_accum: int = option(4, "Micro-batches per optimizer step. The paper-scale effective batch (2048) is out "
                             "of reach for most users; larger is steadier.", low=1, high=4096)
    max_steps: int = option(1000, "Optimizer steps.", low=1, high=10_000_000)
    grad_clip: float = option(1.0, "Clip the gradient norm to this; 0 turns clipping off.", low=0, high=1e6)
    timestep_min: int = option(0, "Smallest training timestep drawn (uniformly).", low=0, high=100_000)
    timestep_max: int | None = option(None, "Largest training timestep drawn. Empty: the model's last (999).",
                                      low=0, high=100_000)
    resolution: int = option(512, "Images are resized (shorter side) and centre-cropped to this square before "
                             "encoding (SD 1.x: 512, SD 2.x: 768, SDXL: 1024).", low=64, high=MAX_IMAGE_SIDE)
    seed: int = option(0, "Seed of pair order, noise and timesteps; the same seed gives the same run.",
                       low=0, high=2**32 - 1)
    eval_every: int = option(100, "Held-out implicit accuracy every this many steps (and at the end); 0 = only "
                             "at the end.", low=0, high=10_000_000)
    max_valid_pairs: int = option(256, "Validation pairs used for the held-out accuracy (the first ones).",
                                  low=0, high=1_000_000)
    save_every: int = option(100, "Checkpoint every this many steps (and at the end and on stop).",
                             low=0, high=10_000_000)
    keep_checkpoints: int = option(2, "Newest checkpoints kept in the run folder's checkpoints/.",
                                   low=1, high=1000)
    log_every: int = option(10, "Write training metrics to the log every this many steps.",
                            low=1, high=10_000_000)
    device: str = option("auto", "auto, gpu, cpu or a torch device.")
    precision: str = option("auto", "Base model weights and autocast: auto (bf16 or fp16 on GPU, fp32 on CPU), "
                            "fp32, bf16, fp16. The LoRA itself always trains in fp32.", choices=PRECISIONS)
    lora_precision: str = option("fp16", "Tensor type of the published LoRA file (kohya's default: fp16).",
                                 choices=LORA_PRECISIONS)
    gradient_checkpointing: bool = option(False, "Recompute UNet activations in the backward pass: much less "
                                          "memory, about 30% slower (SDXL on 24 GB needs it).")
    tensorboard: bool = option(True, "Also write TensorBoard events (when tensorboard is installed).")


@dataclass
class TPOResult:
    lora: Path | None  # the published LoRA file
    run_dir: Path
    steps: int
    loss: float | None
    accuracy: float | None  # training implicit accuracy of the last step
    valid_accuracy: float | None  # held-out implicit accuracy at the end
    history: list[dict] = field(default_factory=list)  # the metrics of every step


# --- data ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CaptionPair:
    """One training triple: the image's latents (a row of `LatentPairs.latents`), c_w and c_l."""

    latent: int
    chosen: str
    rejected: str
    kind: str = "other"


@dataclass
class LatentPairs:
    """TPO training material in latent space: the images' latents once, and the caption pairs on them.
    Built from a data folder by `load_latent_pairs`, or directly (tests, hosts with latents in hand)."""

    latents: torch.Tensor  # float32 [N, C, h, w]
    train: list[CaptionPair]
    valid: list[CaptionPair]


def pairs_from_items(items, rows: dict[str, int]) -> tuple[list[CaptionPair], list[CaptionPair]]:
    """(train, valid) caption pairs, one per negative of each item; `rows` maps item id -> latent row."""
    train, valid = [], []
    for item in items:
        for negative in item.negatives:
            pair = CaptionPair(rows[item.id], item.caption, negative.text, negative.type)
            (valid if item.split == "valid" else train).append(pair)
    return train, valid


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """float [resolution, resolution, 3] in 0..1: shorter side resized to `resolution`, centre crop."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"{path}: cannot read this image ({e}); remove it from the data or replace the file") from None
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(resolution, resolution, 3).float() / 255


def load_latent_pairs(folder: Path | str, denoiser: Denoiser, *, resolution: int, batch_size: int = 4) -> LatentPairs:
    """The data folder's pairs, with every image encoded once: latents are cached in
    `folder/latents/<encoder fingerprint>-<resolution>.safetensors` (keys = item ids) and only images not
    yet in the cache are encoded (then the cache is rewritten atomically)."""
    from safetensors.torch import load_file, save_file

    from .data import read_tpo_data

    items = read_tpo_data(folder)
    cache = Path(folder) / LATENTS_FOLDER / f"{denoiser.latents_fingerprint}-{resolution}.safetensors"
    cached = load_file(str(cache)) if cache.is_file() else {}
    missing = [item for item in items if item.id not in cached]
    if missing:
        logger.info("encoding %d images into latents (cached in %s)", len(missing), cache)
        for start in range(0, len(missing), batch_size):
            chunk = missing[start:start + batch_size]
            images = torch.stack([load_image(item.image, resolution) for item in chunk])
            for item, z in zip(chunk, denoiser.encode_images(images.to(denoiser.device)).cpu(), strict=True):
                cached[item.id] = z.float().contiguous()
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp-{os.getpid()}")
        save_file(cached, str(tmp))
        os.replace(tmp, cache)
    rows = {item.id: i for i, item in enumerate(items)}
    latents = torch.stack([cached[item.id] for item in items])
    train, valid = pairs_from_items(items, rows)
    return LatentPairs(latents, train, valid)


# --- losses --------------------------------------------------------------------------------------

@dataclass
class PairTerms:
    """Per-pair denoising errors [B] of the model (LoRA on) and the reference (LoRA off) under c_w and c_l."""

    model_w: torch.Tensor
    model_l: torch.Tensor
    ref_w: torch.Tensor
    ref_l: torch.Tensor

    @property
    def d_chosen(self) -> torch.Tensor:
        return self.model_w - self.ref_w

    @property
    def d_rejected(self) -> torch.Tensor:
        return self.model_l - self.ref_l


def pair_terms(denoiser: Denoiser, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
               chosen: Sequence[str], rejected: Sequence[str]) -> PairTerms:
    """One batched forward for both captions with the LoRA on ([x_t, x_t] with [c_w, c_l]) and the same one
    with it off, without gradient (the reference)."""
    cond = denoiser.encode_text(list(chosen) + list(rejected))
    noisy = denoiser.add_noise(latents, noise, timesteps)
    target = denoiser.target(latents, noise, timesteps)  # in the model's prediction space (epsilon, velocity)
    noisy2, t2, target = torch.cat([noisy, noisy]), torch.cat([timesteps, timesteps]), torch.cat([target, target])
    model = (denoiser.predict(noisy2, t2, cond).float() - target).pow(2).mean(dim=(1, 2, 3))
    with torch.no_grad(), denoiser.adapters(False):
        ref = (denoiser.predict(noisy2, t2, cond).float() - target).pow(2).mean(dim=(1, 2, 3))
    model_w, model_l = model.chunk(2)
    ref_w, ref_l = ref.chunk(2)
    return PairTerms(model_w, model_l, ref_w, ref_l)


def clip_negative(d_rejected: torch.Tensor, negative_clip: float | None) -> torch.Tensor:
    """min(D(c_l), negative_clip): past the clip, raising the wrong caption's error earns nothing."""
    return d_rejected if negative_clip is None else d_rejected.clamp(max=negative_clip)


def tdpo_loss(d_chosen: torch.Tensor, d_rejected: torch.Tensor, beta: float,
              negative_clip: float | None = None) -> torch.Tensor:
    """Per pair: -log sigmoid(-beta/2 * (D(c_w) - clip(D(c_l)))) (Salesforce Diffusion-DPO's form)."""
    return -F.logsigmoid(-0.5 * beta * (d_chosen - clip_negative(d_rejected, negative_clip)))


def tkto_loss(d_chosen: torch.Tensor, d_rejected: torch.Tensor, beta: float,
              negative_clip: float | None = None) -> torch.Tensor:
    """Per pair, the Diffusion-KTO loss of (x, c_w) desirable plus that of (x, c_l) undesirable: with g = -D,
    z0 = max(mean g over the batch's 2B samples, 0) detached, h = sigmoid(sign * beta * (g - z0))."""
    g_w, g_l = -d_chosen, -clip_negative(d_rejected, negative_clip)
    z0 = torch.cat([g_w, g_l]).mean().clamp(min=0).detach()
    return (1 - torch.sigmoid(beta * (g_w - z0))) + (1 - torch.sigmoid(-beta * (g_l - z0)))


def implicit_accuracy(d_chosen: torch.Tensor, d_rejected: torch.Tensor) -> torch.Tensor:
    """Per pair: 1 where D(c_w) < D(c_l), 0 where above, 1/2 for a tie (a fresh zero LoRA scores 0.5)."""
    return (d_chosen < d_rejected).float() + 0.5 * (d_chosen == d_rejected).float()


def draw_noise(latents: torch.Tensor, t_range: tuple[int, int], *counters) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise like `latents` and one timestep per row, a pure function of `counters` (exact resume)."""
    g = counter_generator(*counters)
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.randint(t_range[0], t_range[1] + 1, (latents.shape[0],), generator=g)
    return noise, timesteps


@torch.no_grad()
def evaluate_pairs(denoiser: Denoiser, latents: torch.Tensor, pairs: Sequence[CaptionPair], *, seed: int,
                   t_range: tuple[int, int], batch_size: int = 8, runtime: Runtime | None = None) -> dict[str, float]:
    """Implicit accuracy, mean D(c_w) and D(c_l) of `pairs` with noise and timestep fixed per pair by
    (seed, pair index): the same draws at every evaluation, so the curve shows the model, not the noise."""
    runtime = runtime or local_runtime(denoiser.device, "fp32")
    acc, d_w, d_l = [], [], []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        x0 = latents[[p.latent for p in chunk]]
        draws = [draw_noise(x0[i:i + 1], t_range, seed, "valid", start + i) for i in range(len(chunk))]
        noise, timesteps = torch.cat([n for n, _ in draws]), torch.cat([t for _, t in draws])
        with runtime.autocast():
            terms = pair_terms(denoiser, x0.to(denoiser.device), noise.to(denoiser.device),
                               timesteps.to(denoiser.device), [p.chosen for p in chunk], [p.rejected for p in chunk])
        acc.append(implicit_accuracy(terms.d_chosen, terms.d_rejected))
        d_w.append(terms.d_chosen)
        d_l.append(terms.d_rejected)
    if not acc:
        return {}
    return {"valid_accuracy": torch.cat(acc).mean().item(), "valid_d_chosen": torch.cat(d_w).mean().item(),
            "valid_d_rejected": torch.cat(d_l).mean().item()}


# --- the loop ------------------------------------------------------------------------------------

def lr_at(step: int, config: TPOConfig) -> float:
    """Constant after a linear warmup (as Diffusion-DPO and Diffusion-KTO)."""
    return config.lr * min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else config.lr


def short_run_notes(config: TPOConfig,
                    settings: tuple[str, str, str] = ("--lr", "--max-steps", "--grad-accum")) -> list[str]:
    """What this run can show if it is short (runtime.short_run_notes), as each host says it at the start (the
    command line logs it, the ComfyUI node logs it and puts it in its summary); `settings` in the host's words."""
    start = "ln 2 = 0.693" if config.loss == "tdpo" else "1.0"
    return runtime_short_run_notes([lr_at(s, config) for s in range(config.max_steps)], config.grad_accum,
                                   lr=config.lr, warmup_steps=config.warmup_steps, start_loss=start, settings=settings)


def run_dir_for(config: TPOConfig) -> Path:
    """`run_dir`, else DATA/runs/<out's name>, else (training on latents in hand) <out>-tpo-run beside it."""
    if config.run_dir:
        return Path(config.run_dir).expanduser()
    out = Path(config.out).expanduser()
    if config.data:
        return Path(config.data).expanduser() / "runs" / out.stem
    return out.with_name(out.stem + "-tpo-run")


def check_config(config: TPOConfig, num_train_timesteps: int | None = None) -> tuple[int, int]:
    """Validate; returns the timestep range (inclusive). Without the model's `num_train_timesteps` (the command line,
    before any model loads) the timestep range is checked against the fields' bounds only."""
    check_bounds(config)  # every number finite and in its range (the fields' bounds)
    if not config.out and not config.run_dir:
        raise ConfigError("`out` is required: the LoRA file to write (e.g. my_tpo.safetensors)")
    if config.out and Path(config.out).suffix.lower() != ".safetensors":
        raise ConfigError(f"`out` must be a .safetensors file (the LoRA); got {config.out!r}")
    if config.resolution % 8:
        raise ConfigError(f"'resolution' must be a multiple of 8 between 64 and {MAX_IMAGE_SIDE}; "
                          f"got {config.resolution}")
    last = 100_000 if num_train_timesteps is None else num_train_timesteps - 1
    high = last if config.timestep_max is None else config.timestep_max
    if not 0 <= config.timestep_min <= high <= last:
        raise ConfigError(f"need 0 <= timestep_min <= timestep_max <= {last}; got "
                          f"{config.timestep_min} and {config.timestep_max}")
    return config.timestep_min, high


def check_tpo_data(items) -> None:
    """A data folder's items (`data.read_tpo_data`) hold a training pair: said before the model loads."""
    if not any(item.split != "valid" and item.negatives for item in items):
        raise ConfigError("the data holds no training pairs (every item is in the valid split, or has no negative)")


def train_tpo(
    config: TPOConfig,
    denoiser: Denoiser,
    data: LatentPairs | Path | str | None = None,
    *,
    callback: StepCallback | None = None,
    resume: bool = False,
    runtime: Runtime | None = None,
) -> TPOResult:
    """Train the denoiser's LoRA by TDPO or TKTO on `data` (a data folder, default `config.data`, or
    `LatentPairs`), checkpoint into the run folder, and publish the LoRA at `config.out`. A callback raising
    StopTraining stops after a checkpoint (the exception is re-raised); `resume` continues the newest one."""
    runtime = runtime or local_runtime(denoiser.device, config.precision)
    if runtime.distributed:
        raise ConfigError("TPO trains on one device; run it without `accelerate launch` / torchrun")
    t_range = check_config(config, denoiser.num_train_timesteps)
    beta = config.beta if config.beta is not None else DEFAULT_BETA[config.loss]
    loss_fn = tdpo_loss if config.loss == "tdpo" else tkto_loss
    run_dir = run_dir_for(config)
    checkpoints = list_checkpoints(run_dir)
    if checkpoints and not resume:
        raise ConfigError(f"{run_dir} already holds a run (checkpoint step {checkpoints[-1].step}); pass --resume to "
                          "continue it, or choose another output")
    checkpoint = resume_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        check_resume_settings(config, checkpoint, RESUME_FIXED)
        logger.info("resuming %s from step %d", run_dir, checkpoint.step)

    # 1. data: latents once (cached beside the data), caption pairs
    data = data if data is not None else config.data
    if data is None:
        raise ConfigError("`data` is required: a TPO data folder (python -m trainer tpo-data)")
    if not isinstance(data, LatentPairs):
        data = load_latent_pairs(data, denoiser, resolution=config.resolution, batch_size=config.batch_size)
    if not data.train:
        raise ConfigError("the data holds no training pairs (every item is in the valid split?)")
    plan, small = step_plan(len(data.train), config.batch_size, config.grad_accum, runtime.world_size,
                            what="caption pairs", setting="grad_accum", suggestion="1")
    logger.info(plan)
    if small:
        logger.warning(small)
    latents = data.latents.float()
    valid = data.valid[:config.max_valid_pairs]

    # 2. optimizer and training state (restored when resuming)
    params = denoiser.trainable_parameters()
    optimizer = adamw([{"params": params}], lr=config.lr, weight_decay=config.weight_decay)
    scaler = runtime.grad_scaler()
    state = {"trainer": "tpo", "step": 0, "cursor": {"epoch": 0, "index": 0}, "train_pairs": len(data.train),
             "valid_pairs": len(valid)}
    if checkpoint is not None:
        saved = load_extra(checkpoint, "lora")
        if len(saved) != len(params) or any(saved[f"{i:05d}"].shape != p.shape for i, p in enumerate(params)):
            raise ConfigError(f"{checkpoint.folder}: its LoRA tensors do not fit this model's LoRA (another rank, "
                              "targets or base model?)")
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(saved[f"{i:05d}"])
        restore_training_state(checkpoint, optimizer)
        state.update({k: v for k, v in checkpoint.state.items() if k in state})
        if scaler is not None and checkpoint.state.get("scaler"):
            scaler.load_state_dict(checkpoint.state["scaler"])
    columns = ["loss", "accuracy", "d_chosen", "d_rejected", "model_mse", "ref_mse", "lr", "grad_norm",
               "valid_accuracy", "valid_d_chosen", "valid_d_rejected"]
    log = TrainingLog(run_dir, columns, tensorboard=config.tensorboard,
                      resume_step=state["step"] if checkpoint else None)
    stream = micro_batches([1] * len(data.train), config.batch_size, config.seed, 1, state["cursor"], drop_last=True)

    def save(step: int) -> None:
        full = {**state, "config": config_to_dict(config), "scaler": scaler.state_dict() if scaler else None}
        save_checkpoint(run_dir, optimizer=optimizer, state=full, keep=config.keep_checkpoints,
                        extra={"lora": {f"{i:05d}": p for i, p in enumerate(params)}})
        log.draw({"loss": ("loss",), "implicit accuracy": ("accuracy", "valid_accuracy"),
                  "D = model - reference error": ("d_chosen", "d_rejected", "valid_d_chosen", "valid_d_rejected")},
                 f"TPO ({config.loss})").save(run_dir / CURVES_FILE)

    def validate() -> dict[str, float]:
        return evaluate_pairs(denoiser, latents, valid, seed=config.seed, t_range=t_range,
                              batch_size=config.batch_size, runtime=runtime)

    # 3. steps
    history: list[dict] = []
    metrics: dict = {}
    saved_at = state["step"]
    while state["step"] < config.max_steps:
        step = state["step"]
        sums = torch.zeros(7, dtype=torch.float64)  # loss, accuracy, d_w, d_l, model mse, ref mse, pairs
        for k in range(config.grad_accum):
            batch = [data.train[i] for i in next(stream)]
            x0 = latents[[p.latent for p in batch]]
            noise, timesteps = draw_noise(x0, t_range, config.seed, step, k)  # one draw per pair, both captions
            with runtime.autocast():
                terms = pair_terms(denoiser, x0.to(denoiser.device), noise.to(denoiser.device),
                                   timesteps.to(denoiser.device), [p.chosen for p in batch], [p.rejected for p in batch])
            losses = loss_fn(terms.d_chosen, terms.d_rejected, beta, config.negative_clip)
            loss = losses.sum() / (config.batch_size * config.grad_accum)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            with torch.no_grad():
                sums += torch.stack([
                    losses.sum(), implicit_accuracy(terms.d_chosen, terms.d_rejected).sum(), terms.d_chosen.sum(),
                    terms.d_rejected.sum(), (terms.model_w + terms.model_l).sum() / 2,
                    (terms.ref_w + terms.ref_l).sum() / 2, torch.tensor(float(len(batch)))]).double().cpu()
        grad_norm = optimizer_step(optimizer, params, scaler, lr_at(step, config), config.grad_clip)
        state["step"] = step = step + 1

        n = sums[6].item()
        metrics = {"loss": sums[0].item() / n, "accuracy": sums[1].item() / n, "d_chosen": sums[2].item() / n,
                   "d_rejected": sums[3].item() / n, "model_mse": sums[4].item() / n, "ref_mse": sums[5].item() / n,
                   "lr": lr_at(step - 1, config), "grad_norm": grad_norm}
        if valid and ((config.eval_every and step % config.eval_every == 0) or step == config.max_steps):
            metrics.update(validate())
        history.append(dict(metrics, step=step))
        if step % config.log_every == 0 or "valid_accuracy" in metrics or step == config.max_steps:
            log.log(step, metrics)
        if config.save_every and step % config.save_every == 0:
            save(step)
            saved_at = step

        if stop_requested(callback, step, config.max_steps, metrics, runtime):
            if saved_at != step:
                save(step)
            log.close()
            raise StopTraining.saved(f"step {step}", run_dir / "checkpoints")

    # 4. the LoRA file
    if saved_at != state["step"]:
        save(state["step"])
    log.close()
    lora = None
    if config.out:
        lora = denoiser.save_lora(Path(config.out).expanduser(), {
            "ss_network_dim": str(config.rank), "ss_steps": str(state["step"]),
            "ss_network_alpha": f"{config.alpha if config.alpha is not None else config.rank:g}",
            "modelspec.title": Path(config.out).stem, "promptist_trainer": "tpo",
            "promptist_config": config_to_dict(config)},
            dtype=torch.float16 if config.lora_precision == "fp16" else torch.float32)
        logger.info("LoRA written to %s", lora)
    return TPOResult(lora, run_dir, state["step"], metrics.get("loss"), metrics.get("accuracy"),
                     metrics.get("valid_accuracy"), history)
