"""Builders for tiny flow-matching (SD3 / MMDiT) models: a single-file checkpoint ComfyUI detects as SD3,
and the diffusers parts of a tiny StableDiffusion3Pipeline for headless tests.

`tiny_sd3_checkpoint(path)` writes the original Stability single-file key layout with random weights
N(0, 0.02) (norms 1, biases 0), the smallest ComfyUI builds from a state dict:
  * MMDiT (`model.diffusion_model.*`): ComfyUI's model_detection takes depth = hidden size / 64 from
    `x_embedder.proj.weight` and counts nothing else, so depth 2 = hidden 128, 2 heads, 2 joint blocks
    (the last one's context block is `pre_only`, as in SD3): ~2 M parameters. Its context embedder
    reads 4096 wide (ComfyUI pads CLIP states to T5's width) and its pooled input 2048 (CLIP-L + CLIP-G).
  * VAE (`first_stage_model.*`, 16 latent channels, no quant convs as SD3's): ComfyUI hard-codes
    ch=128, ch_mult=[1,2,4,4], num_res_blocks=2 for this layout, so it is full size (~84 M).
  * Text encoder: CLIP-L only (`text_encoders.clip_l.*`); ComfyUI builds it from its own config
    (768 wide, 12 layers, ~123 M). CLIP-G and T5 are left out: ComfyUI then fills their part of the
    pooled vector with zeros and the hidden states are CLIP-L's, padded to 4096.
ComfyUI (a125cd84) detects it as `SD3` (model type FLOW, ModelSamplingDiscreteFlow with shift 3.0 + CONST)
through CheckpointLoaderSimple. fp16: ~420 MB.

`build_tiny_sd3_pipeline(tokenizer_dir)` builds a StableDiffusion3Pipeline in memory with a tiny
SD3Transformer2DModel, FlowMatchEulerDiscreteScheduler (shift 3.0), two tiny CLIPs with projection and no
T5 (the pipeline then pads with zeros, as ComfyUI does), and optionally a tiny 16-channel VAE.

    python tests/builders_flow.py /work/hosts/tiny-models/tiny-sd3.safetensors [--fp32] [--seed N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEPTH = 2  # ComfyUI: hidden = 64 * depth
LATENT_CHANNELS = 16
PATCH = 2
POS_EMBED_MAX = 32  # patches per side: images up to 32 * 2 * 8 = 512 px
CONTEXT_IN, POOLED_IN = 4096, 2048


class _StateDict(dict):
    """Random tensors by key, in the style of /work/shared/tools/make_tiny_sd15.py."""

    def __init__(self, generator, dtype):
        super().__init__()
        self.g, self.dt = generator, dtype

    def w(self, key: str, *shape: int, std: float = 0.02) -> None:
        import torch

        self[key] = (torch.randn(*shape, generator=self.g) * std).to(self.dt)

    def lin(self, key: str, out: int, inp: int, bias: bool = True) -> None:
        import torch

        self.w(key + ".weight", out, inp)
        if bias:
            self[key + ".bias"] = torch.zeros(out, dtype=self.dt)

    def conv(self, key: str, out: int, inp: int, k: int) -> None:
        import torch

        self.w(key + ".weight", out, inp, k, k)
        self[key + ".bias"] = torch.zeros(out, dtype=self.dt)

    def norm(self, key: str, n: int) -> None:
        import torch

        self[key + ".weight"] = torch.ones(n, dtype=self.dt)
        self[key + ".bias"] = torch.zeros(n, dtype=self.dt)


def _mmdit(sd: _StateDict, p: str = "model.diffusion_model.", depth: int = DEPTH) -> None:
    h = 64 * depth
    sd.w(p + "pos_embed", 1, POS_EMBED_MAX * POS_EMBED_MAX, h)
    sd.conv(p + "x_embedder.proj", h, LATENT_CHANNELS, PATCH)
    sd.lin(p + "t_embedder.mlp.0", h, 256)
    sd.lin(p + "t_embedder.mlp.2", h, h)
    sd.lin(p + "y_embedder.mlp.0", h, POOLED_IN)
    sd.lin(p + "y_embedder.mlp.2", h, h)
    sd.lin(p + "context_embedder", h, CONTEXT_IN)
    for i in range(depth):
        for block in ("context_block", "x_block"):
            b = f"{p}joint_blocks.{i}.{block}."
            sd.lin(b + "attn.qkv", 3 * h, h)
            pre_only = block == "context_block" and i == depth - 1
            sd.lin(b + "adaLN_modulation.1", (2 if pre_only else 6) * h, h)
            if not pre_only:
                sd.lin(b + "attn.proj", h, h)
                sd.lin(b + "mlp.fc1", 4 * h, h)
                sd.lin(b + "mlp.fc2", h, 4 * h)
    sd.lin(p + "final_layer.linear", PATCH * PATCH * LATENT_CHANNELS, h)
    sd.lin(p + "final_layer.adaLN_modulation.1", 2 * h, h)


def _vae_res(sd: _StateDict, p: str, cin: int, cout: int) -> None:
    sd.norm(p + "norm1", cin)
    sd.conv(p + "conv1", cout, cin, 3)
    sd.norm(p + "norm2", cout)
    sd.conv(p + "conv2", cout, cout, 3)
    if cin != cout:
        sd.conv(p + "nin_shortcut", cout, cin, 1)


def _vae_mid(sd: _StateDict, p: str, c: int) -> None:
    _vae_res(sd, p + "mid.block_1.", c, c)
    sd.norm(p + "mid.attn_1.norm", c)
    for n in ("q", "k", "v", "proj_out"):
        sd.conv(p + "mid.attn_1." + n, c, c, 1)
    _vae_res(sd, p + "mid.block_2.", c, c)


def _vae(sd: _StateDict, p: str = "first_stage_model.", ch: int = 128, mult=(1, 2, 4, 4), nrb: int = 2,
         z: int = LATENT_CHANNELS) -> None:
    e = p + "encoder."
    sd.conv(e + "conv_in", ch, 3, 3)
    in_mult = (1, *mult)
    for i in range(len(mult)):
        cin, cout = ch * in_mult[i], ch * mult[i]
        for j in range(nrb):
            _vae_res(sd, f"{e}down.{i}.block.{j}.", cin, cout)
            cin = cout
        if i != len(mult) - 1:
            sd.conv(f"{e}down.{i}.downsample.conv", cin, cin, 3)
    _vae_mid(sd, e, cin)
    sd.norm(e + "norm_out", cin)
    sd.conv(e + "conv_out", 2 * z, cin, 3)
    d = p + "decoder."
    cin = ch * mult[-1]
    sd.conv(d + "conv_in", cin, z, 3)
    _vae_mid(sd, d, cin)
    for i in reversed(range(len(mult))):
        cout = ch * mult[i]
        for j in range(nrb + 1):
            _vae_res(sd, f"{d}up.{i}.block.{j}.", cin, cout)
            cin = cout
        if i != 0:
            sd.conv(f"{d}up.{i}.upsample.conv", cin, cin, 3)
    sd.norm(d + "norm_out", cin)
    sd.conv(d + "conv_out", 3, cin, 3)


def _clip_l(sd: _StateDict, p: str = "text_encoders.clip_l.transformer.", d: int = 768, layers: int = 12,
            ff: int = 3072, vocab: int = 49408, tokens: int = 77) -> None:
    import torch

    t = p + "text_model."
    sd.w(t + "embeddings.token_embedding.weight", vocab, d)
    sd.w(t + "embeddings.position_embedding.weight", tokens, d, std=0.01)
    sd[t + "embeddings.position_ids"] = torch.arange(tokens, dtype=torch.int64).unsqueeze(0)
    for i in range(layers):
        b = f"{t}encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd.lin(b + "self_attn." + n, d, d)
        sd.norm(b + "layer_norm1", d)
        sd.norm(b + "layer_norm2", d)
        sd.lin(b + "mlp.fc1", ff, d)
        sd.lin(b + "mlp.fc2", d, ff)
    sd.norm(t + "final_layer_norm", d)
    sd.w(p + "text_projection.weight", d, d)


def tiny_sd3_state_dict(*, seed: int = 0, fp16: bool = True) -> dict:
    """The tiny SD3 checkpoint's tensors (see the module docstring)."""
    import torch

    sd = _StateDict(torch.Generator().manual_seed(seed), torch.float16 if fp16 else torch.float32)
    _mmdit(sd)
    _vae(sd)
    _clip_l(sd)
    return dict(sd)


def tiny_sd3_checkpoint(path: Path | str, *, seed: int = 0, fp16: bool = True) -> Path:
    """Write the tiny SD3 single-file checkpoint to `path` and return it."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tiny_sd3_state_dict(seed=seed, fp16=fp16), str(path), metadata={"format": "pt"})
    return path


# --- diffusers -------------------------------------------------------------------------------------

TEXT_DIM = 32


def build_tiny_sd3_transformer(*, seed: int = 0, joint_attention_dim: int = 2 * TEXT_DIM,
                               pooled_projection_dim: int = 2 * TEXT_DIM):
    """A tiny SD3Transformer2DModel (2 joint blocks, 2 heads of 8, 16 latent channels, patch 2)."""
    import torch
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=16, patch_size=PATCH, in_channels=LATENT_CHANNELS, num_layers=2,
                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=joint_attention_dim,
                                 caption_projection_dim=16, pooled_projection_dim=pooled_projection_dim,
                                 out_channels=LATENT_CHANNELS, pos_embed_max_size=16)


def build_tiny_sd3_pipeline(tokenizer_dir: Path, *, seed: int = 0, with_vae: bool = False, transformer=None):
    """A StableDiffusion3Pipeline of tiny parts in memory: two CLIPs with projection (32 wide each: hidden
    states 64 = joint_attention_dim, pooled 64), no T5, flow-matching Euler scheduler with shift 3."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)

    def clip(s: int):
        torch.manual_seed(s)
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, projection_dim=TEXT_DIM, bos_token_id=49406, eos_token_id=49407,
            pad_token_id=49407)).eval()

    vae = None
    if with_vae:
        torch.manual_seed(seed + 3)
        vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
                            norm_num_groups=2, down_block_types=["DownEncoderBlock2D"] * 2,
                            up_block_types=["UpDecoderBlock2D"] * 2, use_quant_conv=False, use_post_quant_conv=False,
                            scaling_factor=1.5305, shift_factor=0.0609)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer if transformer is not None else build_tiny_sd3_transformer(seed=seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=clip(seed + 1), tokenizer=tokenizer, text_encoder_2=clip(seed + 2), tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a tiny random SD3 (MMDiT) single-file checkpoint.")
    parser.add_argument("out", type=Path)
    parser.add_argument("--fp32", action="store_true", help="fp32 tensors (default fp16)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = tiny_sd3_checkpoint(args.out, seed=args.seed, fp16=not args.fp32)
    print(f"{path} ({path.stat().st_size / 2 ** 20:.0f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
