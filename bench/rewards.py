"""Reward scoring throughput: the reference's unbatched path vs our batched scorer, in one run.

Model: the real ViT-L/14 architecture (open_clip `ViT-L-14-quickgelu`) with random weights (no
weights can be downloaded here; speed does not depend on the values) and the improved aesthetic
head's architecture.

- reference (PAE's `PromptScorer.get_score`, one image per call): CLIP's PIL preprocess of one
  image, encode it, the aesthetic head, then tokenize + encode the prompt.
- ours (`RewardScorer.rewards`): the batch preprocessed in torch, one image encoding shared by
  relevance and aesthetics, text embeddings cached per prompt (PPO scores many images of few
  prompts). Measured on image tensors [B, H, W, C] (what generators return) and on PIL images.

Derived numbers: images/s of each path (wall clock and process CPU time, best of the repeats,
the paths interleaved) and the ratio reference time / our time. Prints one JSON object.

    /work/venv/bin/python bench/rewards.py [--quick] [--batch-size 8] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from promptist_core.aesthetic import AestheticHead  # noqa: E402
from promptist_core.clip_models import OpenClipEncoder  # noqa: E402
from promptist_core.rewards import RewardScorer  # noqa: E402


def build_models(architecture: str):
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(architecture)  # random weights, the real architecture
    model.eval().requires_grad_(False)
    preprocess = open_clip.image_transform(model.visual.image_size[0], is_train=False)
    tokenizer = open_clip.get_tokenizer(architecture)
    head = AestheticHead("mlp", embed_dim=model.text_projection.shape[-1])
    cfg = model.visual.preprocess_cfg
    encoder = OpenClipEncoder(model, tokenizer, image_size=model.visual.image_size[0], mean=cfg["mean"],
                              std=cfg["std"], embed_dim=model.text_projection.shape[-1], name=architecture)
    return model, preprocess, tokenizer, head, encoder


def reference_scores(model, preprocess, tokenizer, head, pil_images, prompt: str) -> list[tuple[float, float]]:
    """The reference's unbatched path: everything once per image."""
    out = []
    for image in pil_images:
        with torch.no_grad():
            pixels = preprocess(image).unsqueeze(0)
            image_features = model.encode_image(pixels)
            normalized = F.normalize(image_features, dim=-1)
            aesthetic = head(normalized).item()
            text_features = model.encode_text(tokenizer([prompt]))
            cosine = (normalized @ F.normalize(text_features, dim=-1).T).item()
        out.append((aesthetic, cosine))
    return out


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for one run. CPU time barely moves when other
    processes load the machine; with one thread it is the work done."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat, smaller images")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=512, help="generated image side (SD 1.x: 512)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads (default: torch's, what users get). With 1 thread the batch-1 "
                             "reference wastes nothing on thread sync, and both paths cost the same per image.")
    parser.add_argument("--architecture", default="ViT-L-14-quickgelu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else args.repeats
    size = 256 if args.quick else args.image_size
    n = args.batch_size
    prompt = "a cat riding a bike"

    # 1. models and inputs
    start = time.perf_counter()
    model, preprocess, tokenizer, head, encoder = build_models(args.architecture)
    build_s = time.perf_counter() - start
    scorer = RewardScorer(encoder, head, preset="promptist", batch_size=n)
    rng = np.random.default_rng(0)
    uint8 = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    from PIL import Image

    pil_images = [Image.fromarray(a) for a in uint8]
    tensors = torch.from_numpy(uint8).float() / 255.0

    # 2. warm up both paths once (allocator, first-call overheads), and check they agree
    ref = reference_scores(model, preprocess, tokenizer, head, pil_images[:2], prompt)
    ours = scorer.rewards(tensors[:2], prompt)
    max_cos_diff = max(abs(r[1] - float(c)) for r, c in zip(ref, ours.clip_cosine, strict=True))
    max_aes_diff = max(abs(r[0] - float(a)) for r, a in zip(ref, ours.aesthetic, strict=True))

    # 3. time, interleaved so that load from other processes hits every path alike: the reference
    #    unbatched; ours batched (text cached after the first call, as in PPO); ours on PIL input;
    #    ours with a new prompt every call (nothing cached).
    counter = iter(range(10**6))
    paths = {
        "reference": lambda: reference_scores(model, preprocess, tokenizer, head, pil_images, prompt),
        "ours": lambda: scorer.rewards(tensors, prompt),
        "ours_pil": lambda: scorer.rewards(pil_images, prompt),
        "ours_uncached_text": lambda: scorer.rewards(tensors, f"{prompt} {next(counter)}"),
    }
    wall = {name: float("inf") for name in paths}
    cpu = {name: float("inf") for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            w, c = timed(fn)
            wall[name], cpu[name] = min(wall[name], w), min(cpu[name], c)

    result = {
        "benchmark": "rewards",
        "architecture": args.architecture + " (random weights)",
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "batch_size": n,
        "image_size": size,
        "repeats": repeats,
        "build_s": round(build_s, 2),
        # Best of `repeats`, wall clock and process CPU time; ratio = reference time / our time.
        "images_per_s_wall": {k: round(n / v, 3) for k, v in wall.items()},
        "images_per_s_cpu": {k: round(n / v, 3) for k, v in cpu.items()},
        "ratio_ours_vs_reference_wall": round(wall["reference"] / wall["ours"], 3),
        "ratio_ours_vs_reference_cpu": round(cpu["reference"] / cpu["ours"], 3),
        "ratio_ours_pil_vs_reference_cpu": round(cpu["reference"] / cpu["ours_pil"], 3),
        "ratio_ours_uncached_text_vs_reference_cpu": round(cpu["reference"] / cpu["ours_uncached_text"], 3),
        "max_abs_cosine_diff_vs_reference": round(max_cos_diff, 5),
        "max_abs_aesthetic_diff_vs_reference": round(max_aes_diff, 5),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
