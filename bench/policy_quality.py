"""Quality and speed of a policy on held-out COCO captions, as a user reads its rewrites.

Runs the optimizer at its defaults (or the decoding options given) on plain captions it never trained
on, judges every rewrite (`promptist_core.rewrite_quality`: kept, added, clean, fits, specific, real),
beside a baseline that appends the corpus's most frequent modifiers to every prompt, and times one prompt
at a time at the default 8 beams. Prints one JSON object.

    python bench/policy_quality.py                           # the bundled policy, 1,000 captions
    python bench/policy_quality.py --policy build/bundled-policy/sft/checkpoints/step-0001000 --prompts 200
    python bench/policy_quality.py --keep-prompt 0 --no-repeat-ngram 0 --length-penalty -1   # the reference's
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from promptist_core.optimizer import load_optimizer  # noqa: E402
from promptist_core.rewrite_quality import corpus_vocabulary, frequent_modifiers, judge  # noqa: E402
from promptist_core.weights import BUNDLED_POLICY  # noqa: E402

COCO = ROOT / "data" / "coco" / "captions_val2017.txt"
CORPUS = ROOT / "data" / "diffusiondb" / "prompts.txt"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default=BUNDLED_POLICY, help="policy name or folder (default: the bundled one)")
    parser.add_argument("--prompts", type=int, default=1000, help="held-out COCO captions to judge")
    parser.add_argument("--timed", type=int, default=30, help="prompts timed one at a time")
    parser.add_argument("--keep-prompt", type=int, choices=(0, 1), default=None)
    parser.add_argument("--no-repeat-ngram", type=int, default=None)
    parser.add_argument("--length-penalty", type=float, default=None)
    parser.add_argument("--min-modifiers", type=int, default=None)
    parser.add_argument("--trim", type=int, choices=(0, 1), default=None)
    parser.add_argument("--num-beams", type=int, default=8)
    parser.add_argument("--show", type=int, default=8, help="rewrites printed as examples")
    args = parser.parse_args(argv)

    captions = COCO.read_text(encoding="utf-8").splitlines()[: args.prompts]
    corpus = CORPUS.read_text(encoding="utf-8").splitlines()
    vocabulary = corpus_vocabulary(corpus)
    options = {"num_beams": args.num_beams}
    if args.keep_prompt is not None:
        options["keep_prompt"] = bool(args.keep_prompt)
    if args.no_repeat_ngram is not None:
        options["no_repeat_ngram_size"] = args.no_repeat_ngram
    if args.length_penalty is not None:
        options["length_penalty"] = args.length_penalty
    if args.min_modifiers is not None:
        options["min_modifiers"] = args.min_modifiers
    if args.trim is not None:
        options["trim_to_clip_window"] = bool(args.trim)

    started = time.perf_counter()
    optimizer = load_optimizer(args.policy, device="cpu", dtype="float32")
    load_s = time.perf_counter() - started
    optimizer("a cat riding a bike", **options)  # warm-up
    latencies = []
    for caption in captions[: args.timed]:
        t = time.perf_counter()
        optimizer(caption, **options)
        latencies.append(time.perf_counter() - t)
    t = time.perf_counter()
    rewrites = [r.prompt for r in optimizer(captions, batch_size=16, **options)]
    batch_s = time.perf_counter() - t

    tail = ", ".join(frequent_modifiers(corpus, 5))
    baseline = [f"{c.rstrip('. ')}, {tail}" for c in captions]
    report = {
        "policy": args.policy, "options": options, "held_out_prompts": len(captions),
        "quality": judge(captions, rewrites, vocabulary).to_dict(),
        "baseline_frequent_modifiers": judge(captions, baseline, vocabulary).to_dict(),
        "seconds_per_prompt_one_at_a_time": {"median": statistics.median(latencies), "max": max(latencies)},
        "prompts_per_second_batched": len(captions) / batch_s, "load_seconds": load_s,
        "parameters": sum(p.numel() for p in optimizer.model.parameters()),
        "examples": [{"prompt": c, "rewrite": r} for c, r in zip(captions[: args.show], rewrites, strict=False)],
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
