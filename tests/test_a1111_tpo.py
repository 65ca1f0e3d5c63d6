"""A1111/Forge: Train TPO (LoRA) in the Promptist tab, on the loaded checkpoint through the webui's own model.

The loaded checkpoint is a fake `shared.sd_model` built from tiny real modules: the tiny SD UNet of
tests/test_tpo.py (trained as a colour-blind denoiser) seen through an ldm-layout module tree
(`input_blocks`, `middle_block`, `output_blocks`, as A1111's and Forge's UNets; the attention layers are
the diffusers ones, so the names differ from diffusers'), with A1111's members (`apply_model(x_t, t,
cond)` returning epsilon, `alphas_cumprod`, `get_learned_conditioning`, `encode_first_stage` giving a
distribution) or Forge's (`forge_objects.unet.model.apply_model(x, sigma, ...)` returning the denoised
latent). The task is test_tpo's: learn which colour a caption names; "car" and "boat" are held out.
"""

from __future__ import annotations

import csv
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT
from fake_webui import load_script_in_fake_webui
from safetensors import safe_open
from safetensors.torch import load_file
from test_tpo import COLOURS, OBJECTS, SD_SCHEDULE, base_state, text_parts  # noqa: F401 (fixtures)
from torch import nn

PIXELS = 64  # the fake VAE pools 8 x 8: latents [4, 8, 8] as in test_tpo


class LdmUNet(nn.Module):
    """The tiny diffusers UNet (layers_per_block 1; CrossAttnDown, Down / Up, CrossAttnUp) under the ldm
    module tree A1111 and Forge have: input_blocks.1.1 is down_blocks.0.attentions.0, output_blocks.2.1 is
    up_blocks.1.attentions.0, ... Called as (x, timesteps, context)."""

    def __init__(self, unet):
        super().__init__()
        d, u = unet.down_blocks, unet.up_blocks
        seq = nn.Sequential
        self.input_blocks = nn.ModuleList([seq(unet.conv_in), seq(d[0].resnets[0], d[0].attentions[0]),
                                           seq(d[0].downsamplers[0]), seq(d[1].resnets[0])])
        self.middle_block = seq(unet.mid_block.resnets[0], unet.mid_block.attentions[0], unet.mid_block.resnets[1])
        self.output_blocks = nn.ModuleList([seq(u[0].resnets[0]), seq(u[0].resnets[1], u[0].upsamplers[0]),
                                            seq(u[1].resnets[0], u[1].attentions[0]),
                                            seq(u[1].resnets[1], u[1].attentions[1])])
        self.unet = unet  # registered last: the shared modules keep their ldm paths

    def forward(self, x, timesteps, context=None, y=None):
        return self.unet(x, timesteps, encoder_hidden_states=context).sample


class Posterior:
    def __init__(self, mean):
        self.mean = mean

    def mode(self):
        return self.mean


def fake_vae(pixels):
    """Pixels [B, 3, H, W] in -1..1 -> latents [B, 4, H/8, W/8]: channel 0 is red minus blue (test_tpo_node's)."""
    p = F.avg_pool2d((pixels.float() + 1) / 2, 8)
    r, g, b = p[:, 0], p[:, 1], p[:, 2]
    return torch.stack([(r - b) * 1.25, (g - 0.5) * 2, (r + b - 1) * 2, (0.5 - g) * 2], dim=1)


class FakeSDModel(nn.Module):
    """`shared.sd_model` of A1111 1.10 (ldm LatentDiffusion, eps) as far as TPO uses it."""

    def __init__(self, unet, text):
        super().__init__()
        from diffusers import DDPMScheduler

        self.model = nn.Module()
        self.model.diffusion_model = LdmUNet(unet)
        self.register_buffer("alphas_cumprod", DDPMScheduler(**SD_SCHEDULE).alphas_cumprod.clone())
        self.parameterization = "eps"
        self.first_stage_model = nn.Conv2d(3, 4, 1)  # weights for the latents' fingerprint
        self.tokenizer, self.text_encoder = text
        self.sd_checkpoint_info = SimpleNamespace(name_for_extra="tiny-sd15", sha256="ab" * 32)

    def get_learned_conditioning(self, texts):
        ids = self.tokenizer(list(texts), padding="max_length", max_length=12, truncation=True,
                             return_tensors="pt").input_ids
        return self.text_encoder(ids)[0]

    def encode_first_stage(self, pixels):
        return Posterior(fake_vae(pixels))

    def get_first_stage_encoding(self, z):
        return z

    def apply_model(self, x, t, cond):
        return self.model.diffusion_model(x, t, context=cond)


class FakeKModel(nn.Module):
    """Forge's KModel: `apply_model(x, sigma, c_crossattn)` with x = x_0 + sigma * eps, returns x_0."""

    def __init__(self, diffusion_model, alphas_cumprod):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.predictor = nn.Module()
        self.predictor.register_buffer("sigmas", ((1 - alphas_cumprod) / alphas_cumprod).sqrt())

    def apply_model(self, x, t, c_crossattn=None, **kwargs):
        s = t.view(-1, 1, 1, 1)
        timestep = (self.predictor.sigmas.log()[None] - t.log()[:, None]).abs().argmin(dim=1)
        return x - self.diffusion_model(x / (s ** 2 + 1).sqrt(), timestep, context=c_crossattn) * s


class FakeForgeObjects(SimpleNamespace):
    """Forge's ForgeObjects (unet, vae patchers); `shallow_copy` as the webui copies them per job."""

    def shallow_copy(self):
        return FakeForgeObjects(**vars(self))


class FakeForgeModel(FakeSDModel):
    """`shared.sd_model` of Forge classic / Neo: the same legacy members, the UNet in forge_objects, the
    checkpoint's own patchers in forge_objects_original."""

    def __init__(self, unet, text):
        super().__init__(unet, text)
        self.forge_objects = FakeForgeObjects(
            unet=SimpleNamespace(model=FakeKModel(self.model.diffusion_model, self.alphas_cumprod)),
            vae=SimpleNamespace(first_stage_model=self.first_stage_model))
        self.forge_objects_original = self.forge_objects.shallow_copy()

    def encode_first_stage(self, pixels):
        return fake_vae(pixels)


def colour_folder(folder: Path, per_caption: int = 3, seed: int = 0) -> Path:
    """Images of a red or blue thing with blocky noise and same-name .txt captions ("a red square", ...)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for obj in OBJECTS:
        for colour in COLOURS:
            for k in range(per_caption):
                base = torch.tensor([0.9, 0.5, 0.1] if colour == "red" else [0.1, 0.5, 0.9])
                noise = torch.randn(PIXELS // 8, PIXELS // 8, 3, generator=g) * 0.12
                image = (base + noise).repeat_interleave(8, 0).repeat_interleave(8, 1).clamp(0, 1)
                name = f"{colour}-{obj}-{k}"
                Image.fromarray((image * 255).round().to(torch.uint8).numpy()).save(folder / f"{name}.png")
                (folder / f"{name}.txt").write_text(f"a {colour} {obj}")
    return folder


@pytest.fixture
def webui(monkeypatch, tmp_path, base_state, text_parts):  # noqa: F811
    """The extension in the fake webui with the fake A1111 checkpoint loaded and a Lora extension."""
    from builders_sd import build_tiny_unet

    models = tmp_path / "models"
    module = load_script_in_fake_webui(ROOT / "scripts" / "promptist.py", monkeypatch, models, {})
    unet = build_tiny_unet(channels=(8, 16))
    unet.load_state_dict(base_state)
    shared = sys.modules["modules.shared"]
    shared.sd_model = FakeSDModel(unet, text_parts)
    shared.cmd_opts = SimpleNamespace(lora_dir=str(models / "Lora"))
    networks = types.ModuleType("networks")
    networks.listed, networks.loaded_networks = [], ["a LoRA of the last job"]
    networks.list_available_networks = lambda: networks.listed.append(sorted(p.name for p in (models / "Lora").iterdir()))
    monkeypatch.setitem(sys.modules, "networks", networks)
    module.shared, module.networks, module.images = shared, networks, colour_folder(tmp_path / "images")
    return module


def train(webui, save_name="colour", **overrides):
    """Press Train TPO (the function the button calls through wrap_gradio_gpu_call)."""
    args = dict(source="folder", prompts="", folder=str(webui.images), save_name=save_name, loss="tdpo", steps=60,
                rank=4, beta=100.0, lr=6e-3, batch_size=12, grad_accum=1, resolution=PIXELS, seed=0, save_every=30,
                negatives_per_caption=1, valid_fraction=0.25, sampler_name="Euler", image_steps=4, cfg=7.0)
    args.update(overrides)
    return webui.tab._train_tpo("task(tpo)", *args.values())


def a1111_unmatched(path: Path, diffusion_model: nn.Module) -> list[str]:
    """The keys of the LoRA file A1111's Lora extension would not match to a layer of this UNet: its
    diffusers-name formula (SD layouts), then its direct ldm-name rule."""
    layers = {"diffusion_model_" + p.replace(".", "_") for p, m in diffusion_model.named_modules()
              if isinstance(m, nn.Linear)}
    with safe_open(str(path), "pt") as f:
        names = {k.split(".", 1)[0] for k in f.keys()}
    return sorted(n for n in names if n.replace("lora_unet", "diffusion_model") not in layers)


def test_train_tpo_trains_the_loaded_checkpoint_into_the_lora_folder_and_held_out_accuracy_rises(webui, tmp_path):
    unet = webui.shared.sd_model.model.diffusion_model
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([600, 900]), webui.shared.sd_model.get_learned_conditioning(
        ["a red car", "a blue boat"])
    with torch.no_grad():
        before = unet(x, t, context=cond)

    curve, message = train(webui)
    lora = tmp_path / "models" / "Lora" / "colour.safetensors"
    assert "TPO finished" in message and "&lt;lora:colour:1&gt;" in message, message
    assert lora.is_file() and webui.networks.listed == [["colour.safetensors"]]  # listed for <lora:colour:1> now
    rows = list(csv.DictReader(open(tmp_path / "models" / "promptist" / "colour" / "train_log.csv")))
    evals = [r for r in rows if r.get("valid_accuracy")]
    accuracy = float(evals[-1]["valid_accuracy"])
    gap = float(evals[-1]["valid_d_rejected"]) - float(evals[-1]["valid_d_chosen"])
    # A zero LoRA ties every pair (0.5); held-out captions, never trained on, must reach 0.9 with a clear gap
    assert len(evals) == 2 and accuracy >= 0.9 and gap > 0.05, evals[-1]
    state = webui.shared.state
    assert (state.job_count, state.job_no) == (60, 60) and state.textinfo.startswith("Promptist TPO (tdpo): 60/60")
    assert state.previews and curve.size == state.previews[-1].size  # the live curve
    assert webui.networks.loaded_networks == []  # the last job's LoRAs were not trained into the run

    # the webui's UNet is as before: hooks off, no gradient wanted, same output
    assert not any(m._forward_hooks for m in unet.modules())
    assert all(p.requires_grad for p in unet.parameters())  # as built (restored after training)
    with torch.no_grad():
        assert torch.equal(unet(x, t, context=cond), before)

    # A1111 matches every key of the file to a layer of this UNet (a layout with one res block per level:
    # saved under ldm names, which A1111, Forge and ComfyUI map directly)
    with safe_open(str(lora), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_output_blocks_2_1_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in keys
    assert a1111_unmatched(lora, unet) == []
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_sd_model_name"] == "tiny-sd15"
    assert meta["ss_sd_model_hash"] == "ab" * 32 and meta["ss_network_dim"] == "4"


def test_the_lora_file_reproduces_the_trained_model_when_applied_as_a1111_does(webui, tmp_path):
    """up @ down * alpha / rank merged into each named layer's weight (what `<lora:colour:1>` does) gives
    the predictions the training saw with the LoRA on."""
    from promptist_webui.tpo import WebuiDenoiser

    train(webui, steps=6, save_every=3)
    sd_model = webui.shared.sd_model
    unet = sd_model.model.diffusion_model
    tensors = load_file(tmp_path / "models" / "Lora" / "colour.safetensors")
    denoiser = WebuiDenoiser(sd_model, rank=4, resolution=PIXELS)
    params = load_file(sorted((tmp_path / "models" / "promptist" / "colour" / "checkpoints").iterdir())[-1] /
                       "lora.safetensors")
    with torch.no_grad():
        for i, p in enumerate(denoiser.trainable_parameters()):
            p.copy_(params[f"{i:05d}"])
        x, t = torch.randn(2, 4, 8, 8), torch.tensor([600, 900])
        cond = denoiser.encode_text(["a red car", "a blue boat"])
        trained = denoiser.predict(x, t, cond)
        denoiser.close()
        base = sd_model.apply_model(x, t, cond)
        modules = dict(unet.named_modules())
        for key in {k.split(".", 1)[0] for k in tensors}:
            layer = modules[next(p for p in modules if "lora_unet_" + p.replace(".", "_") == key)]
            down, up = tensors[f"{key}.lora_down.weight"].float(), tensors[f"{key}.lora_up.weight"].float()
            layer.weight += up @ down * (tensors[f"{key}.alpha"].float() / down.shape[0])
        merged = sd_model.apply_model(x, t, cond)
    change = (trained - base).abs().max()
    assert change > 1e-4 and (merged - trained).abs().max() < 0.05 * change  # fp16 file vs fp32 training


def test_interrupt_saves_and_train_again_with_the_same_name_resumes_to_the_uninterrupted_lora(webui, tmp_path):
    train(webui, "straight", steps=6, save_every=3)
    state = webui.shared.state
    state.interrupt_at_job_no = 4  # Interrupt pressed during step 4
    _, message = train(webui, "stopped", steps=6, save_every=3)
    assert "TPO interrupted at step 4" in message and "same save name" in message, message
    assert not (tmp_path / "models" / "Lora" / "stopped.safetensors").exists()
    state.interrupt_at_job_no, state.interrupted = None, False  # what wrap_gradio_gpu_call resets
    _, message = train(webui, "stopped", steps=6, save_every=3)
    assert "TPO resumed and finished" in message, message
    loras = tmp_path / "models" / "Lora"
    straight, resumed = load_file(loras / "straight.safetensors"), load_file(loras / "stopped.safetensors")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)

    with pytest.raises(webui.errors.PromptistError, match="differs from the run being resumed"):
        train(webui, "stopped", steps=6, save_every=3, rank=8)  # another rank: not that run


def test_prompts_are_drawn_once_through_the_webuis_txt2img(webui, tmp_path):
    prompts = "a red square\na blue square\na red circle\na blue circle\na red star\na blue star\n"
    _, message = train(webui, "drawn", source="prompts", prompts=prompts, folder="", steps=2, save_every=1,
                       batch_size=2, valid_fraction=0.0)
    assert "TPO finished" in message, message
    jobs = sys.modules["modules.processing"].jobs
    drawn = [t for j in jobs for t in j.prompt]
    assert sorted(drawn) == sorted(prompts.splitlines())
    assert all(j.scripts is None and (j.width, j.height, j.steps) == (PIXELS, PIXELS, 4) for j in jobs)
    train(webui, "drawn", source="prompts", prompts=prompts, folder="", steps=3, save_every=1, batch_size=2,
          valid_fraction=0.0)  # continued: the images are not drawn again
    assert len([t for j in sys.modules["modules.processing"].jobs for t in j.prompt]) == len(drawn)


def test_forge_trains_through_its_unet_patcher_with_the_same_predictions_as_a1111(webui, monkeypatch, tmp_path,
                                                                                  text_parts):  # noqa: F811
    from promptist_webui.tpo import WebuiDenoiser

    a1111 = webui.shared.sd_model
    forge = FakeForgeModel(a1111.model.diffusion_model.unet, text_parts)
    loaded = []
    backend = types.ModuleType("backend")
    backend.memory_management = SimpleNamespace(load_model_gpu=loaded.append)
    monkeypatch.setitem(sys.modules, "backend", backend)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 800])
    with torch.no_grad(), WebuiDenoiser(a1111, rank=4) as one:
        expected = one.predict(x, t, one.encode_text(["a red car", "a blue boat"]))
    with torch.no_grad(), WebuiDenoiser(forge, rank=4) as other:
        assert torch.allclose(other.predict(x, t, other.encode_text(["a red car", "a blue boat"])), expected, atol=1e-4)

    webui.shared.sd_model = forge
    _, message = train(webui, "forge", steps=3, save_every=3)
    assert "TPO finished" in message and loaded == [forge.forge_objects.unet], message
    assert a1111_unmatched(tmp_path / "models" / "Lora" / "forge.safetensors", forge.model.diffusion_model) == []


def test_forge_trains_the_checkpoints_own_unet_not_the_last_jobs_lora_patched_one(webui, monkeypatch, tmp_path,
                                                                                   text_parts):  # noqa: F811
    from promptist_webui.tpo import WebuiDenoiser

    a1111 = webui.shared.sd_model
    forge = FakeForgeModel(a1111.model.diffusion_model.unet, text_parts)
    patched_model = FakeKModel(forge.model.diffusion_model, forge.alphas_cumprod)
    patched_model.apply_model = lambda x, t, **kw: FakeKModel.apply_model(patched_model, x, t, **kw) + 0.5
    last_job = FakeForgeObjects(unet=SimpleNamespace(model=patched_model), vae=forge.forge_objects.vae)
    forge.forge_objects = last_job  # as Forge/Neo leave it after a txt2img with <lora:...>
    loaded = []
    backend = types.ModuleType("backend")
    backend.memory_management = SimpleNamespace(load_model_gpu=loaded.append)
    monkeypatch.setitem(sys.modules, "backend", backend)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 800])
    with torch.no_grad(), WebuiDenoiser(a1111, rank=4) as one:
        expected = one.predict(x, t, one.encode_text(["a red car", "a blue boat"]))
    with torch.no_grad(), WebuiDenoiser(forge, rank=4) as other:
        assert torch.allclose(other.predict(x, t, other.encode_text(["a red car", "a blue boat"])), expected, atol=1e-4)
    assert forge.forge_objects is last_job

    webui.shared.sd_model = forge
    _, message = train(webui, "forge-after-lora", steps=2, save_every=2)
    assert "TPO finished" in message and loaded == [forge.forge_objects_original.unet], message
    assert forge.forge_objects is last_job


def test_forge_latents_drawn_from_the_vae_are_the_same_for_the_same_images_and_seed(webui, text_parts):  # noqa: F811
    from promptist_webui.tpo import WebuiDenoiser

    forge = FakeForgeModel(webui.shared.sd_model.model.diffusion_model.unet, text_parts)
    forge.encode_first_stage = lambda pixels: fake_vae(pixels) + 0.1 * torch.randn(fake_vae(pixels).shape)  # a draw
    images = torch.rand(2, PIXELS, PIXELS, 3)
    with WebuiDenoiser(forge, rank=4, seed=7) as one:
        torch.manual_seed(123)
        expected_next = torch.rand(3)
        torch.manual_seed(123)
        first = one.encode_images(images)
        assert torch.equal(torch.rand(3), expected_next)  # the webui's RNG untouched
    with WebuiDenoiser(forge, rank=4, seed=7) as other:
        assert torch.equal(other.encode_images(images), first)


@pytest.mark.parametrize(("change", "error"), [
    ({"save_name": "a/b"}, "Save name must be a plain folder name"),
    ({"folder": "/no/such/folder"}, "Image folder: no such folder"),
    ({"source": "prompts", "prompts": ""}, "Captions is empty"),
    ({"resolution": 60}, "between 64 and 8192"),
    ({"resolution": 100}, "multiple of 8"),
])
def test_bad_tpo_inputs_are_one_clear_error(webui, change, error):
    change = dict(change)
    with pytest.raises(webui.errors.PromptistError, match=error):
        train(webui, change.pop("save_name", "bad"), **change)


class _SpatialTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer_blocks = nn.ModuleList()


class Downsample(nn.Module):
    pass


class Upsample(nn.Module):
    pass


def ldm_unet_tree(attention: list[bool], res_blocks: int = 2) -> nn.Module:
    """An ldm/sgm UNet's block tree (input/middle/output blocks, spatial transformers where `attention`
    says, per level), without weights: what diffusers_attention_paths reads."""
    levels = len(attention)
    unet = nn.Module()
    inputs = [nn.Sequential(nn.Identity())]
    for level in range(levels):
        inputs += [nn.Sequential(nn.Identity(), *([_SpatialTransformer()] if attention[level] else []))
                   for _ in range(res_blocks)]
        if level < levels - 1:
            inputs.append(nn.Sequential(Downsample()))
    unet.input_blocks = nn.ModuleList(inputs)
    unet.middle_block = nn.Sequential(nn.Identity(), _SpatialTransformer(), nn.Identity())
    outputs = []
    for level in reversed(range(levels)):
        for r in range(res_blocks + 1):
            parts = [nn.Identity(), *([_SpatialTransformer()] if attention[level] else [])]
            outputs.append(nn.Sequential(*parts, *([Upsample()] if r == res_blocks and level > 0 else [])))
    unet.output_blocks = nn.ModuleList(outputs)
    return unet


def test_kohya_names_are_diffusers_paths_where_a1111_reads_them_back():
    """SD 1.5's layout (two res blocks per level, attention on the first three levels): diffusers names,
    which A1111's formula maps back to the same ldm layers."""
    from trainer.tpo.host_unet import diffusers_attention_paths, kohya_names

    unet = ldm_unet_tree([True, True, True, False])
    paths = diffusers_attention_paths(unet)
    assert paths["input_blocks.1.1"] == "down_blocks.0.attentions.0"
    assert paths["input_blocks.8.1"] == "down_blocks.2.attentions.1"
    assert paths["middle_block.1"] == "mid_block.attentions.0"
    assert paths["output_blocks.3.1"] == "up_blocks.1.attentions.0"
    assert paths["output_blocks.11.1"] == "up_blocks.3.attentions.2"
    names = kohya_names(["input_blocks.4.1.transformer_blocks.0.attn1.to_q",
                         "output_blocks.5.1.transformer_blocks.0.attn2.to_out.0"], paths)
    assert names == {"input_blocks.4.1.transformer_blocks.0.attn1.to_q":
                     "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                     "output_blocks.5.1.transformer_blocks.0.attn2.to_out.0":
                     "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0"}


class FakeSDXLModel(FakeSDModel):
    """`shared.sd_model` of A1111 1.10 for an SDXL checkpoint (sgm DiffusionEngine as the webui extends it):
    the conditioning is a dict (`crossattn` token states, `vector` pooled + size embedding, one row per
    prompt) and `apply_model(x, t, cond)` takes the dict. Each call's cond is recorded."""

    is_sdxl = True

    def __init__(self, unet, text):
        super().__init__(unet, text)
        self.seen, self.vectors = [], {}

    def get_learned_conditioning(self, texts):
        hidden = super().get_learned_conditioning(texts)
        assert getattr(texts, "width", None) == PIXELS and getattr(texts, "height", None) == PIXELS
        vector = torch.cat([hidden.mean(dim=1), torch.full((len(texts), 3), float(PIXELS))], 1)
        self.vectors.update({tuple(h.flatten().tolist()): tuple(v.tolist()) for h, v in zip(hidden, vector, strict=True)})
        return {"crossattn": hidden, "vector": vector}

    def apply_model(self, x, t, cond):
        assert isinstance(cond, dict), "SDXL's apply_model takes the conditioning dict"
        assert cond["vector"].shape[0] == x.shape[0] == cond["crossattn"].shape[0]
        self.seen.append({k: v.detach().clone() for k, v in cond.items()})
        return self.model.diffusion_model(x, t, context=cond["crossattn"], y=cond["vector"])


def test_sdxl_checkpoint_trains_with_each_captions_own_pooled_vector_and_saves_an_sdxl_lora(webui, monkeypatch,
                                                                                              tmp_path):
    """On an SDXL checkpoint the webui's conditioning is a dict: the job hands A1111's apply_model the dict
    with every caption's own `vector` row (pooled output + size conditioning at the training resolution),
    and the LoRA is labelled SDXL for the hosts' LoRA lists."""
    class SdConditioning(list):
        def __init__(self, prompts, width=None, height=None):
            super().__init__(prompts)
            self.width, self.height = width, height

    monkeypatch.setitem(sys.modules, "modules.prompt_parser", SimpleNamespace(SdConditioning=SdConditioning))
    shared = sys.modules["modules.shared"]
    base = shared.sd_model
    sdxl = FakeSDXLModel(base.model.diffusion_model.unet, (base.tokenizer, base.text_encoder))
    shared.sd_model = sdxl
    _, message = train(webui, steps=2, save_every=2)
    assert "TPO finished" in message, message
    lora = tmp_path / "models" / "Lora" / "colour.safetensors"
    with safe_open(str(lora), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    assert sdxl.seen
    pairs = [(tuple(h.flatten().tolist()), tuple(v.tolist())) for cond in sdxl.seen
             for h, v in zip(cond["crossattn"], cond["vector"], strict=True)]
    assert all(sdxl.vectors[h] == v for h, v in pairs)  # each row: the vector of that row's own caption
    assert len({v for _, v in pairs}) > 1


def test_sdxl_layout_loras_keep_diffusers_names_that_a1111_maps_to_the_very_layers_trained():
    """SDXL's block layout (three levels, two res blocks each, attention on the lower two; the tiny host
    checkpoint, which ComfyUI calls Segmind_Vega, has it too): every spatial transformer keeps its diffusers
    name and A1111 1.10's own conversion reads each name back to the ldm layer the LoRA was trained on
    (checked in the real A1111 1.10.1 on the tiny SDXL: 0 unmatched keys)."""
    from trainer.tpo.host_unet import diffusers_attention_paths, kohya_names
    from trainer.tpo.lora_layout import a1111_compvis_name

    paths = diffusers_attention_paths(ldm_unet_tree([False, True, True]))
    assert sorted(paths) == sorted(["input_blocks.4.1", "input_blocks.5.1", "input_blocks.7.1", "input_blocks.8.1",
                                    "middle_block.1", *[f"output_blocks.{i}.1" for i in range(6)]])
    ldm = [f"{block}.transformer_blocks.0.attn2.to_k" for block in paths]
    names = kohya_names(ldm, paths)
    assert names["output_blocks.3.1.transformer_blocks.0.attn2.to_k"] == \
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    for path, name in names.items():
        assert a1111_compvis_name("lora_unet_" + name.replace(".", "_")) == "diffusion_model_" + path.replace(".", "_")


def test_the_lora_trains_through_a_forge_style_block_that_adds_in_place_with_its_own_linear_class():
    """Forge classic's BasicTransformerBlock does `x += attn(norm(x))` twice and its UNet's layers are
    `ForgeOperations.Linear` (an nn.Module, not an nn.Linear): the LoRA still hooks them and gets a gradient."""
    from trainer.tpo.host_unet import HookLoRASet

    class Linear(nn.Module):  # Forge's: weight and shape attributes, no nn.Linear base
        def __init__(self, n_in, n_out):
            super().__init__()
            self.in_features, self.out_features = n_in, n_out
            self.weight = nn.Parameter(torch.randn(n_out, n_in) * 0.1)

        def forward(self, x):
            return F.linear(x, self.weight)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q, self.to_k, self.to_v = Linear(8, 8), Linear(8, 8), Linear(8, 8)
            self.to_out = nn.Sequential(Linear(8, 8))

        def forward(self, x):
            q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
            return self.to_out(torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(8), nn.LayerNorm(8)
            self.attn1, self.attn2 = Attention(), Attention()

        def forward(self, x):
            x = x.clone()
            x += self.attn1(self.norm1(x))
            x += self.attn2(self.norm2(x))
            return x

    class SpatialTransformer(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer_blocks = nn.ModuleList([Block(), Block()])

        def forward(self, x):
            for block in self.transformer_blocks:
                x = block(x)
            return x

    unet = nn.Module()
    unet.input_blocks = nn.ModuleList([nn.Sequential(nn.Identity()), nn.Sequential(nn.Identity(), SpatialTransformer())])
    unet.middle_block, unet.output_blocks = nn.Sequential(nn.Identity()), nn.ModuleList()
    unet.requires_grad_(False)
    loras = HookLoRASet(unet, 2, 2.0, ("to_q", "to_k", "to_v", "to_out.0"), torch.device("cpu"))
    assert len(loras.loras) == 16
    for lora in loras.loras.values():
        nn.init.normal_(lora.up.weight)  # a LoRA that already moved: every factor gets a gradient
    unet.input_blocks[1][1](torch.randn(2, 4, 8)).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loras.parameters())
    loras.remove()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules())
