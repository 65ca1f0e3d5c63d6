"""Rebuild the policy that ships with promptist (`promptist_core/policies/promptist-mini/`) from this repository.

    python recipes/bundled_policy.py            # ~60 min on a 2-core CPU; writes build/bundled-policy/
    python recipes/bundled_policy.py --publish  # then copies the result into promptist_core/policies/

Every step is one of ours, on the CC0 DiffusionDB prompts in `data/diffusiondb/prompts.txt`:
1. a byte-level BPE tokenizer (8k merges, `tokenizers`) trained on the corpus,
2. a randomly initialised 4-layer, 256-wide GPT-2 (seeded) saved as the base folder,
3. `python -m trainer pairs` (main content -> prompt and main content + some modifiers -> prompt),
4. `python -m trainer sft --config recipes/bundled-policy.toml` from that base,
5. the selected weights written as fp16 safetensors with a manifest (sha256 of every file, the recipe's
   sha256) that `tests/test_bundled_policy.py` checks the shipped files against.
The same seeds give the same tokenizer, pairs and data order; the weights match to float rounding.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from promptist_core.policy_folder import DecodingDefaults, write_decoding_defaults  # noqa: E402
from promptist_core.weights import BUNDLED_POLICY_DIR, sha256_of  # noqa: E402

CORPUS = ROOT / "data" / "diffusiondb" / "prompts.txt"
RECIPE = ROOT / "recipes" / "bundled-policy.toml"
SHIPPED = BUNDLED_POLICY_DIR
MANIFEST = "manifest.json"
EOS = "<|endoftext|>"
VOCAB_SIZE = 8192
ARCHITECTURE = {"n_layer": 4, "n_embd": 256, "n_head": 8, "n_positions": 256}
SEED = 0
# The decoding the shipped folder asks for (its promptist.json), chosen by bench/policy_quality.py on 200
# held-out COCO captions against the alternatives (README, "How it decodes"): the prompt kept verbatim (the
# policy writes the modifiers after it), no 2-token repeat of what it wrote (no loops), beams scored by
# their mean log-probability (the reference's -1.0 makes a kept prompt stop at once), at least 3
# modifiers, and the result trimmed at a comma to CLIP's window.
DECODING = {"keep_prompt": True, "no_repeat_ngram_size": 2, "length_penalty": 1.0, "min_modifiers": 3,
            "trim_to_clip": True}


def train_tokenizer(corpus: Path):
    """Byte-level BPE on the corpus, as a transformers GPT-2 fast tokenizer (eos = bos = unk = pad)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train([str(corpus)], vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=[EOS], show_progress=False)
    return GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                             model_max_length=ARCHITECTURE["n_positions"])


def build_base(out: Path) -> Path:
    """The untrained policy (tokenizer + seeded random GPT-2) SFT starts from."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from promptist_core.policy_folder import save_policy_folder

    tokenizer = train_tokenizer(CORPUS)
    eos = tokenizer.convert_tokens_to_ids(EOS)
    torch.manual_seed(SEED)
    config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos, **ARCHITECTURE)
    return save_policy_folder(GPT2LMHeadModel(config), tokenizer, out)


def trainer(*args: str) -> None:
    command = [sys.executable, "-m", "trainer", *args]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)


def export_fp16(trained: Path, out: Path) -> None:
    """The trained folder with its weights stored as fp16 (half the size; the optimizer runs fp32 on CPU)
    and a manifest of every file."""
    from safetensors.torch import load_file, save_file

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for path in sorted(trained.iterdir()):
        if path.is_file() and path.name != "model.safetensors" and not path.name.startswith("."):
            shutil.copy2(path, out / path.name)
    tensors = {k: v.half().contiguous() for k, v in load_file(str(trained / "model.safetensors")).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_decoding_defaults(out, DecodingDefaults(**DECODING))
    files = {p.name: sha256_of(p) for p in sorted(out.iterdir()) if p.is_file()}
    manifest = {"name": out.name, "recipe": RECIPE.relative_to(ROOT).as_posix(), "recipe_sha256": sha256_of(RECIPE),
                "corpus_sha256": sha256_of(CORPUS), "architecture": ARCHITECTURE, "vocab_size": VOCAB_SIZE, "decoding": DECODING,
                "files": files}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(ROOT / "build" / "bundled-policy"), help="working folder")
    parser.add_argument("--publish", action="store_true", help=f"copy the result into {SHIPPED.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "base" / "model.safetensors").is_file():
        build_base(work / "base")
    if not (work / "pairs.jsonl").is_file():
        trainer("pairs", "--corpus", str(CORPUS), "--out", str(work / "pairs.jsonl"), "--seed", str(SEED),
                "--mcm-per-target", "2")
    resume = ["--resume"] if any((work / "sft" / "checkpoints").glob("step-*")) else []  # a stopped build goes on
    if not (work / "sft" / "model.safetensors").is_file():  # published when the run finished
        trainer("sft", "--config", str(RECIPE), "--pairs", str(work / "pairs.jsonl"), "--base", str(work / "base"),
                "--out", str(work / "sft"), *resume)
    export_fp16(work / "sft", work / SHIPPED.name)
    print(f"wrote {work / SHIPPED.name}", flush=True)
    if args.publish:
        if SHIPPED.exists():
            shutil.rmtree(SHIPPED)
        shutil.copytree(work / SHIPPED.name, SHIPPED)
        print(f"published {SHIPPED}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
