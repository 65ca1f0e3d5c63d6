"""Benchmark: the Promptist reference recipe one prompt at a time vs our batched optimizer.

GPT-2 small architecture (124M parameters, 50257-token vocabulary) with random weights: the same
cost per token as microsoft/Promptist. Both paths use the same decoding arguments (8 beams,
length_penalty -1.0, max_new_tokens); outputs must be identical. Prints one JSON object:
prompts/s of each path, the throughput ratio (wall clock, and CPU time of this process, which is
steadier on a shared machine), single-prompt latency of each, the KV cache our path used, whether
the outputs matched, and how close each path runs to the machine: achieved FLOP/s of the model's
forwards (2 x weights per token computed, plus attention over the context) next to the measured
matmul peak of this machine, dtype and thread count.

It also times the policy bundled with promptist (promptist-mini, 5.3M parameters) at its own defaults
beside that architecture: one prompt at 8 beams, and the batch.

`--mode diverse` measures PPO's rollout setting instead: diverse beam search, 16 groups x 1 beam,
batched vs one prompt at a time (identical outputs), next to beam search with 16 beams on the same
batch (goal: diverse no slower per prompt).

    python bench/optimizer.py            # 32 prompts, batch 16, 75 new tokens
    python bench/optimizer.py --quick    # 8 prompts, batch 4, 20 new tokens
    python bench/optimizer.py --mode diverse
    python bench/optimizer.py --cache dynamic   # transformers' generate and cache instead of our loop
    python bench/optimizer.py --device cuda --dtype bfloat16 --batch-size 64 --prompts 128
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
    input_ids = tokenizer(plain_text.strip() + " Rephrase:", return_tensors="pt").input_ids.to(model.device)
    eos_id = tokenizer.eos_token_id
    outputs = model.generate(input_ids, do_sample=False, max_new_tokens=max_new_tokens, num_beams=8,
                             num_return_sequences=8, eos_token_id=eos_id, pad_token_id=eos_id, length_penalty=-1.0)
    output_texts = tokenizer.batch_decode(outputs, skip_special_tokens=True)
    return output_texts[0].replace(plain_text + " Rephrase:", "").strip()


class FlopCounter:
    """Forward FLOPs of a GPT-2 from the tokens it computes: 2 x (matmul weights) per token, plus
    2 x 2 x layers x width x context for attention scores and values (a forward pre-hook sees each call)."""

    def __init__(self, model):
        config = model.config
        self.block_flops = 2 * sum(p.numel() for p in model.transformer.h.parameters() if p.dim() == 2)
        self.head_flops = 2 * model.lm_head.weight.numel()
        self.attention_flops = 4 * config.n_layer * config.n_embd  # per token and context position
        self.flops = 0
        self.tokens = 0
        model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        rows, new = ids.shape
        mask = kwargs.get("attention_mask")
        context = mask.shape[-1] if mask is not None else new
        logits = 1 if kwargs.get("logits_to_keep") == 1 else new  # generate also keeps only the last
        self.flops += rows * (new * self.block_flops + logits * self.head_flops + new * self.attention_flops * context)
        self.tokens += rows * new

    def take(self) -> tuple[int, int]:
        flops, tokens, self.flops, self.tokens = self.flops, self.tokens, 0, 0
        return flops, tokens


def matmul_peak(device: str, dtype: torch.dtype, rows: int, width: int) -> dict:
    """FLOP/s of this machine's matmul in this dtype: a large square GEMM, and one shaped like a batched
    decoding step of the model (rows x width x 4 width, GPT-2's MLP)."""
    def rate(m, k, n, repeats):
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        for _ in range(3):
            a @ b
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        sync()
        t = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync()
        return 2 * m * k * n * repeats / (time.perf_counter() - t)

    big = 8192 if device.startswith("cuda") else 2048
    return {"square_gemm_flops": rate(big, big, big, 10), "decode_gemm_flops": rate(rows, width, 4 * width, 20)}


def timed(fn):
    t, c = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - t, time.process_time() - c


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["beam", "diverse"], default="beam")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=75)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--cache", choices=["beam", "dynamic", "static"], default="beam",
                        help="our batched path: beam (promptist_core.beam_search, our loop and KV cache; "
                             "transformers' generate where unsupported), dynamic (generate, default cache), static")
    parser.add_argument("--quick", action="store_true", help="8 prompts, batch 4, 20 new tokens")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.batch_size, args.max_new_tokens = 8, 4, 20
    torch.set_num_threads(args.threads)

    from transformers import GPT2Config, GPT2LMHeadModel

    from promptist_core.beam_search import fast_beam_search_supported

    # Derived numbers, stated up front.
    dtype = getattr(torch, args.dtype)
    prompts = [SUBJECTS[i % len(SUBJECTS)] + ("" if i < len(SUBJECTS) else f", variant {i}")
               for i in range(args.prompts)]
    tokenizer = gpt2_sized_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    model = GPT2LMHeadModel(GPT2Config(bos_token_id=eos, eos_token_id=eos)).eval().to(args.device, dtype)
    optimizer = PromptOptimizer(model, tokenizer, name="gpt2-small-random")
    optimizer.cache_implementation = args.cache
    path = "promptist_core.beam_search" if args.cache == "beam" and fast_beam_search_supported(model) else "generate"
    flops = FlopCounter(model)
    tokens = args.max_new_tokens
    result = {"benchmark": "optimizer", "mode": args.mode,
              "model": "gpt2-small architecture, random weights (124M)", "device": args.device, "dtype": args.dtype,
              "threads": args.threads, "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
              "prompts": args.prompts, "batch_size": args.batch_size, "max_new_tokens": tokens,
              "cache": args.cache, "search": path}

    with torch.inference_mode():
        if args.mode == "beam":
            reference_generate(model, tokenizer, prompts[0], 2)  # warm-up
            optimizer(prompts[:2], max_new_tokens=2)
            flops.take()

            # 1. the reference recipe, one prompt at a time
            reference, reference_s, reference_cpu = timed(
                lambda: [reference_generate(model, tokenizer, p, tokens) for p in prompts])
            reference_flops, reference_tokens = flops.take()

            # 2. our batched path, same decoding arguments
            ours, ours_s, ours_cpu = timed(
                lambda: [r.prompt for r in optimizer(prompts, max_new_tokens=tokens, batch_size=args.batch_size)])
            ours_flops, ours_tokens = flops.take()

            # 3. single-prompt latency, both paths (best of 2: one prompt is short enough to be disturbed)
            reference_single = min(timed(lambda: reference_generate(model, tokenizer, prompts[0], tokens))[1]
                                   for _ in range(2))
            ours_single = min(timed(lambda: optimizer(prompts[0], max_new_tokens=tokens))[1] for _ in range(2))
            result.update({
                "reference_prompts_per_s": round(args.prompts / reference_s, 3),
                "batched_prompts_per_s": round(args.prompts / ours_s, 3),
                "throughput_ratio": round(reference_s / ours_s, 2),
                "cpu_time_ratio": round(reference_cpu / ours_cpu, 2),
                "reference_single_prompt_s": round(reference_single, 3),
                "ours_single_prompt_s": round(ours_single, 3),
                "single_prompt_latency_ratio": round(ours_single / reference_single, 3),
                "reference_tokens_computed": reference_tokens, "ours_tokens_computed": ours_tokens,
                "reference_flops_per_s": round(reference_flops / reference_s),
                "ours_flops_per_s": round(ours_flops / ours_s),
                "identical_outputs": ours == reference,
            })

            # 4. the policy bundled with promptist, at its own defaults (8 beams, prompt kept, no repeats)
            from promptist_core.optimizer import load_optimizer
            from promptist_core.weights import BUNDLED_POLICY

            bundled = load_optimizer(BUNDLED_POLICY, device=args.device, dtype=dtype)
            bundled(prompts[:2], max_new_tokens=2)
            bundled_single = min(timed(lambda: bundled(prompts[0]))[1] for _ in range(3))
            _, bundled_s, _ = timed(lambda: bundled(prompts, batch_size=args.batch_size))
            result.update({
                "bundled_policy": BUNDLED_POLICY,
                "bundled_parameters": sum(p.numel() for p in bundled.model.parameters()),
                "bundled_single_prompt_s": round(bundled_single, 3),
                "bundled_prompts_per_s": round(args.prompts / bundled_s, 3),
                "gpt2_small_vs_bundled_single_prompt_ratio": round(ours_single / bundled_single, 2),
            })
        else:
            kwargs = dict(mode="diverse", num_beams=16, num_beam_groups=16, diversity_penalty=1.0, candidates=16,
                          max_new_tokens=tokens)
            optimizer(prompts[:2], **{**kwargs, "max_new_tokens": 2})
            flops.take()

            # 1. diverse beam search, one prompt at a time
            single, single_s, single_cpu = timed(lambda: [optimizer(p, **kwargs)[0].candidates for p in prompts])
            single_flops, _ = flops.take()
            # 2. diverse beam search, batched
            batched, batched_s, batched_cpu = timed(
                lambda: [r.candidates for r in optimizer(prompts, batch_size=args.batch_size, **kwargs)])
            batched_flops, batched_tokens = flops.take()
            # 3. beam search with 16 beams on the same batch (the cost diverse mode should not exceed)
            _, beam16_s, beam16_cpu = timed(lambda: optimizer(prompts, num_beams=16, candidates=16,
                                                              max_new_tokens=tokens, batch_size=args.batch_size))
            result.update({
                "groups": 16, "beams_per_group": 1,
                "single_prompts_per_s": round(args.prompts / single_s, 3),
                "batched_prompts_per_s": round(args.prompts / batched_s, 3),
                "beam16_batched_prompts_per_s": round(args.prompts / beam16_s, 3),
                "batched_vs_single_ratio": round(single_s / batched_s, 2),
                "batched_vs_single_cpu_ratio": round(single_cpu / batched_cpu, 2),
                "diverse_vs_beam16_time_ratio": round(batched_s / beam16_s, 3),
                "diverse_vs_beam16_cpu_ratio": round(batched_cpu / beam16_cpu, 3),
                "batched_tokens_computed": batched_tokens,
                "single_flops_per_s": round(single_flops / single_s),
                "batched_flops_per_s": round(batched_flops / batched_s),
                "identical_outputs": batched == single,
            })

    # 4. the machine's matmul peak in this dtype and thread count, and the fraction of it each path reaches
    peak = matmul_peak(args.device, dtype, rows=8 * args.batch_size, width=model.config.n_embd)
    result.update({key: round(value) for key, value in peak.items()})
    for key in [k for k in result if k.endswith("_flops_per_s")]:
        result[key.replace("_flops_per_s", "_fraction_of_peak")] = round(result[key] / peak["square_gemm_flops"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
