"""Benchmark: our SFT trainer vs the transformers `Trainer` on the same pairs, batch and steps.

GPT-2 small architecture (124M parameters, 50257-token vocabulary, random weights) and pairs built
from the real fixture corpus (`python -m trainer pairs` logic). Each trainer runs in its own process
(so peak memory is its own): ours with length-bucketed batches and the LM head only on target
positions; the `Trainer` as a user would set it up (`DataCollatorForSeq2Seq`, right padding, random
batches, the same lr schedule and accumulation). Throughput is timed from the end of the first step
to the end of the last (the first step pays one-off costs in both), in wall time and in CPU time of
the process (steadier on a shared machine; with one torch thread, the default, it measures the work
done); the two trainers run in turn, `--repeats` times each, and the best of each counts. Prints one JSON object with pairs/s,
tokens/s (pairs/s x the mean real tokens of a pair), peak memory (CUDA max allocated on GPU, max RSS
on CPU), the mean loss of the last steps of each, and the ratios.

    python bench/sft.py                      # GPT-2 small, 8 steps of 2 x 8 pairs (CPU: a few minutes)
    python bench/sft.py --device cuda --batch-size 32 --effective-batch-size 256 --steps 30
    python bench/sft.py --model tiny --steps 30   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CORPUS = ROOT.parent / "shared" / "fixtures" / "prompts" / "diffusiondb_imagereward.txt"
MODELS = {"small": dict(n_layer=12, n_embd=768, n_head=12), "tiny": dict(n_layer=2, n_embd=64, n_head=4)}


def build_base(folder: Path, model: str, corpus: list[str]) -> Path:
    """Random-weight GPT-2 of the chosen size with GPT-2's vocabulary size and a BPE trained on the corpus."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus + [" Rephrase:"], vocab_size=50257, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=1024)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    GPT2LMHeadModel(GPT2Config(vocab_size=50257, bos_token_id=eos, eos_token_id=eos, **MODELS[model])).save_pretrained(
        folder, safe_serialization=True)
    return folder


def make_pairs_file(folder: Path, prompts: int) -> Path:
    from trainer.policy.corpus import read_corpus
    from trainer.policy.pairs import make_pairs, write_pairs

    pairs, _ = make_pairs(read_corpus(CORPUS, limit=prompts).prompts, seed=0, valid_fraction=0)
    return write_pairs(folder / "pairs.jsonl", pairs)


def peak_memory(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_ours(args, base: Path, pairs: Path, out: Path) -> dict:
    from trainer.policy.sft import SFTConfig, train_sft

    stamps, cpu, losses = [], [], []

    def callback(step, total, metrics):
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())
        losses.append(metrics["loss"])

    config = SFTConfig(pairs=str(pairs), base=str(base), out=str(out), max_steps=args.steps, batch_size=args.batch_size,
                       effective_batch_size=args.effective_batch_size, lr=args.lr, warmup_steps=args.warmup,
                       save_every=0, eval_every=0, log_every=1, tensorboard=False, select="last",
                       max_length=args.max_length, device=args.device, precision=args.precision, seed=args.seed)
    train_sft(config, callback=callback)
    return {"seconds": stamps[-1] - stamps[0], "cpu_seconds": cpu[-1] - cpu[0], "losses": losses,
            "peak_memory": peak_memory(args.device)}


def run_trainer(args, base: Path, pairs: Path, out: Path) -> dict:
    import torch
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from promptist_core.weights import load_tokenizer
    from trainer.policy.pairs import read_pairs
    from trainer.policy.sft import encode_pairs

    tokenizer = load_tokenizer(base)
    tokenizer.pad_token = tokenizer.eos_token
    examples, _ = encode_pairs(tokenizer, read_pairs(pairs), args.max_length)
    dataset = [{"input_ids": list(e.ids), "attention_mask": [1] * len(e.ids),
                "labels": [-100] * e.prompt_len + list(e.ids[e.prompt_len:])} for e in examples]
    model = AutoModelForCausalLM.from_pretrained(str(base)).float()
    stamps, cpu, losses = [], [], []

    class Stamps(TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):
            stamps.append(time.perf_counter())
            cpu.append(time.process_time())

        def on_log(self, targs, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    precision = {"bf16": {"bf16": True}, "fp16": {"fp16": True}}.get(args.precision, {})
    if args.precision == "auto" and args.device.startswith("cuda"):
        precision = {"bf16": True} if torch.cuda.is_bf16_supported() else {"fp16": True}
    targs = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.effective_batch_size // args.batch_size, max_steps=args.steps,
        learning_rate=args.lr, warmup_steps=args.warmup, lr_scheduler_type="linear", weight_decay=0.0,
        max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[], dataloader_num_workers=0,
        seed=args.seed, use_cpu=not args.device.startswith("cuda"), disable_tqdm=True, **precision,
    )
    Trainer(model=model, args=targs, train_dataset=dataset, data_collator=DataCollatorForSeq2Seq(tokenizer),
            callbacks=[Stamps()]).train()
    return {"seconds": stamps[-1] - stamps[0], "cpu_seconds": cpu[-1] - cpu[0], "losses": losses,
            "peak_memory": peak_memory(args.device)}


def child(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    run = run_ours if args.child == "ours" else run_trainer
    result = run(args, work / "base", work / "pairs.jsonl", work / f"out-{args.child}")
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=tuple(MODELS), default="small")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--effective-batch-size", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=3000, help="fixture prompts to build pairs from")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each trainer, in turn; the best counts")
    parser.add_argument("--child", choices=("ours", "trainer"), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        from trainer.policy.pairs import read_pairs

        pairs = make_pairs_file(work, args.prompts)
        corpus = [p.target for p in read_pairs(pairs)]
        build_base(work / "base", args.model, corpus)
        from promptist_core.weights import load_tokenizer
        from trainer.policy.sft import encode_pairs

        examples, _ = encode_pairs(load_tokenizer(work / "base"), read_pairs(pairs), args.max_length)
        mean_tokens = sum(len(e.ids) for e in examples) / len(examples)
        results: dict[str, list[dict]] = {"ours": [], "trainer": []}
        for _ in range(args.repeats):
            for name in ("ours", "trainer"):
                cmd = [sys.executable, __file__, "--child", name, "--work", str(work)] + [
                    a for a in sys.argv[1:] if a not in ("--child", "--work")]
                done = subprocess.run(cmd, capture_output=True, text=True,
                                      env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
                lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                if done.returncode != 0 or not lines:
                    sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
                results[name].append(json.loads(lines[-1][7:]))
                shutil.rmtree(work / f"out-{name}", ignore_errors=True)

    pairs_per_step = args.effective_batch_size
    report = {"model": f"gpt2-{args.model}", "device": args.device, "precision": args.precision,
              "steps": args.steps, "batch_size": args.batch_size, "effective_batch_size": args.effective_batch_size,
              "pairs": len(examples), "mean_tokens_per_pair": round(mean_tokens, 1),
              "torch_threads": args.threads or "default", "repeats": args.repeats, "machine": platform.machine()}
    tail = max(1, args.steps // 4)
    for name, runs in results.items():
        wall = min(r["seconds"] for r in runs)
        cpu = min(r["cpu_seconds"] for r in runs)
        losses = runs[0]["losses"]
        report[name] = {"pairs_per_s": round(pairs_per_step * (args.steps - 1) / wall, 3),
                        "tokens_per_s": round(pairs_per_step * (args.steps - 1) / wall * mean_tokens, 1),
                        "tokens_per_cpu_s": round(pairs_per_step * (args.steps - 1) / cpu * mean_tokens, 1),
                        "peak_memory_mb": round(max(r["peak_memory"] for r in runs) / 2**20, 1),
                        "first_loss": round(losses[0], 4),
                        f"mean_loss_last_{tail}_steps": round(sum(losses[-tail:]) / tail, 4)}
    report["speedup_tokens_per_s"] = round(report["ours"]["tokens_per_s"] / report["trainer"]["tokens_per_s"], 3)
    report["speedup_tokens_per_cpu_s"] = round(report["ours"]["tokens_per_cpu_s"] /
                                               report["trainer"]["tokens_per_cpu_s"], 3)
    report["peak_memory_ratio"] = round(report["ours"]["peak_memory_mb"] / report["trainer"]["peak_memory_mb"], 3)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
