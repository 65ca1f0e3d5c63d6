"""Builders for tiny CLIPs and aesthetic heads, saved the way users' files look.

- open_clip: the DESIGN.md tiny config registered with `open_clip.add_model_config`, its state
  dict saved as safetensors (loaded by architecture + file), and the same model in open_clip's
  Hub layout (open_clip_config.json + open_clip_model.safetensors, as timm/...openai ships it).
- transformers: a tiny `CLIPModel` saved with save_pretrained, the CLIP tokenizer built offline from
  open_clip's bundled BPE vocabulary (builders_sd.build_clip_tokenizer), and a preprocessor_config.json.
- aesthetic heads of any width, saved in the published key layouts.
"""

from __future__ import annotations

import json
from pathlib import Path

TINY_ARCH = "promptist-tiny-clip"
TINY_EMBED_DIM = 32
TINY_OPEN_CLIP_CFG = {
    "embed_dim": TINY_EMBED_DIM,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def register_tiny_open_clip(folder: Path) -> str:
    """Register the tiny architecture with open_clip (a JSON config file) and return its name."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{TINY_ARCH}.json"
    path.write_text(json.dumps(TINY_OPEN_CLIP_CFG))
    if TINY_ARCH not in open_clip.list_models():
        open_clip.add_model_config(path)
    return TINY_ARCH


def build_tiny_open_clip(folder: Path, *, seed: int = 0) -> tuple[Path, Path]:
    """Returns (weights file for architecture=TINY_ARCH, folder in open_clip's Hub layout)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    register_tiny_open_clip(folder)
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_ARCH)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    weights = folder / "tiny_open_clip.safetensors"
    save_file(state, str(weights))
    hub = folder / "tiny-open-clip-hub"
    hub.mkdir(exist_ok=True)
    save_file(state, str(hub / "open_clip_model.safetensors"))
    (hub / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": TINY_OPEN_CLIP_CFG,
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                           "std": [0.26862954, 0.26130258, 0.27577711]},
    }))
    return weights, hub


def build_tiny_transformers_clip(folder: Path, *, seed: int = 0, with_tokenizer: bool = True,
                                 logit_scale: float | None = None) -> Path:
    """A tiny CLIPModel folder: config.json, model.safetensors, tokenizer, preprocessor_config.json."""
    import torch
    from builders_sd import build_clip_tokenizer  # the same offline CLIP tokenizer the tiny SD uses
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=TINY_EMBED_DIM,
    )
    model = CLIPModel(config)
    if logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(float(torch.tensor(logit_scale).log()))
    model.save_pretrained(folder, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    if with_tokenizer:  # vocab.json + merges.txt and tokenizer.json, as openai/clip-vit-large-patch14 ships
        build_clip_tokenizer(folder).save_pretrained(folder)
    return folder


def save_random_head(path: Path, *, kind: str = "mlp", embed_dim: int = TINY_EMBED_DIM, seed: int = 0) -> Path:
    """A random aesthetic head in the published key layout, as safetensors (or .pth by suffix)."""
    import torch

    from promptist_core.aesthetic import AestheticHead

    torch.manual_seed(seed)
    state = AestheticHead(kind, embed_dim=embed_dim).state_dict_for_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, str(path))
    return path
