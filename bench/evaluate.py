"""Evaluation throughput: the variants of one (prompt, seed) drawn in one batch vs one image per call.

Model: the tiny SD of the tests (tests/builders_sd.py: the real SD 1.x architectures, random weights) through
`DiffusersGenerator`, scored by the tiny open_clip and a random aesthetic head (tests/builders_clip.py). Both
runs are the same `trainer.evaluate.evaluate` call on the same prompts, seeds and variants (plain and two
string-rewriting variants, so no policy weights are needed); only `batch_size` differs:
- batched: `batch_size=None`, the generator's batch (8) holds two (prompt, seed)s with their 3 variants;
- one at a time: `batch_size=1` and a generator batch of 1.

Derived numbers: images/s of each (wall clock, best of the repeats, the two interleaved) and the ratio batched /
one at a time. GPU numbers come later (`--device cuda --size 512 --steps 20` on a real model with `--sd`).
Prints one JSON object.

    python bench/evaluate.py [--quick] [--sd FOLDER] [--device cpu] [--steps 2] [--size 64] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from trainer.evaluate import Variant, evaluate  # noqa: E402

PROMPTS = ["a cat on a couch", "a red car on a street", "a house at night", "a bowl of fruit",
           "a ship at sea", "a fox in the snow", "a castle on a hill", "portrait of an old man"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 prompts, 1 repeat")
    parser.add_argument("--sd", help="a diffusers folder (default: build the tiny SD in a temporary folder)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from builders_clip import build_tiny_open_clip, save_random_head
    from builders_sd import build_tiny_sd

    from promptist_core.generators import load_diffusers_generator
    from promptist_core.rewards import load_scorer

    tmp = Path(tempfile.mkdtemp(prefix="bench-evaluate-"))
    sd = args.sd or str(build_tiny_sd(tmp / "tiny-sd"))
    build_tiny_open_clip(tmp / "clip")
    save_random_head(tmp / "clip" / "head.safetensors", kind="mlp", seed=3)
    scorer = load_scorer("tiny-open-clip-hub", "head.safetensors", models_dir=tmp / "clip", device=args.device)
    prompts = PROMPTS[:4] if args.quick else PROMPTS
    repeats = 1 if args.quick else args.repeats
    variants = [Variant("plain"), Variant("detailed", optimizer=lambda ps: [p + ", highly detailed" for p in ps]),
                Variant("painted", optimizer=lambda ps: [p + ", oil painting, artstation" for p in ps])]
    images = len(prompts) * args.seeds * len(variants)

    def run(batched: bool) -> float:
        generator = load_diffusers_generator(sd, device=args.device, batch_size=8 if batched else 1)
        clock = time.perf_counter()
        evaluate(prompts, variants, generator, scorer, args.seeds, steps=args.steps, size=(args.size, args.size),
                 batch_size=None if batched else 1, device=args.device)
        return time.perf_counter() - clock

    run(True)  # warm-up (first calls allocate)
    best = {"batched": float("inf"), "one_at_a_time": float("inf")}
    for _ in range(repeats):
        best["batched"] = min(best["batched"], run(True))
        best["one_at_a_time"] = min(best["one_at_a_time"], run(False))
    rate = {k: images / v for k, v in best.items()}
    print(json.dumps({
        "images": images, "variants": len(variants), "prompts": len(prompts), "seeds": args.seeds,
        "steps": args.steps, "size": args.size, "device": args.device, "threads": args.threads,
        "sd": "tiny SD (random weights)" if not args.sd else args.sd,
        "images_per_s_batched": round(rate["batched"], 2), "images_per_s_one_at_a_time": round(rate["one_at_a_time"], 2),
        "ratio_batched_over_one_at_a_time": round(rate["batched"] / rate["one_at_a_time"], 2),
        "seconds_best": {k: round(v, 3) for k, v in best.items()}, "repeats": repeats,
        "python": platform.python_version(), "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
