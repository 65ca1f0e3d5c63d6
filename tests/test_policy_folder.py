"""save_policy_folder: one policy folder that loads in transformers 4.30 (A1111 1.10) and 5.x alike."""

from __future__ import annotations

import json

import pytest
import torch

from promptist_core.optimizer import load_optimizer
from promptist_core.policy_folder import save_policy_folder
from promptist_core.weights import load_tokenizer

PROMPTS = ["a cat riding a bike", "a castle on a hill"]
# Loads the folder through the real loader and prints the rewrites and the tokenizer's ids, as JSON.
LOAD_AND_GENERATE = """
import json, sys, torch, transformers
from promptist_core.optimizer import load_optimizer
opt = load_optimizer(sys.argv[1], device="cpu")
out = [r.prompt for r in opt(json.loads(sys.argv[2]), max_new_tokens=12)]
ids = opt.tokenizer("a cat, highly detailed Rephrase:")["input_ids"]
with torch.no_grad():
    logits = opt.model(torch.tensor([ids])).logits[0, -1].tolist()
print(json.dumps({"version": transformers.__version__, "tokenizer": type(opt.tokenizer).__name__,
                  "ids": ids, "logits": logits, "out": out}))
"""


def transformers5_style_policy(tiny_promptist_dir):
    """The tiny policy as a transformers 5 trainer holds it: a tokenizer of class TokenizersBackend."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    folder = tiny_promptist_dir / "tiny-promptist"
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(folder / "tokenizer.json")),
                                        eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                        unk_token="<|endoftext|>")
    return model, tokenizer


def test_tokenizer_files_are_the_ones_transformers_4_30_reads(tiny_promptist_dir, tmp_path):
    model, tokenizer = transformers5_style_policy(tiny_promptist_dir)
    folder = save_policy_folder(model, tokenizer, tmp_path / "policy")

    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer.json",
            "tokenizer_config.json"} <= names
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "GPT2Tokenizer"
    assert "backend" not in config
    merges = json.loads((folder / "tokenizer.json").read_text())["model"]["merges"]
    assert all(isinstance(m, str) and len(m.split(" ")) == 2 for m in merges)  # tokenizers 0.13's form
    # and transformers 5 reads it back as the same tokenizer
    text = "a red horse on the grass, highly detailed Rephrase:"
    assert load_tokenizer(folder)(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_saving_again_replaces_the_folder_and_a_failed_save_keeps_the_old_one(tiny_promptist_dir, tmp_path):
    model, tokenizer = transformers5_style_policy(tiny_promptist_dir)
    folder = tmp_path / "policy"
    folder.mkdir()
    (folder / "stale.bin").write_bytes(b"old")
    save_policy_folder(model, tokenizer, folder)
    assert not (folder / "stale.bin").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]  # no temporary folders left

    class Broken:
        def save_pretrained(self, out):
            raise OSError("disk full")

    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(OSError, match="disk full"):
        save_policy_folder(model, Broken(), folder)
    assert sorted(p.name for p in folder.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]


def test_saved_policy_loads_and_generates_in_transformers_4_30_and_5(tiny_promptist_dir, tmp_path,
                                                                      transformers430_python):
    model, tokenizer = transformers5_style_policy(tiny_promptist_dir)
    folder = save_policy_folder(model, tokenizer, tmp_path / "policy")

    done = transformers430_python.run(LOAD_AND_GENERATE, str(folder), json.dumps(PROMPTS))
    assert done.returncode == 0, done.stderr[-3000:]
    old = json.loads(done.stdout.strip().splitlines()[-1])

    assert old["version"].startswith("4.30.")
    assert old["tokenizer"] == "GPT2TokenizerFast"  # its tokenizer.json loaded, no fallback needed
    assert "did not load" not in done.stderr
    # transformers 5, in this process, through the same loader
    optimizer = load_optimizer(str(folder), device="cpu")
    now = [r.prompt for r in optimizer(PROMPTS, max_new_tokens=12)]
    ids = optimizer.tokenizer("a cat, highly detailed Rephrase:")["input_ids"]
    assert old["ids"] == ids
    with torch.no_grad():
        logits = optimizer.model(torch.tensor([ids])).logits[0, -1]
    # The same weights in both (beam search itself differs slightly between the versions' scorers).
    torch.testing.assert_close(torch.tensor(old["logits"]), logits, rtol=1e-4, atol=1e-4)
    for prompt, a, b in zip(PROMPTS, old["out"], now, strict=True):
        assert a.startswith(prompt) and b.startswith(prompt)


def test_load_tokenizer_reads_a_folder_saved_by_transformers_5_in_4_30(tiny_promptist_dir, tmp_path,
                                                                        transformers430_python):
    """A folder written by plain `save_pretrained` in transformers 5 (TokenizersBackend, new tokenizer.json),
    plus vocab.json + merges.txt: transformers 4.30 cannot read its config, the fallback reads the vocab."""
    import shutil

    model, tokenizer = transformers5_style_policy(tiny_promptist_dir)
    folder = tmp_path / "raw"
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tiny_promptist_dir / "tiny-promptist" / name, folder / name)
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "TokenizersBackend"

    done = transformers430_python.run(LOAD_AND_GENERATE, str(folder), json.dumps(PROMPTS))
    assert done.returncode == 0, done.stderr[-3000:]
    old = json.loads(done.stdout.strip().splitlines()[-1])
    assert old["ids"] == tokenizer("a cat, highly detailed Rephrase:")["input_ids"]
    assert all(old["out"])


# A DF-Prompt policy's choices for a given rewrite, through the real loader, as JSON.
DFPROMPT_CHOICES = """
import json, sys, transformers
from promptist_core.optimizer import load_optimizer
opt = load_optimizer(sys.argv[1], device="cpu")
ids = opt._tokenize("a cat riding a bike Rephrase:")
out = opt._dfprompt("a cat riding a bike", ids, "a cat riding a bike, sharp focus, 8k, concept art", "argmax", None, 0)
print(json.dumps({"version": transformers.__version__, "dfprompt": opt.is_dfprompt, "out": out}))
"""


def test_a_dfprompt_policy_folder_chooses_the_same_blocks_in_transformers_4_30_and_5(tiny_promptist_dir, tmp_path,
                                                                                   transformers430_python):
    from promptist_core import dfprompt
    from promptist_core.dfprompt_policy import DFHeads

    model, tokenizer = transformers5_style_policy(tiny_promptist_dir)
    heads = DFHeads(model.config.n_embd)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        heads.weight.weight.copy_(torch.randn(heads.weight.weight.shape, generator=g))
        heads.range.weight.copy_(torch.randn(heads.range.weight.shape, generator=g))
    folder = save_policy_folder(model, tokenizer, tmp_path / "df-policy", dfprompt_heads=heads)

    done = transformers430_python.run(DFPROMPT_CHOICES, str(folder))
    assert done.returncode == 0, done.stderr[-3000:]
    old = json.loads(done.stdout.strip().splitlines()[-1])
    assert old["version"].startswith("4.30.") and old["dfprompt"] is True
    now = load_optimizer(str(folder), device="cpu")
    ids = now._tokenize("a cat riding a bike Rephrase:")
    assert old["out"] == now._dfprompt("a cat riding a bike", ids, "a cat riding a bike, sharp focus, 8k, concept art",
                                       "argmax", None, 0)
    assert dfprompt.parse(old["out"]).modifiers, old["out"]


# The ids a folder's tokenizer gives, through the real loader, as JSON.
TOKENIZER_IDS = """
import json, sys
from pathlib import Path
from promptist_core.weights import load_tokenizer
tok = load_tokenizer(Path(sys.argv[1]))
print(json.dumps(tok("a cat riding a bike, highly detailed Rephrase:")["input_ids"]))
"""


def vocab_only_folder(tiny_promptist_dir, tmp_path):
    """The layout README documents for models/promptist/gpt2/: only GPT-2's vocab.json + merges.txt."""
    import shutil

    folder = tmp_path / "gpt2"
    folder.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tiny_promptist_dir / "tiny-promptist" / name, folder / name)
    return folder


def test_a_folder_of_only_vocab_and_merges_tokenizes_like_the_full_tokenizer(tiny_promptist_dir, tmp_path):
    """transformers 5 builds an empty tokenizer from `vocab_file=`/`merges_file=`; the loader must not."""
    full = load_tokenizer(tiny_promptist_dir / "tiny-promptist")
    text = "a cat riding a bike, highly detailed Rephrase:"
    tokenizer = load_tokenizer(vocab_only_folder(tiny_promptist_dir, tmp_path))
    assert tokenizer(text)["input_ids"] == full(text)["input_ids"]
    assert tokenizer.eos_token == "<|endoftext|>"


def test_a_folder_of_only_vocab_and_merges_tokenizes_the_same_in_transformers_4_30(tiny_promptist_dir, tmp_path,
                                                                                  transformers430_python):
    full = load_tokenizer(tiny_promptist_dir / "tiny-promptist")
    done = transformers430_python.run(TOKENIZER_IDS, str(vocab_only_folder(tiny_promptist_dir, tmp_path)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == full("a cat riding a bike, highly detailed Rephrase:")["input_ids"]
