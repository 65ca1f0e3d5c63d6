"""Builders for a tiny Stable Diffusion pipeline, saved the way users' model folders look.

`build_tiny_sd(folder)` writes a diffusers folder (model_index.json, unet/, vae/, text_encoder/,
tokenizer/, scheduler/) with random weights of the real architectures (UNet2DConditionModel,
AutoencoderKL, CLIPTextModel, CLIPTokenizer, DDIMScheduler); `load_tiny_sd(folder)` loads it through
`StableDiffusionPipeline.from_pretrained`. 2 steps at 64x64 take about 0.1 s on one CPU thread.
Reusable by any test that needs an image generator (rewards, PPO).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

TEXT_DIM = 32


# Copied from open_clip/tokenizer.py (CLIP's byte-to-unicode table): importing open_clip costs seconds.
def bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2 ** 8):
        if b not in bs:
            bs.append(b)
            cs.append(2 ** 8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _bundled_bpe() -> Path:
    """open_clip's `bpe_simple_vocab_16e6.txt.gz`, found without importing open_clip."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    return Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"


def build_clip_tokenizer(folder: Path):
    """CLIP's tokenizer from open_clip's bundled `bpe_simple_vocab_16e6.txt.gz`, offline."""
    from transformers import CLIPTokenizer

    lines = gzip.open(_bundled_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # 48894 merges, as open_clip's SimpleTokenizer uses
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"),
                         pad_token="<|endoftext|>", model_max_length=77)


def build_tiny_clip_text_model(seed: int = 0):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
                            eos_token_id=49407, pad_token_id=49407)
    model = CLIPTextModel(config).eval()
    # Freshly initialised LayerNorms have zero bias, so every token's features would average exactly 0;
    # trained CLIPs do not (A1111's mean-rescaled weights divide by that mean).
    with torch.no_grad():
        getattr(model, "text_model", model).final_layer_norm.bias.normal_(0.1, 0.5)
    return model


def build_tiny_sd(folder: Path, *, seed: int = 0) -> Path:
    """Write a tiny SD 1.x-architecture pipeline folder and return it."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = build_clip_tokenizer(folder / "_tokenizer_build")
    text_encoder = build_tiny_clip_text_model(seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        cross_attention_dim=TEXT_DIM, norm_num_groups=2, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4,
                        norm_num_groups=2, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def load_tiny_sd(folder: Path):
    """Load a folder from `build_tiny_sd` the way users load theirs."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_sdxl(tokenizer_dir: Path, *, seed: int = 0):
    """A tiny SDXL-architecture pipeline in memory (two text encoders, pooled + time-id conditioning)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    text_encoder = build_tiny_clip_text_model(seed)
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=TEXT_DIM, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407)).eval()
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        cross_attention_dim=2 * TEXT_DIM, norm_num_groups=2, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + TEXT_DIM,
    )
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4,
                        norm_num_groups=2, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                     scheduler=DDIMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_unet(*, seed: int = 0, cross_attention_dim: int = TEXT_DIM, channels: tuple[int, int] = (4, 8)):
    """The tiny SD 1.x-architecture UNet alone (latent-space tests need no VAE or tokenizer)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=channels, layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        cross_attention_dim=cross_attention_dim, norm_num_groups=2, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
