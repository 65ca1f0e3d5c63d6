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

MC, CTX, TED, ADM = 320, 2048, 1280, 2816  # model_channels, context_dim, time-embed dim, adm_in_channels
CH_MULT, NRB, DEPTH = (1, 1, 1), 2, (0, 1, 2)  # Segmind_Vega's detected depths: [0, 0, 1, 1, 2, 2]
HEAD_CH = 64


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
def _resblock(sd: _StateDict, p: str, cin: int, cout: int) -> None:
    sd.norm(p + "in_layers.0", cin)
    sd.conv(p + "in_layers.2", cout, cin, 3)
    sd.lin(p + "emb_layers.1", cout, TED)
    sd.norm(p + "out_layers.0", cout)
    sd.conv(p + "out_layers.3", cout, cout, 3)
    if cin != cout:
        sd.conv(p + "skip_connection", cout, cin, 1)


def _spatial_transformer(sd: _StateDict, p: str, c: int, depth: int) -> None:
    sd.norm(p + "norm", c)
    sd.lin(p + "proj_in", c, c)  # use_linear_in_transformer=True (SDXL)
    for d in range(depth):
        b = f"{p}transformer_blocks.{d}."
        for a, kv in (("attn1", c), ("attn2", CTX)):
            sd.lin(b + a + ".to_q", c, c, bias=False)
            sd.lin(b + a + ".to_k", c, kv, bias=False)
            sd.lin(b + a + ".to_v", c, kv, bias=False)
            sd.lin(b + a + ".to_out.0", c, c)
        sd.lin(b + "ff.net.0.proj", c * 8, c)  # GEGLU
        sd.lin(b + "ff.net.2", c, c * 4)
        for n in ("norm1", "norm2", "norm3"):
            sd.norm(b + n, c)
    sd.lin(p + "proj_out", c, c)


def _unet(sd: _StateDict, P: str = "model.diffusion_model.") -> None:
    sd.lin(P + "time_embed.0", TED, MC)
    sd.lin(P + "time_embed.2", TED, TED)
    sd.lin(P + "label_emb.0.0", TED, ADM)
    sd.lin(P + "label_emb.0.2", TED, TED)
    sd.conv(P + "input_blocks.0.0", MC, 4, 3)
    chans, ch, k = [MC], MC, 1
    for lvl, m in enumerate(CH_MULT):
        for _ in range(NRB):
            _resblock(sd, f"{P}input_blocks.{k}.0.", ch, MC * m)
            ch = MC * m
            if DEPTH[lvl]:
                _spatial_transformer(sd, f"{P}input_blocks.{k}.1.", ch, DEPTH[lvl])
            chans.append(ch)
            k += 1
        if lvl != len(CH_MULT) - 1:
            sd.conv(f"{P}input_blocks.{k}.0.op", ch, ch, 3)
            chans.append(ch)
            k += 1
    _resblock(sd, P + "middle_block.0.", ch, ch)
    _spatial_transformer(sd, P + "middle_block.1.", ch, DEPTH[-1])
    _resblock(sd, P + "middle_block.2.", ch, ch)
    k = 0
    for lvl, m in list(enumerate(CH_MULT))[::-1]:
        for i in range(NRB + 1):
            _resblock(sd, f"{P}output_blocks.{k}.0.", ch + chans.pop(), MC * m)
            ch = MC * m
            j = 1
            if DEPTH[lvl]:
                _spatial_transformer(sd, f"{P}output_blocks.{k}.1.", ch, DEPTH[lvl])
                j = 2
            if lvl and i == NRB:
                sd.conv(f"{P}output_blocks.{k}.{j}.conv", ch, ch, 3)
            k += 1
    sd.norm(P + "out.0", MC)
    sd.conv(P + "out.2", 4, MC, 3)


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


def _vae(sd: _StateDict, P: str = "first_stage_model.", ch: int = 128, mult=(1, 2, 4, 4), nrb: int = 2,
         z: int = 4) -> None:
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
def _clip_l(sd: _StateDict, P: str = "conditioner.embedders.0.transformer.text_model.", D: int = 768,
            L: int = 12, FF: int = 3072, V: int = 49408, T: int = 77) -> None:
    import torch

    sd.w(P + "embeddings.token_embedding.weight", V, D)
    sd.w(P + "embeddings.position_embedding.weight", T, D, std=0.01)
    sd[P + "embeddings.position_ids"] = torch.arange(T, dtype=torch.int64).unsqueeze(0)
    for i in range(L):
        p = f"{P}encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd.lin(p + "self_attn." + n, D, D)
        sd.norm(p + "layer_norm1", D)
        sd.norm(p + "layer_norm2", D)
        sd.lin(p + "mlp.fc1", FF, D)
        sd.lin(p + "mlp.fc2", D, FF)
    sd.norm(P + "final_layer_norm", D)


# ---------------- OpenCLIP ViT-bigG/14 text tower (open_clip CLIP layout, text keys only) ----------------
def _clip_g(sd: _StateDict, P: str = "conditioner.embedders.1.model.", D: int = 1280, L: int = 32,
            V: int = 49408, T: int = 77, proj: int = 1280) -> None:
    import torch

    sd.w(P + "token_embedding.weight", V, D)
    sd.w(P + "positional_embedding", T, D, std=0.01)
    for i in range(L):
        p = f"{P}transformer.resblocks.{i}."
        sd.norm(p + "ln_1", D)
        sd.w(p + "attn.in_proj_weight", 3 * D, D)
        sd.zeros(p + "attn.in_proj_bias", 3 * D)
        sd.lin(p + "attn.out_proj", D, D)
        sd.norm(p + "ln_2", D)
        sd.lin(p + "mlp.c_fc", 4 * D, D)
        sd.lin(p + "mlp.c_proj", D, 4 * D)
    sd.norm(P + "ln_final", D)
    sd.w(P + "text_projection", D, proj)  # used as x @ text_projection (open_clip)
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


def sgm_yaml() -> str:
    """The A1111 (sgm) model config of the tiny UNet."""
    attn_res = [2 ** lvl for lvl, d in enumerate(DEPTH) if d]
    return SGM_YAML.format(adm=ADM, mc=MC, attn_res=", ".join(map(str, attn_res)), nrb=NRB,
                           ch_mult=", ".join(map(str, CH_MULT)), head_ch=HEAD_CH,
                           depth=", ".join(str(max(d, 1)) for d in DEPTH), depth_mid=DEPTH[-1], ctx=CTX)


def build_tiny_sdxl_state_dict(*, seed: int = 0, fp32: bool = False) -> dict:
    """The whole single-file state dict (~2 GB in fp16)."""
    import torch

    sd = _StateDict(torch.Generator().manual_seed(seed), torch.float32 if fp32 else torch.float16)
    _unet(sd)
    _vae(sd)
    _clip_l(sd)
    _clip_g(sd)
    return dict(sd)


def write_tiny_sdxl(out: str, *, seed: int = 0, fp32: bool = False) -> dict:
    """Write the checkpoint and its A1111 .yaml; return the parameter counts per part."""
    from safetensors.torch import save_file

    sd = build_tiny_sdxl_state_dict(seed=seed, fp32=fp32)
    counts = {part: sum(v.numel() for k, v in sd.items() if k.startswith(prefix)) for part, prefix in (
        ("unet", "model.diffusion_model."), ("vae", "first_stage_model."),
        ("clip_l", "conditioner.embedders.0."), ("clip_g", "conditioner.embedders.1."))}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_file(sd, out, metadata={"format": "pt", "note": "tiny random SDXL-family (Segmind_Vega depths) test checkpoint"})
    with open(os.path.splitext(out)[0] + ".yaml", "w", encoding="utf-8") as f:
        f.write(sgm_yaml())
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--fp32", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    counts = write_tiny_sdxl(a.out, seed=a.seed, fp32=a.fp32)
    print("  ".join(f"{k} {v / 1e6:.1f}M" for k, v in counts.items()), "params")
    print("wrote", a.out, f"({os.path.getsize(a.out) / 2 ** 20:.0f} MiB) and", os.path.splitext(a.out)[0] + ".yaml")


if __name__ == "__main__":
    main()
