"""Builders for the evaluation tests: a policy constructed to write one word, an image generator that
paints that word red, and an aesthetic head that likes red.

- `build_word_policy(folder, word)`: a real GPT-2 folder (safetensors + config + byte-level BPE) whose
  next-token logits are the same at every position: `,` highest, then ` <word>`, then eos. With the prompt
  kept and `no_repeat_ngram_size=1` (no written token twice) every rewrite is `<prompt>, <word>`.
- `WordColourGenerator`: the ImageGenerator protocol; an image is seeded noise, tinted red when the prompt
  holds the word (a stand-in for "this modifier changes the picture").
- `head_that_likes(clip, positive, negative)`: a linear LAION-layout head along the CLIP direction from
  `negative` images to `positive` ones.
"""

from __future__ import annotations

from pathlib import Path

import torch


def build_word_policy(folder: Path, word: str = "vivid") -> Path:
    from conftest import MODIFIERS, SUBJECTS
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    texts = [f"{s} Rephrase: {s}, {word}, {m}" for s in SUBJECTS for m in MODIFIERS]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=128)
    ids = {t: tokenizer(t)["input_ids"] for t in (",", f" {word}")}
    if any(len(v) != 1 for v in ids.values()):
        raise AssertionError(f"expected one token each, got {ids}")
    tokenizer.save_pretrained(folder)
    eos = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=1, n_head=2,
                        bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        # the final LayerNorm ignores its input (weight 0) and outputs e_0, so logits = wte[:, 0] (tied head)
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        wte = model.transformer.wte.weight
        wte[:, 0] = 0.0
        wte[ids[","][0], 0], wte[ids[f" {word}"][0], 0], wte[eos, 0] = 30.0, 20.0, 10.0
    model.save_pretrained(folder, safe_serialization=True)
    return folder


class WordColourGenerator:
    """Seeded grey noise; prompts that contain `word` are tinted red. Counts its calls."""

    def __init__(self, word: str = "vivid"):
        self.word, self.calls, self.fingerprint = word, [], "word-colour"

    def generate(self, prompts, seeds, *, steps, guidance, size):
        from promptist_core.generators import check_generate_args

        check_generate_args(prompts, seeds, steps, guidance, size)
        self.calls.append(list(prompts))
        width, height = size
        images = []
        for prompt, seed in zip(prompts, seeds, strict=True):
            g = torch.Generator().manual_seed(int(seed))
            image = 0.5 + 0.15 * torch.randn(height, width, 3, generator=g)
            if self.word in prompt.replace(",", " ").split():
                image = image + torch.tensor([0.3, -0.2, -0.2])
            images.append(image.clamp(0, 1))
        return torch.stack(images)


def head_that_likes(clip, positive: torch.Tensor, negative: torch.Tensor):
    from promptist_core.aesthetic import AestheticHead

    direction = (clip.encode_images(positive).mean(0) - clip.encode_images(negative).mean(0)).float()
    head = AestheticHead("linear", embed_dim=direction.numel())
    with torch.no_grad():
        head.linear.weight.copy_(direction / direction.norm() * 10)
        head.linear.bias.fill_(5.0)
    return head
