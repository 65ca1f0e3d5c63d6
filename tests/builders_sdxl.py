"""Builder of a tiny SDXL-family checkpoint in the ORIGINAL single-file layout, for trying the hosts.

Keys: model.diffusion_model.* (sgm UNet), first_stage_model.* (VAE), conditioner.embedders.0.transformer.
text_model.* (CLIP ViT-L, transformers layout) and conditioner.embedders.1.model.* (OpenCLIP ViT-bigG text
tower layout), as SDXL base 1.0 ships. Random N(0, 0.02) weights, norms 1, biases 0, fp16.

What is tiny and what is not (dictated by the hosts' fixed configs and model detection):
  * UNet: ComfyUI's comfy/supported_models.py matches SDXL-family models on model_channels 320,
    context_dim 2048, adm_in_channels 2816, linear proj_in and the per-input-block transformer depths.
    The smallest depth list it knows is Segmind_Vega's [0, 0, 1, 1, 2, 2] (2 res blocks on 3 levels,
    transformer depth 0/1/2 per level), which ComfyUI builds as model_base.SDXL (pooled output + size
    embeddings, like SDXL). channel_mult is read from the weights, so it is (1, 1, 1): every level 320
    wide. Output blocks and the middle block follow the per-level depths, as sgm (A1111) and diffusers
    tie them. -> ~75M params instead of 2.6G.
  * VAE: the SDXL VAE has the SD1 shape, which ComfyUI hard-codes (ch 128, mult 1,2,4,4): full size, 84M.
  * Text encoders: ComfyUI builds CLIP-L from sd1_clip_config.json (768 wide, 12 layers) and CLIP-G from
    clip_config_bigg.json (1280 wide, 32 layers); A1111 builds ViT-bigG-14 through open_clip. Full size:
    123M + 695M params. The whole file is ~2 GB in fp16: never built in the test suite.

Also writes <out>.yaml (an sgm config matching the tiny UNet): A1111 1.10 picks up "<checkpoint>.yaml"
beside a checkpoint as its model config, and its built-in sd_xl_base.yaml would not match this UNet.

usage: python tests/builders_sdxl.py OUT.safetensors [--fp32] [--seed N]
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    """The sizes of the checkpoint. The defaults are what the hosts detect and build (see above);
    `TINY_TEST` keeps the layout but shrinks every width, for the test suite (no host loads it); its two
    text encoders must differ in width, as diffusers' single-file loader tells them apart by it."""

    mc: int = 320  # model_channels
    ch_mult: tuple = (1, 1, 1)
    nrb: int = 2  # num_res_blocks
    depth: tuple = (0, 1, 2)  # transformer depth per level: Segmind_Vega's [0, 0, 1, 1, 2, 2]
    head_ch: int = 64
    groups: int = 32  # GroupNorm groups (UNet and VAE)
    time_dim: int = 256  # addition_time_embed_dim (6 size/crop ids)
    vae_ch: int = 128
    vae_mult: tuple = (1, 2, 4, 4)
    l_dim: int = 768
    l_layers: int = 12
    l_heads: int = 12
    g_dim: int = 1280
    g_layers: int = 32
    g_heads: int = 20

    @property
    def ted(self) -> int:  # time-embed dim
        return 4 * self.mc

    @property
    def ctx(self) -> int:  # context_dim: both encoders' hidden states side by side
        return self.l_dim + self.g_dim

    @property
    def adm(self) -> int:  # adm_in_channels: pooled CLIP-G + 6 time ids
        return self.g_dim + 6 * self.time_dim


HOST = Arch()
TINY_TEST = Arch(mc=32, head_ch=8, groups=8, time_dim=8, vae_ch=8, vae_mult=(1, 2), l_dim=32, l_layers=2,
                 l_heads=2, g_dim=48, g_layers=2, g_heads=2)


class _StateDict(dict):
    """A state dict filled with the random initialisation described above."""

    def __init__(self, gen, dtype):
        super().__init__()
        self.g, self.dt = gen, dtype

    def w(self, k: str, *shape: int, std: float = 0.02) -> None:
        import torch

        self[k] = (torch.randn(*shape, generator=self.g) * std).to(self.dt)

    def zeros(self, k: str, *shape: int) -> None:
        import torch

        self[k] = torch.zeros(*shape, dtype=self.dt)

    def lin(self, k: str, o: int, i: int, bias: bool = True) -> None:
        self.w(k + ".weight", o, i)
        if bias:
            self.zeros(k + ".bias", o)

    def conv(self, k: str, o: int, i: int, ks: int) -> None:
        self.w(k + ".weight", o, i, ks, ks)
        self.zeros(k + ".bias", o)

    def norm(self, k: str, n: int) -> None:
        import torch

        self[k + ".weight"] = torch.ones(n, dtype=self.dt)
        self.zeros(k + ".bias", n)


# ---------------- UNet (sgm openaimodel.UNetModel layout, SDXL flavour) ----------------
def _resblock(sd: _StateDict, a: Arch, p: str, cin: int, cout: int) -> None:
    sd.norm(p + "in_layers.0", cin)
    sd.conv(p + "in_layers.2", cout, cin, 3)
    sd.lin(p + "emb_layers.1", cout, a.ted)
    sd.norm(p + "out_layers.0", cout)
    sd.conv(p + "out_layers.3", cout, cout, 3)
    if cin != cout:
        sd.conv(p + "skip_connection", cout, cin, 1)


def _spatial_transformer(sd: _StateDict, a: Arch, p: str, c: int, depth: int) -> None:
    sd.norm(p + "norm", c)
    sd.lin(p + "proj_in", c, c)  # use_linear_in_transformer=True (SDXL)
    for d in range(depth):
        b = f"{p}transformer_blocks.{d}."
        for attn, kv in (("attn1", c), ("attn2", a.ctx)):
            sd.lin(b + attn + ".to_q", c, c, bias=False)
            sd.lin(b + attn + ".to_k", c, kv, bias=False)
            sd.lin(b + attn + ".to_v", c, kv, bias=False)
            sd.lin(b + attn + ".to_out.0", c, c)
        sd.lin(b + "ff.net.0.proj", c * 8, c)  # GEGLU
        sd.lin(b + "ff.net.2", c, c * 4)
        for n in ("norm1", "norm2", "norm3"):
            sd.norm(b + n, c)
    sd.lin(p + "proj_out", c, c)


def _unet(sd: _StateDict, a: Arch, P: str = "model.diffusion_model.") -> None:
    mc = a.mc
    sd.lin(P + "time_embed.0", a.ted, mc)
    sd.lin(P + "time_embed.2", a.ted, a.ted)
    sd.lin(P + "label_emb.0.0", a.ted, a.adm)
    sd.lin(P + "label_emb.0.2", a.ted, a.ted)
    sd.conv(P + "input_blocks.0.0", mc, 4, 3)
    chans, ch, k = [mc], mc, 1
    for lvl, m in enumerate(a.ch_mult):
        for _ in range(a.nrb):
            _resblock(sd, a, f"{P}input_blocks.{k}.0.", ch, mc * m)
            ch = mc * m
            if a.depth[lvl]:
                _spatial_transformer(sd, a, f"{P}input_blocks.{k}.1.", ch, a.depth[lvl])
            chans.append(ch)
            k += 1
        if lvl != len(a.ch_mult) - 1:
            sd.conv(f"{P}input_blocks.{k}.0.op", ch, ch, 3)
            chans.append(ch)
            k += 1
    _resblock(sd, a, P + "middle_block.0.", ch, ch)
    _spatial_transformer(sd, a, P + "middle_block.1.", ch, a.depth[-1])
    _resblock(sd, a, P + "middle_block.2.", ch, ch)
    k = 0
    for lvl, m in list(enumerate(a.ch_mult))[::-1]:
        for i in range(a.nrb + 1):
            _resblock(sd, a, f"{P}output_blocks.{k}.0.", ch + chans.pop(), mc * m)
            ch = mc * m
            j = 1
            if a.depth[lvl]:
                _spatial_transformer(sd, a, f"{P}output_blocks.{k}.1.", ch, a.depth[lvl])
                j = 2
            if lvl and i == a.nrb:
                sd.conv(f"{P}output_blocks.{k}.{j}.conv", ch, ch, 3)
            k += 1
    sd.norm(P + "out.0", mc)
    sd.conv(P + "out.2", 4, mc, 3)


# ---------------- VAE (ldm AutoencoderKL layout; SDXL's VAE has the SD1 shape) ----------------
def _vres(sd: _StateDict, p: str, cin: int, cout: int) -> None:
    sd.norm(p + "norm1", cin)
    sd.conv(p + "conv1", cout, cin, 3)
    sd.norm(p + "norm2", cout)
    sd.conv(p + "conv2", cout, cout, 3)
    if cin != cout:
        sd.conv(p + "nin_shortcut", cout, cin, 1)


def _vmid(sd: _StateDict, p: str, c: int) -> None:
    _vres(sd, p + "mid.block_1.", c, c)
    sd.norm(p + "mid.attn_1.norm", c)
    for n in ("q", "k", "v", "proj_out"):
        sd.conv(p + "mid.attn_1." + n, c, c, 1)
    _vres(sd, p + "mid.block_2.", c, c)


def _vae(sd: _StateDict, a: Arch, P: str = "first_stage_model.", nrb: int = 2, z: int = 4) -> None:
    ch, mult = a.vae_ch, a.vae_mult
    e = P + "encoder."
    sd.conv(e + "conv_in", ch, 3, 3)
    inm = (1,) + tuple(mult)
    for i in range(len(mult)):
        bi, bo = ch * inm[i], ch * mult[i]
        for j in range(nrb):
            _vres(sd, f"{e}down.{i}.block.{j}.", bi, bo)
            bi = bo
        if i != len(mult) - 1:
            sd.conv(f"{e}down.{i}.downsample.conv", bi, bi, 3)
    _vmid(sd, e, bi)
    sd.norm(e + "norm_out", bi)
    sd.conv(e + "conv_out", 2 * z, bi, 3)
    sd.conv(P + "quant_conv", 2 * z, 2 * z, 1)
    sd.conv(P + "post_quant_conv", z, z, 1)
    d = P + "decoder."
    bi = ch * mult[-1]
    sd.conv(d + "conv_in", bi, z, 3)
    _vmid(sd, d, bi)
    for i in reversed(range(len(mult))):
        bo = ch * mult[i]
        for j in range(nrb + 1):
            _vres(sd, f"{d}up.{i}.block.{j}.", bi, bo)
            bi = bo
        if i != 0:
            sd.conv(f"{d}up.{i}.upsample.conv", bi, bi, 3)
    sd.norm(d + "norm_out", bi)
    sd.conv(d + "conv_out", 3, bi, 3)


# ---------------- CLIP ViT-L/14 text encoder (transformers CLIPTextModel layout) ----------------
def _clip_l(sd: _StateDict, a: Arch, P: str = "conditioner.embedders.0.transformer.text_model.",
            V: int = 49408, T: int = 77) -> None:
    import torch

    D = a.l_dim
    sd.w(P + "embeddings.token_embedding.weight", V, D)
    sd.w(P + "embeddings.position_embedding.weight", T, D, std=0.01)
    sd[P + "embeddings.position_ids"] = torch.arange(T, dtype=torch.int64).unsqueeze(0)
    for i in range(a.l_layers):
        p = f"{P}encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd.lin(p + "self_attn." + n, D, D)
        sd.norm(p + "layer_norm1", D)
        sd.norm(p + "layer_norm2", D)
        sd.lin(p + "mlp.fc1", 4 * D, D)
        sd.lin(p + "mlp.fc2", D, 4 * D)
    sd.norm(P + "final_layer_norm", D)


# ---------------- OpenCLIP ViT-bigG/14 text tower (open_clip CLIP layout, text keys only) ----------------
def _clip_g(sd: _StateDict, a: Arch, P: str = "conditioner.embedders.1.model.", V: int = 49408, T: int = 77) -> None:
    import torch

    D = a.g_dim
    sd.w(P + "token_embedding.weight", V, D)
    sd.w(P + "positional_embedding", T, D, std=0.01)
    for i in range(a.g_layers):
        p = f"{P}transformer.resblocks.{i}."
        sd.norm(p + "ln_1", D)
        sd.w(p + "attn.in_proj_weight", 3 * D, D)
        sd.zeros(p + "attn.in_proj_bias", 3 * D)
        sd.lin(p + "attn.out_proj", D, D)
        sd.norm(p + "ln_2", D)
        sd.lin(p + "mlp.c_fc", 4 * D, D)
        sd.lin(p + "mlp.c_proj", D, 4 * D)
    sd.norm(P + "ln_final", D)
    sd.w(P + "text_projection", D, D)  # used as x @ text_projection (open_clip)
    sd[P + "logit_scale"] = torch.tensor(4.6052, dtype=sd.dt)


SGM_YAML = """\
# sgm config matching tests/builders_sdxl.py's tiny UNet (A1111 loads <checkpoint>.yaml beside the checkpoint)
model:
  target: sgm.models.diffusion.DiffusionEngine
  params:
    scale_factor: 0.13025
    disable_first_stage_autocast: True
    denoiser_config:
      target: sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser
      params:
        num_idx: 1000
        weighting_config:
          target: sgm.modules.diffusionmodules.denoiser_weighting.EpsWeighting
        scaling_config:
          target: sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling
        discretization_config:
          target: sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization
    network_config:
      target: sgm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        adm_in_channels: {adm}
        num_classes: sequential
        use_checkpoint: False
        in_channels: 4
        out_channels: 4
        model_channels: {mc}
        attention_resolutions: [{attn_res}]
        num_res_blocks: {nrb}
        channel_mult: [{ch_mult}]
        num_head_channels: {head_ch}
        use_spatial_transformer: True
        use_linear_in_transformer: True
        transformer_depth: [{depth}]  # a level whose downsampling factor is not in attention_resolutions has none
        transformer_depth_middle: {depth_mid}
        context_dim: {ctx}
        spatial_transformer_attn_type: softmax-xformers
        legacy: False
    conditioner_config:
      target: sgm.modules.GeneralConditioner
      params:
        emb_models:
          - is_trainable: False
            input_key: txt
            target: sgm.modules.encoders.modules.FrozenCLIPEmbedder
            params:
              layer: hidden
              layer_idx: 11
          - is_trainable: False
            input_key: txt
            target: sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2
            params:
              arch: ViT-bigG-14
              version: laion2b_s39b_b160k
              freeze: True
              layer: penultimate
              always_return_pooled: True
              legacy: False
          - is_trainable: False
            input_key: original_size_as_tuple
            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND
            params:
              outdim: 256
          - is_trainable: False
            input_key: crop_coords_top_left
            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND
            params:
              outdim: 256
          - is_trainable: False
            input_key: target_size_as_tuple
            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND
            params:
              outdim: 256
    first_stage_config:
      target: sgm.models.autoencoder.AutoencoderKLInferenceWrapper
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          attn_type: vanilla-xformers
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult: [1, 2, 4, 4]
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
"""


def sgm_yaml(a: Arch = HOST) -> str:
    """The A1111 (sgm) model config of the UNet."""
    attn_res = [2 ** lvl for lvl, d in enumerate(a.depth) if d]
    return SGM_YAML.format(adm=a.adm, mc=a.mc, attn_res=", ".join(map(str, attn_res)), nrb=a.nrb,
                           ch_mult=", ".join(map(str, a.ch_mult)), head_ch=a.head_ch,
                           depth=", ".join(str(max(d, 1)) for d in a.depth), depth_mid=a.depth[-1], ctx=a.ctx)


def build_tiny_sdxl_state_dict(a: Arch = HOST, *, seed: int = 0, fp32: bool = False) -> dict:
    """The whole single-file state dict (HOST: ~2 GB in fp16; TINY_TEST: ~2 MB)."""
    import torch

    sd = _StateDict(torch.Generator().manual_seed(seed), torch.float32 if fp32 else torch.float16)
    _unet(sd, a)
    _vae(sd, a)
    _clip_l(sd, a)
    _clip_g(sd, a)
    return dict(sd)


def write_diffusers_config(folder, a: Arch = HOST):
    """A diffusers SDXL folder without weights (configs, tokenizers, scheduler) of the same architecture:
    what `from_single_file(..., config=folder)` needs to load the single file offline."""
    import json
    from pathlib import Path

    from builders_sd import build_clip_tokenizer
    from transformers import CLIPTextConfig

    folder = Path(folder)
    levels = len(a.ch_mult)
    down = ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in a.depth]
    up = ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(a.depth)]
    configs = {
        "unet": {"_class_name": "UNet2DConditionModel", "sample_size": 128, "in_channels": 4, "out_channels": 4,
                 "block_out_channels": [a.mc * m for m in a.ch_mult], "layers_per_block": a.nrb,
                 "down_block_types": down, "up_block_types": up, "transformer_layers_per_block": [max(d, 1) for d in a.depth],
                 "attention_head_dim": [a.mc * m // a.head_ch for m in a.ch_mult], "cross_attention_dim": a.ctx,
                 "use_linear_projection": True, "norm_num_groups": a.groups, "addition_embed_type": "text_time",
                 "addition_embed_type_num_heads": 64, "addition_time_embed_dim": a.time_dim,
                 "projection_class_embeddings_input_dim": a.adm, "flip_sin_to_cos": True, "freq_shift": 0},
        "vae": {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
                "block_out_channels": [a.vae_ch * m for m in a.vae_mult], "layers_per_block": 2,
                "down_block_types": ["DownEncoderBlock2D"] * len(a.vae_mult),
                "up_block_types": ["UpDecoderBlock2D"] * len(a.vae_mult), "norm_num_groups": a.groups,
                "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        "scheduler": {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                      "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
                      "steps_offset": 1, "timestep_spacing": "leading", "interpolation_type": "linear"},
    }
    assert levels == len(a.depth)
    for name, config in configs.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        file = "scheduler_config.json" if name == "scheduler" else "config.json"
        (folder / name / file).write_text(json.dumps(config, indent=2), encoding="utf-8")
    common = {"vocab_size": 49408, "max_position_embeddings": 77, "bos_token_id": 49406, "eos_token_id": 49407}
    CLIPTextConfig(hidden_size=a.l_dim, intermediate_size=4 * a.l_dim, num_hidden_layers=a.l_layers,
                   num_attention_heads=a.l_heads, hidden_act="quick_gelu", projection_dim=a.l_dim, pad_token_id=1,
                   architectures=["CLIPTextModel"], **common).save_pretrained(folder / "text_encoder")
    CLIPTextConfig(hidden_size=a.g_dim, intermediate_size=4 * a.g_dim, num_hidden_layers=a.g_layers,
                   num_attention_heads=a.g_heads, hidden_act="gelu", projection_dim=a.g_dim, pad_token_id=1,
                   architectures=["CLIPTextModelWithProjection"], **common).save_pretrained(folder / "text_encoder_2")
    tokenizer = build_clip_tokenizer(folder / "tokenizer")
    tokenizer.save_pretrained(folder / "tokenizer")
    tokenizer.pad_token = "!"  # SDXL's second tokenizer pads with "!" (id 0), as ComfyUI's clip_g does
    tokenizer.save_pretrained(folder / "tokenizer_2")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
        "feature_extractor": [None, None], "image_encoder": [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]}, indent=2), encoding="utf-8")
    return folder


def write_tiny_sdxl(out, a: Arch = HOST, *, seed: int = 0, fp32: bool = False) -> dict:
    """Write the checkpoint and its A1111 .yaml; return the parameter counts per part."""
    from safetensors.torch import save_file

    sd = build_tiny_sdxl_state_dict(a, seed=seed, fp32=fp32)
    counts = {part: sum(v.numel() for k, v in sd.items() if k.startswith(prefix)) for part, prefix in (
        ("unet", "model.diffusion_model."), ("vae", "first_stage_model."),
        ("clip_l", "conditioner.embedders.0."), ("clip_g", "conditioner.embedders.1."))}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_file(sd, str(out), metadata={"format": "pt", "note": "tiny random SDXL-family (Segmind_Vega depths) checkpoint"})
    with open(os.path.splitext(out)[0] + ".yaml", "w", encoding="utf-8") as f:
        f.write(sgm_yaml(a))
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--fp32", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--diffusers-config", metavar="DIR",
                    help="also write a weightless diffusers folder of the architecture (for --sd-config headless)")
    ap.add_argument("--config-only", action="store_true", help="write only --diffusers-config")
    a = ap.parse_args()
    if a.diffusers_config:
        print("wrote", write_diffusers_config(a.diffusers_config))
    if a.config_only:
        return
    counts = write_tiny_sdxl(a.out, seed=a.seed, fp32=a.fp32)
    print("  ".join(f"{k} {v / 1e6:.1f}M" for k, v in counts.items()), "params")
    print("wrote", a.out, f"({os.path.getsize(a.out) / 2 ** 20:.0f} MiB) and", os.path.splitext(a.out)[0] + ".yaml")


if __name__ == "__main__":
    main()
