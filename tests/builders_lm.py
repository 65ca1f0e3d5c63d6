"""A tiny untrained GPT-2 base (2 layers) with a byte-level BPE trained on prompt-like text, saved like a
Hub GPT-2 folder (safetensors, config, tokenizer.json, vocab.json + merges.txt). The BPE's text is built
here, not read from ../shared, so the tiny models (and the learning tests on them) are the same wherever
the tests run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def build_tiny_gpt2_base(folder: Path, extra_texts: Sequence[str] = (), *, n_embd: int = 64, n_layer: int = 2,
                         n_positions: int = 64, vocab_size: int = 600, dropout: float = 0.1, seed: int = 0) -> Path:
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    from conftest import MODIFIERS, SUBJECTS

    texts = list(extra_texts) + [f"{s}, {m}" for s in SUBJECTS for m in MODIFIERS]
    texts += [t + " Rephrase:" for t in extra_texts]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=n_positions)
    tokenizer.save_pretrained(folder)
    bpe.save_model(str(folder))
    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                        n_head=4, bos_token_id=eos, eos_token_id=eos, resid_pdrop=dropout,
                        embd_pdrop=dropout, attn_pdrop=dropout)
    GPT2LMHeadModel(config).save_pretrained(folder, safe_serialization=True)
    return folder
