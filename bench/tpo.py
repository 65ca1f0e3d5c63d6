"""Benchmark: our TPO step against the Diffusion-DPO recipes' steps, on the same UNet and batch, in one run.

Every recipe trains the same LoRA (rank 8 on to_q/to_k/to_v/to_out.0, trainer.tpo.lora) on the same batch of
(image, c_w, c_l) pairs, with the same loss (TDPO, beta 5000), AdamW and grad clipping; they differ in
what a step computes:

- `ours` (trainer.tpo.train.pair_terms): latents encoded once before training (cached), the reference is the
  same UNet with the adapters off, and both captions go through ONE forward ([x_t; x_t] with [c_w; c_l]).
- `diffusers_dpo`: huggingface/diffusers `examples/research_projects/diffusion_dpo/train_diffusion_dpo.py`
  (071190da) ported to caption pairs: the VAE encodes the pair's pixels at every step (the image once per
  caption, as the recipe feeds its w and l images), one batched forward of the 2B rows, and the reference
  is the same UNet with `disable_adapters()` (here: our adapters off).
- `separate_reference`: the step as the TPO brief describes the Diffusion-DPO baseline and as
  SalesforceAIResearch/DiffusionDPO `train.py` runs it: VAE encode per step, a separate reference UNet
  (a deepcopy, frozen), and separate forwards for each caption and each model (4 UNet calls per step).

Reported per recipe: seconds per pair (wall time of the timed steps after `--warmup` steps, best of
`--repeats` rounds in which the recipes take turns), process CPU seconds per pair, and peak memory
above what was allocated before the recipe started (`torch.cuda.max_memory_allocated` on GPU; on CPU the
peak of the process's resident memory, sampled every 2 ms, over its value at the start, and tracemalloc's
peak of Python allocations). Ratios are against `ours`. Prints one JSON object.

    python bench/tpo.py                                   # tiny UNet/VAE/text encoder, 64 px, batch 4
    python bench/tpo.py --unet sd15 --size 512 --batch-size 4 --device cuda --dtype fp16
    python bench/tpo.py --unet sd15 --size 256 --batch-size 1 --steps 1 --warmup 0 --repeats 1   # CPU: ~8 min
    python bench/tpo.py --quick
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
BETA = 5000.0
CAPTIONS = [("a red car parked on a city street", "a blue car parked on a city street"),
            ("two dogs sitting next to a cat", "two dogs sitting far from a cat"),
            ("a bowl of apples on a wooden table", "a bowl of oranges on a wooden table"),
            ("a lighthouse on a hill at sunset", "a lighthouse on a hill at night")]


def build_pipeline(unet: str, device: str, dtype: torch.dtype):
    """The tiny test pipeline, or the SD 1.5 architecture (UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder
    123M) with random weights; both in the real diffusers/transformers classes."""
    from builders_sd import build_clip_tokenizer, build_tiny_clip_text_model
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_clip_tokenizer(Path(tempfile.mkdtemp(prefix="bench-tpo-")))
    torch.manual_seed(0)
    if unet == "tiny":
        text_encoder = build_tiny_clip_text_model(0)
        model = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
            cross_attention_dim=text_encoder.config.hidden_size, norm_num_groups=8, attention_head_dim=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        vae = AutoencoderKL(block_out_channels=[16, 32], in_channels=3, out_channels=3, latent_channels=4,
                            norm_num_groups=8, down_block_types=["DownEncoderBlock2D"] * 2,
                            up_block_types=["UpDecoderBlock2D"] * 2)
    else:  # SD 1.5's configs (runwayml/stable-diffusion-v1-5 unet/vae/text_encoder config.json)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
            pad_token_id=49407))
        model = UNet2DConditionModel(
            sample_size=64, cross_attention_dim=768, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            attention_head_dim=8, norm_num_groups=32,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], layers_per_block=2, in_channels=3,
                            out_channels=3, latent_channels=4, norm_num_groups=32, sample_size=512,
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000)
    for part in (text_encoder, model, vae):
        part.to(device, dtype).eval()
    return model, vae, text_encoder, tokenizer, scheduler


def images_for(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random pictures [B, H, W, 3] in 0..1 (upsampled noise, so the VAE sees structure)."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(batch, 3, max(size // 16, 2), max(size // 16, 2), generator=g)
    return F.interpolate(small, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1).permute(0, 2, 3, 1)


# --- the three steps -----------------------------------------------------------------------------------

class Recipe:
    """One training step of a recipe over a fixed batch; `setup` does what the recipe does before training."""

    name = ""

    def __init__(self, denoiser, images: torch.Tensor, chosen: list[str], rejected: list[str], seed: int):
        self.denoiser, self.images, self.chosen, self.rejected = denoiser, images, chosen, rejected
        self.params = denoiser.trainable_parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5)
        self.generator = torch.Generator().manual_seed(seed)
        self.t_max = denoiser.num_train_timesteps - 1

    def setup(self) -> None:
        pass

    def teardown(self) -> None:
        pass

    def draw(self, shape) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.randn(shape, generator=self.generator).to(self.denoiser.device)
        timesteps = torch.randint(0, self.t_max + 1, (shape[0],), generator=self.generator).to(self.denoiser.device)
        return noise, timesteps

    def loss(self) -> torch.Tensor:
        raise NotImplementedError

    def step(self) -> float:
        loss = self.loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


class Ours(Recipe):
    name = "ours"

    def setup(self) -> None:
        with torch.no_grad():
            self.latents = self.denoiser.encode_images(self.images)  # once, like the cache of train_tpo

    def teardown(self) -> None:
        del self.latents

    def loss(self) -> torch.Tensor:
        from trainer.tpo.train import pair_terms, tdpo_loss

        noise, timesteps = self.draw(self.latents.shape)
        terms = pair_terms(self.denoiser, self.latents, noise, timesteps, self.chosen, self.rejected)
        return tdpo_loss(terms.d_chosen, terms.d_rejected, BETA).mean()


def _mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


class DiffusersDPO(Recipe):
    """train_diffusion_dpo.py's step (071190da, lines ~760-830) with the image pair replaced by a caption pair."""

    name = "diffusers_dpo"

    def loss(self) -> torch.Tensor:
        from trainer.tpo.train import tdpo_loss

        d = self.denoiser
        with torch.no_grad():  # the recipe encodes its 2B pixels every step (w images, then l images)
            latents = d.encode_images(torch.cat([self.images, self.images]))
        noise, timesteps = self.draw(latents[: latents.shape[0] // 2].shape)
        noise, timesteps = noise.repeat(2, 1, 1, 1), timesteps.repeat(2)
        noisy = d.add_noise(latents, noise, timesteps)
        cond = d.encode_text(self.chosen + self.rejected)
        model_w, model_l = _mse(d.predict(noisy, timesteps, cond), noise).chunk(2)
        with torch.no_grad(), d.adapters(False):
            ref_w, ref_l = _mse(d.predict(noisy, timesteps, cond), noise).chunk(2)
        return tdpo_loss(model_w - ref_w, model_l - ref_l, BETA).mean()


class SeparateReference(Recipe):
    """VAE encode per step, a deepcopy reference UNet, one forward per (caption, model)."""

    name = "separate_reference"

    def setup(self) -> None:
        from trainer.tpo.lora import LoRALinear

        self.reference = copy.deepcopy(self.denoiser.unet).requires_grad_(False)
        for module in self.reference.modules():
            if isinstance(module, LoRALinear):
                module.enabled = False  # the copied LoRAs are off: the reference is the base model

    def teardown(self) -> None:
        del self.reference

    def loss(self) -> torch.Tensor:
        from trainer.tpo.train import tdpo_loss

        d = self.denoiser
        with torch.no_grad():
            latents = d.encode_images(self.images)
        noise, timesteps = self.draw(latents.shape)
        noisy = d.add_noise(latents, noise, timesteps)
        cond_w, cond_l = d.encode_text(self.chosen), d.encode_text(self.rejected)
        model_w = _mse(d.predict(noisy, timesteps, cond_w), noise)
        model_l = _mse(d.predict(noisy, timesteps, cond_l), noise)
        unet = d.unet
        with torch.no_grad():
            d.unet = self.reference
            try:
                ref_w = _mse(d.predict(noisy, timesteps, cond_w), noise)
                ref_l = _mse(d.predict(noisy, timesteps, cond_l), noise)
            finally:
                d.unet = unet
        return tdpo_loss(model_w - ref_w, model_l - ref_l, BETA).mean()


RECIPES = (Ours, DiffusersDPO, SeparateReference)


# --- measuring -----------------------------------------------------------------------------------------

def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory of a block above its start: CUDA max allocated, or sampled RSS + tracemalloc on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            self.start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.start, self.peak, self.running = _rss(), _rss(), True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
            tracemalloc.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.result = {"peak_mib": (torch.cuda.max_memory_allocated() - self.start) / 2**20,
                           "measure": "torch.cuda.max_memory_allocated above the start"}
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.peak, _rss())
            _, python_peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            self.result = {"peak_mib": (self.peak - self.start) / 2**20, "python_peak_mib": python_peak / 2**20,
                           "measure": "resident memory (sampled every 2 ms) above the start; tracemalloc peak"}


def run(args) -> dict:
    from trainer.tpo.denoiser import DiffusersDenoiser

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    unet, vae, text_encoder, tokenizer, scheduler = build_pipeline(args.unet, args.device, dtype)
    denoiser = DiffusersDenoiser(unet, scheduler, text_encoder, tokenizer, vae=vae, rank=args.rank,
                                 gradient_checkpointing=args.gradient_checkpointing)
    chosen = [CAPTIONS[i % len(CAPTIONS)][0] for i in range(args.batch_size)]
    rejected = [CAPTIONS[i % len(CAPTIONS)][1] for i in range(args.batch_size)]
    images = images_for(args.batch_size, args.size).to(device)
    results = {r.name: {"seconds_per_pair": float("inf"), "cpu_seconds_per_pair": float("inf")} for r in RECIPES}
    for cls in RECIPES:  # one untimed step of each first: one-off costs (kernels, allocator, autograd) paid by none
        recipe = cls(denoiser, images, chosen, rejected, seed=args.seed)
        recipe.setup()
        recipe.step()
        recipe.teardown()
        del recipe
    for round_ in range(args.repeats):
        # the recipes take turns, in a rotating order, so a slow moment of a shared machine hits all of them
        for cls in RECIPES[round_ % len(RECIPES):] + RECIPES[:round_ % len(RECIPES)]:
            recipe = cls(denoiser, images, chosen, rejected, seed=args.seed)
            with PeakMemory(device) as memory:
                recipe.setup()
                for _ in range(args.warmup):
                    recipe.step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                wall, cpu = time.perf_counter(), time.process_time()
                for _ in range(args.steps):
                    loss = recipe.step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                recipe.teardown()
            pairs = args.steps * args.batch_size
            entry = results[cls.name]
            entry["seconds_per_pair"] = min(entry["seconds_per_pair"], wall / pairs)
            entry["cpu_seconds_per_pair"] = min(entry["cpu_seconds_per_pair"], cpu / pairs)
            entry["memory"] = max(entry.get("memory", {"peak_mib": -1}), memory.result, key=lambda m: m["peak_mib"])
            entry["last_loss"] = loss
            del recipe
    ours = results["ours"]
    ratios = {name: {"time_vs_ours": r["seconds_per_pair"] / ours["seconds_per_pair"],
                     "cpu_time_vs_ours": r["cpu_seconds_per_pair"] / ours["cpu_seconds_per_pair"],
                     "memory_vs_ours": r["memory"]["peak_mib"] / max(ours["memory"]["peak_mib"], 1e-9)}
              for name, r in results.items() if name != "ours"}
    params = {"unet": sum(p.numel() for p in unet.parameters()), "vae": sum(p.numel() for p in vae.parameters()),
              "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
              "lora": sum(p.numel() for p in denoiser.trainable_parameters())}
    return {"unet": args.unet, "device": str(device), "dtype": args.dtype, "size": args.size,
            "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
            "threads": torch.get_num_threads(), "rank": args.rank, "parameters": params,
            "torch": torch.__version__, "python": platform.python_version(), "recipes": results, "ratios": ratios}


def main() -> None:
    if sys.platform == "linux" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # glibc raises its mmap threshold after big frees and then keeps freed tensors' memory: with a fixed
        # threshold every large tensor is mapped and unmapped, so resident memory follows what is alive.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default: 64)")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per step (default: 4)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per recipe and round (default: 6)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: 1)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds; the best round counts (default: 2)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny UNet, batch 2, 1 step, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.unet, args.batch_size, args.steps, args.warmup, args.repeats = "tiny", 2, 1, 0, 1
    print(json.dumps(run(args), indent=2))


if __name__ == "__main__":
    main()
