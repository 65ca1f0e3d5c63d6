"""Benchmark: where one PPO iteration spends its time, and whether the plain prompts' images are free.

A GPT-2-small-architecture policy and value (random weights, GPT-2's vocabulary size), diverse-beam
rollouts as the reference ran them (16 groups x 1 beam), a Stable Diffusion pipeline of the SD 1.x
architecture (tiny by default; `--unet sd15` builds the full-size SD 1.5 UNet with random weights),
DPM-Solver++ for `--image-steps`, `--images` images per prompt, and a CLIP scorer (tiny by default;
`--clip vit-l-14` the real ViT-L/14 architecture). Each iteration is split into rollout, plain-prompt
images (drawn and scored once, then cached), rewrite images, scoring and the learner (log-probs, GAE,
4 PPO epochs). Prints one JSON object per run: the split per iteration, the share of the learner side
(rollout + scoring + learner) against image generation, and the baseline cache hit rate from the
second pass on (the same prompts again).

    python bench/ppo.py                          # tiny SD at 64 px, 20 steps, batch 4, 2 iterations
    python bench/ppo.py --unet sd15 --size 256 --device cuda --dtype fp16 --batch-size 8
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
CORPUS = ROOT.parent / "shared" / "fixtures" / "prompts"


def _bench_sft():
    spec = importlib.util.spec_from_file_location("bench_sft", ROOT / "bench" / "sft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_pipeline(folder: Path, unet: str, dtype: torch.dtype, device: str):
    from builders_sd import build_tiny_sd

    from promptist_core.generators import load_diffusers_generator

    path = build_tiny_sd(folder)
    if unet == "sd15":  # the full SD 1.5 UNet (860M parameters), random weights, in the tiny pipeline
        from diffusers import UNet2DConditionModel

        config = dict(UNet2DConditionModel.load_config(str(path / "unet")))
        config.update(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
                      norm_num_groups=32, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)  # the tiny text encoder's width
        UNet2DConditionModel.from_config(config).save_pretrained(str(path / "unet"))
    return load_diffusers_generator(str(path), device=device, dtype=dtype)


def build_scorer(kind: str, folder: Path, device: str):
    """The tiny test CLIP, or the real ViT-L/14 architecture (random weights) with the improved head's shape."""
    from builders_clip import build_tiny_open_clip, save_random_head

    from promptist_core.aesthetic import AestheticHead
    from promptist_core.clip_models import OPENAI_MEAN, OPENAI_STD, OpenClipEncoder
    from promptist_core.rewards import RewardScorer, load_scorer

    if kind == "tiny":
        build_tiny_open_clip(folder)
        head = save_random_head(folder / "head.safetensors", kind="mlp")
        return load_scorer("tiny-open-clip-hub", str(head), models_dir=folder, device=device)
    import open_clip

    model = open_clip.create_model("ViT-L-14-quickgelu").to(device)
    clip = OpenClipEncoder(model, open_clip.get_tokenizer("ViT-L-14-quickgelu"), image_size=224, mean=OPENAI_MEAN,
                           std=OPENAI_STD, embed_dim=768, name="ViT-L-14 (random)")
    return RewardScorer(clip, AestheticHead("mlp", embed_dim=768), preset="promptist")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--groups", type=int, default=16, help="diverse beam groups (reference: 16)")
    parser.add_argument("--max-new-tokens", type=int, default=75)
    parser.add_argument("--images", type=int, default=2, help="images per prompt (reference code: 2)")
    parser.add_argument("--image-steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--unet", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--clip", choices=("tiny", "vit-l-14"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]

    from trainer.policy.ppo import PPOConfig, train_ppo
    from trainer.policy.rewards import ImageReward

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sft = _bench_sft()
        pairs = sft.make_pairs_file(work, 2000)
        from trainer.policy.pairs import read_pairs

        sft.build_base(work / "policy", "small", [p.target for p in read_pairs(pairs)])
        prompts = (CORPUS / "coco_captions_val2017.txt").read_text(encoding="utf-8").splitlines()[:args.batch_size]
        (work / "prompts.txt").write_text("\n".join(prompts) + "\n")
        generator = build_pipeline(work / "sd", args.unet, dtype, args.device)
        scorer = build_scorer(args.clip, work / "clip", args.device)
        reward = ImageReward(generator, scorer, images_per_prompt=args.images, steps=args.image_steps,
                             size=(args.size, args.size))
        rows = []

        def record(step, total, metrics):
            s = reward.seconds
            row = {"iteration": step, "rollout": metrics["seconds_rollout"], "plain_images": s["plain_images"],
                   "rewrite_images": s["rewrite_images"], "scoring": s["scoring"], "learner": metrics["seconds_learner"],
                   "baseline_hits": metrics["baseline_hits"], "response_len": metrics["response_len"]}
            rows.append({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})

        config = PPOConfig(prompts=str(work / "prompts.txt"), policy=str(work / "policy"), out=str(work / "out"),
                           iterations=args.iterations, batch_size=args.batch_size, num_beam_groups=args.groups,
                           max_new_tokens=args.max_new_tokens, save_every=0, sample_every=0, tensorboard=False,
                           device=args.device, valid_every=0)  # training alone (no held-out validation)
        train_ppo(config, reward, callback=record, baseline_cache=reward.cache)

    later = rows[1:] or rows
    learner_side = sum(r["rollout"] + r["scoring"] + r["learner"] for r in later)
    images = sum(r["rewrite_images"] + r["plain_images"] for r in later)
    lookups = args.batch_size * args.images * len(later)
    report = {
        "policy": "gpt2-small (random)", "unet": args.unet, "clip": args.clip, "size": args.size,
        "image_steps": args.image_steps, "images_per_prompt": args.images, "batch_size": args.batch_size,
        "groups": args.groups, "device": args.device, "dtype": args.dtype, "machine": platform.machine(),
        "iterations": rows,
        "learner_side_over_image_generation": round(learner_side / images, 3) if images else None,
        "plain_images_seconds_after_first_pass": round(sum(r["plain_images"] for r in later), 3),
        "baseline_cache_hit_rate_after_first_pass": round((rows[-1]["baseline_hits"] - rows[0]["baseline_hits"])
                                                          / lookups, 3) if len(rows) > 1 else None,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
