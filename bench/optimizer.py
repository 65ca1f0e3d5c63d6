"""Benchmark: the Promptist reference recipe one prompt at a time vs our batched optimizer.

GPT-2 small architecture (124M parameters, 50257-token vocabulary) with random weights: the same
cost per token as microsoft/Promptist. Both paths use the same decoding arguments (8 beams,
length_penalty -1.0, max_new_tokens); outputs must be identical. Prints one JSON object:
prompts/s of each path, the throughput ratio (wall clock, and CPU time of this process, which is
steadier on a shared machine), single-prompt latency of each, the KV cache our path used, and
whether the outputs matched.

    python bench/optimizer.py            # 32 prompts, batch 16, 75 new tokens
    python bench/optimizer.py --quick    # 8 prompts, batch 4, 20 new tokens
    python bench/optimizer.py --cache dynamic   # transformers' default cache instead of ours
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from promptist_core.beam_cache import make_beam_cache  # noqa: E402
from promptist_core.optimizer import PromptOptimizer  # noqa: E402

SUBJECTS = ["a cat riding a bike", "a red horse on the grass", "portrait of an old man", "a castle on a hill",
            "a bowl of fruit on a wooden table", "a dragon flying over snowy mountains", "a city street at night",
            "a lighthouse in a storm", "an astronaut in a jungle", "a fox in the snow", "a robot reading a book",
            "a cozy cabin in the woods with smoke from the chimney", "a ship", "a waterfall", "a tiger",
            "a girl with a red umbrella walking in the rain"]


def gpt2_sized_tokenizer(vocab_size: int = 50257, seed: int = 0):
    """A byte-level BPE with GPT-2's vocabulary size, built from random merges (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(sorted(byte_chars))}
    rng = random.Random(seed)
    tokens = list(vocab)
    merges = []
    # Real-looking merges first (so the prompts tokenize into words), then random ones to fill up.
    for text in SUBJECTS:
        for word in text.split():
            word = "Ġ" + word
            piece = word[0]
            for ch in word[1:]:
                if piece + ch not in vocab:
                    vocab[piece + ch] = len(vocab)
                    merges.append((piece, ch))
                    tokens.append(piece + ch)
                piece += ch
    while len(vocab) < vocab_size - 1:
        a, b = rng.choice(tokens), rng.choice(tokens)
        if a + b not in vocab and len(a + b) < 12:
            vocab[a + b] = len(vocab)
            merges.append((a, b))
            tokens.append(a + b)
    vocab["<|endoftext|>"] = len(vocab)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def reference_generate(model, tokenizer, plain_text: str, max_new_tokens: int) -> str:
    """The Promptist demo's `generate`, one prompt per call."""
    input_ids = tokenizer(plain_text.strip() + " Rephrase:", return_tensors="pt").input_ids
    eos_id = tokenizer.eos_token_id
    outputs = model.generate(input_ids, do_sample=False, max_new_tokens=max_new_tokens, num_beams=8,
                             num_return_sequences=8, eos_token_id=eos_id, pad_token_id=eos_id, length_penalty=-1.0)
    output_texts = tokenizer.batch_decode(outputs, skip_special_tokens=True)
    return output_texts[0].replace(plain_text + " Rephrase:", "").strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=75)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", choices=["beam", "dynamic", "static"], default="beam",
                        help="KV cache of our batched path: beam (promptist_core.beam_cache, falls back to "
                             "dynamic where unsupported), dynamic (transformers' default), static")
    parser.add_argument("--quick", action="store_true", help="8 prompts, batch 4, 20 new tokens")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.batch_size, args.max_new_tokens = 8, 4, 20
    torch.set_num_threads(args.threads)

    from transformers import GPT2Config, GPT2LMHeadModel

    # Derived numbers, stated up front.
    prompts = [SUBJECTS[i % len(SUBJECTS)] + ("" if i < len(SUBJECTS) else f", variant {i}")
               for i in range(args.prompts)]
    tokenizer = gpt2_sized_tokenizer()
    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    model = GPT2LMHeadModel(GPT2Config(bos_token_id=eos, eos_token_id=eos)).eval().to(args.device)
    with tempfile.TemporaryDirectory():
        tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        optimizer = PromptOptimizer(model, tokenizer, name="gpt2-small-random")
        optimizer.cache_implementation = args.cache
        cache_used = args.cache
        if args.cache == "beam" and make_beam_cache(model, args.max_new_tokens) is None:
            cache_used = "dynamic (beam cache unsupported here)"

        with torch.inference_mode():
            reference_generate(model, tokenizer, prompts[0], 2)  # warm-up
            optimizer(prompts[:2], max_new_tokens=2)

            # 1. the reference recipe, one prompt at a time
            t, c = time.perf_counter(), time.process_time()
            reference = [reference_generate(model, tokenizer, p, args.max_new_tokens) for p in prompts]
            reference_s, reference_cpu_s = time.perf_counter() - t, time.process_time() - c

            # 2. our batched path, same decoding arguments
            t, c = time.perf_counter(), time.process_time()
            ours = [r.prompt for r in optimizer(prompts, max_new_tokens=args.max_new_tokens,
                                                batch_size=args.batch_size)]
            ours_s, ours_cpu_s = time.perf_counter() - t, time.process_time() - c

            # 3. single-prompt latency, both paths
            t = time.perf_counter()
            reference_generate(model, tokenizer, prompts[0], args.max_new_tokens)
            reference_single_s = time.perf_counter() - t
            t = time.perf_counter()
            optimizer(prompts[0], max_new_tokens=args.max_new_tokens)
            ours_single_s = time.perf_counter() - t

    print(json.dumps({
        "benchmark": "optimizer",
        "model": "gpt2-small architecture, random weights (124M)",
        "device": args.device, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "prompts": args.prompts, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
        "cache": args.cache, "cache_used": cache_used,
        "reference_prompts_per_s": round(args.prompts / reference_s, 3),
        "batched_prompts_per_s": round(args.prompts / ours_s, 3),
        "throughput_ratio": round(reference_s / ours_s, 2),
        "cpu_time_ratio": round(reference_cpu_s / ours_cpu_s, 2),
        "reference_single_prompt_s": round(reference_single_s, 3),
        "ours_single_prompt_s": round(ours_single_s, 3),
        "single_prompt_latency_ratio": round(ours_single_s / reference_single_s, 3),
        "identical_outputs": ours == reference,
    }))


if __name__ == "__main__":
    main()
