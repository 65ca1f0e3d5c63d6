"""DF-Prompt overhead in diffusers: a plain prompt vs a DF-Prompt with 3 modifiers, same pipeline, same run.

Prints one JSON object. For each model (tiny SD, and the SD 1.5 architecture with random weights:
UNet 320-640-1280-1280 / cross-attention 768, CLIP ViT-L/14 text encoder), it times a whole generation
(latents out, no VAE decode) both ways, split into encoding (everything before the first UNet call) and
the denoising loop, and reports `overhead_ratio = t_dfprompt / t_plain - 1` per image and
`loop_overhead_ratio` for the loop alone. Goal: < 5% (each segment is encoded once, the embeddings are
switched by reference). Runs alternate plain/DF and keep the best of each. `--quick`: tiny SD only.

    /work/venv/bin/python bench/dfprompt.py --quick
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from promptist_core.dfprompt import schedule  # noqa: E402
from promptist_core.render_diffusers import generate_dfprompt  # noqa: E402

PLAIN = "a red horse on the grass, anime, detailed, sharp"
DFPROMPT = "a red horse on the grass, [anime:0-1:1.5], [detailed:0.5-1:1.25], [sharp:0-0.5:0.75]"


def sd15_architecture_pipe(tokenizer_dir: Path):
    """SD 1.5's UNet and text encoder shapes with random weights (no weights can be downloaded)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64).eval()
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                num_attention_heads=12, max_position_embeddings=77,
                                                hidden_act="quick_gelu")).eval()
    vae = AutoencoderKL(block_out_channels=[4, 8], norm_num_groups=2, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_generation(pipe, prompt: str, *, steps: int, size: int) -> tuple[float, float]:
    """(seconds before the first UNet call: checks, schedule, encoding; seconds of the denoising loop)."""
    device = pipe._execution_device
    first_call: list[float] = []

    def mark(module, args, kwargs):
        if not first_call:
            _sync(device)
            first_call.append(time.perf_counter())

    hook = pipe.unet.register_forward_pre_hook(mark, with_kwargs=True)
    try:
        _sync(device)
        start = time.perf_counter()
        generate_dfprompt(pipe, prompt, num_inference_steps=steps, height=size, width=size, output_type="latent",
                          generator=torch.Generator(device).manual_seed(0))
        _sync(device)
        end = time.perf_counter()
    finally:
        hook.remove()
    return first_call[0] - start, end - first_call[0]


def measure(pipe, *, steps: int, size: int, repeats: int) -> dict:
    """Plain and DF-Prompt runs interleaved (a busy machine drifts), best of `repeats` for each part."""
    generate_dfprompt(pipe, PLAIN, num_inference_steps=2, height=size, width=size, output_type="latent")  # warm-up
    best = {"plain": [float("inf")] * 2, "dfprompt": [float("inf")] * 2}
    for _ in range(repeats):
        for name, prompt in (("plain", PLAIN), ("dfprompt", DFPROMPT)):
            encode, loop = time_generation(pipe, prompt, steps=steps, size=size)
            best[name] = [min(best[name][0], encode), min(best[name][1], loop)]
    total = {name: sum(parts) for name, parts in best.items()}
    return {
        "steps": steps, "image_size": size, "repeats": repeats, "segments": len(schedule(DFPROMPT, steps)),
        "encode_seconds_plain": round(best["plain"][0], 5), "encode_seconds_dfprompt": round(best["dfprompt"][0], 5),
        "step_seconds_plain": round(best["plain"][1] / steps, 5),
        "step_seconds_dfprompt": round(best["dfprompt"][1] / steps, 5),
        "seconds_per_image_plain": round(total["plain"], 4), "seconds_per_image_dfprompt": round(total["dfprompt"], 4),
        "loop_overhead_ratio": round(best["dfprompt"][1] / best["plain"][1] - 1, 4),
        "overhead_ratio": round(total["dfprompt"] / total["plain"] - 1, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps, small latents, one repeat")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default cpu)")
    parser.add_argument("--models", default=None,
                        help="comma-separated: tiny, sd15 (default: both; --quick: tiny only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    from builders_sd import build_tiny_sd, load_tiny_sd

    results = {"plain_prompt": PLAIN, "dfprompt": DFPROMPT, "device": str(device), "threads": args.threads,
               "torch": torch.__version__, "goal": "overhead_ratio < 0.05 per image"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_sd(Path(tmp) / "tiny-sd")
        models = (args.models or ("tiny" if args.quick else "tiny,sd15")).split(",")
        if "tiny" in models:
            tiny = load_tiny_sd(folder).to(device)
            results["tiny_sd"] = measure(tiny, steps=10 if args.quick else 30, size=64, repeats=10)
        if "sd15" in models:
            sd15 = sd15_architecture_pipe(folder / "tokenizer").to(device)
            # On a CPU one SD 1.5 UNet step at 512x512 takes minutes; the full run is meant for a GPU.
            results["sd15_architecture"] = measure(sd15, steps=4 if args.quick else 20,
                                                   size=128 if args.quick else 512, repeats=2 if args.quick else 3)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
