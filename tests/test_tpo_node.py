"""Promptist TPO Train (LoRA) on a fake ComfyUI MODEL/CLIP/VAE that behaves like ComfyUI's: the MODEL is a
ModelPatcher whose clone shares the diffusion model and applies weight wrappers only once loaded, its
modules carry ComfyUI-style (non-diffusers) names mapped by `comfy.utils.unet_to_diffusers`, and
`apply_model` takes x = x_0 + sigma * eps and the sigma and returns the denoised x_0 (ComfyUI's EPS
model_sampling). The diffusion model inside is the tiny SD UNet of tests/test_tpo.py, trained as a
colour-blind denoiser; the task is the same: learn which colour a caption names.
"""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from test_tpo import COLOURS, OBJECTS, SD_SCHEDULE, base_state, text_parts  # noqa: F401 (fixtures)
from test_train_nodes import comfy  # noqa: F401 (fixture)

from nodes.comfy_denoiser import ComfyDenoiser
from nodes.comfy_schema import v1_node
from nodes.train_tpo import TPOTrain
from trainer.tpo.lora import load_kohya_lora

SIZE = 64  # pixels; the fake VAE pools 8 x 8, so latents are [4, 8, 8] as in test_tpo


class FakeLdmUNet(torch.nn.Module):
    """ComfyUI's diffusion_model: called as (x, timesteps, context); module paths differ from diffusers'."""

    def __init__(self, unet):
        super().__init__()
        self.ldm = unet

    def forward(self, x, timesteps, context=None, y=None):
        return self.ldm(x, timesteps, encoder_hidden_states=context).sample


class FakeBaseModel(torch.nn.Module):
    """comfy.model_base.BaseModel as far as TPO uses it (EPS, discrete SD schedule)."""

    def __init__(self, unet):
        super().__init__()
        from diffusers import DDPMScheduler

        self.diffusion_model = FakeLdmUNet(unet)
        a = DDPMScheduler(**SD_SCHEDULE).alphas_cumprod
        self.model_sampling = torch.nn.Module()
        self.model_sampling.register_buffer("sigmas", ((1 - a) / a).sqrt())
        mapping = {name: f"ldm.{name}" for name, _ in unet.named_parameters()}
        self.model_config = type("Config", (), {"unet_config": {
            "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [1, 0], "transformer_depth_middle": 1,
            "context_dim": 768, "diffusers_map": mapping}})()  # as ComfyUI detects the tiny SD's config

    def apply_model(self, x, sigma, c_crossattn=None, **kwargs):
        s = sigma.view(-1, 1, 1, 1)
        t = (self.model_sampling.sigmas.log()[None] - sigma.log()[:, None]).abs().argmin(dim=1)
        eps = self.diffusion_model(x / (s ** 2 + 1).sqrt(), t, context=c_crossattn)
        return x - eps * s

    def process_latent_in(self, latent):
        return latent


class FakeModelPatcher:
    """ModelPatcher: clone() shares the model; weight wrappers act once the clone is loaded."""

    def __init__(self, model, wrappers=None):
        self.model, self.weight_wrapper_patches = model, dict(wrappers or {})

    def clone(self):
        return FakeModelPatcher(self.model, self.weight_wrapper_patches)

    def add_weight_wrapper(self, name, function):
        self.weight_wrapper_patches[name] = self.weight_wrapper_patches.get(name, []) + [function]

    def patch(self):  # what load_models_gpu does to the modules
        for name, module in self.model.named_modules():
            module.__dict__.pop("forward", None)
            functions = self.weight_wrapper_patches.get(f"{name}.weight")
            if functions:
                def forward(x, module=module, functions=functions):
                    weight = module.weight
                    for f in functions:
                        weight = f(weight)
                    return F.linear(x, weight, module.bias)
                module.forward = forward


class FakeCLIP:
    """comfy.sd.CLIP: tokenize, encode_from_tokens(return_pooled=True) over the tiny CLIP text model."""

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder

    def tokenize(self, text):
        return self.tokenizer([text], padding="max_length", max_length=12, truncation=True, return_tensors="pt")

    def encode_from_tokens(self, tokens, return_pooled=False):
        out = self.text_encoder(tokens.input_ids)
        return (out[0], None) if return_pooled else out[0]


class FakeVAE:
    """Pixels [B, H, W, 3] -> latents [B, 4, H/8, W/8]: channel 0 is red minus blue (+1 red, -1 blue)."""

    def encode(self, pixels):
        p = F.avg_pool2d(pixels.movedim(-1, 1), 8)
        r, g, b = p[:, 0], p[:, 1], p[:, 2]
        return torch.stack([(r - b) * 1.25, (g - 0.5) * 2, (r + b - 1) * 2, (0.5 - g) * 2], dim=1)


def colour_images(per_caption: int = 3, seed: int = 0):
    """Images of a red or blue thing with blocky noise, and their captions "a red square", "a blue car"..."""
    g = torch.Generator().manual_seed(seed)
    images, captions = [], []
    for obj in OBJECTS:
        for colour in COLOURS:
            for _ in range(per_caption):
                base = torch.tensor([0.9, 0.5, 0.1] if colour == "red" else [0.1, 0.5, 0.9])
                noise = torch.randn(SIZE // 8, SIZE // 8, 3, generator=g) * 0.12
                image = (base + noise).repeat_interleave(8, 0).repeat_interleave(8, 1).clamp(0, 1)
                images.append(image)
                captions.append(f"a {colour} {obj}")
    return torch.stack(images), captions


@pytest.fixture
def graph(comfy, base_state, text_parts, tmp_path, monkeypatch):  # noqa: F811
    """The graph's MODEL, CLIP, VAE (fake ComfyUI around the tiny base model), models dir in tmp_path."""
    from builders_sd import build_tiny_unet

    monkeypatch.setenv("PROMPTIST_MODELS_DIR", str(tmp_path / "models" / "promptist"))
    comfy.utils.unet_to_diffusers = lambda unet_config: unet_config["diffusers_map"]
    comfy.mm.load_models_gpu = lambda models, **k: [comfy.loaded.append(m) or m.patch() for m in models]
    comfy.utils.load_torch_file = lambda path, safe_load=False: ("lora file", path)
    comfy.sd = types.SimpleNamespace(load_lora_for_models=lambda model, clip, lora, strength_model, strength_clip: (
        FakeModelPatcher(model.model, {"lora": [lora, strength_model]}), clip))
    monkeypatch.setitem(sys.modules, "comfy.sd", comfy.sd)
    monkeypatch.setattr(sys.modules["comfy"], "sd", comfy.sd, raising=False)
    with torch.inference_mode():  # ComfyUI loads checkpoints while executing a prompt
        unet = build_tiny_unet(channels=(8, 16))
        unet.load_state_dict(base_state)
        model = FakeModelPatcher(FakeBaseModel(unet))
    return model, FakeCLIP(*text_parts), FakeVAE()


def train(graph, **overrides):
    model, clip, vae = graph
    images, captions = colour_images()
    settings = {"source": "images + captions", "images": images, "captions": "\n".join(captions),
                "save_name": "colour", "steps": 60, "rank": 4, "beta": 100.0, "learning_rate": 6e-3,
                "batch_size": 12, "grad_accum": 1, "resolution": SIZE, "seed": 0, "save_every": 30,
                "negatives_per_caption": 1, "valid_fraction": 0.25}
    with torch.inference_mode():  # as ComfyUI executes every node
        return TPOTrain.run(model, clip, vae, **{**settings, **overrides})


def test_node_trains_the_graphs_model_and_held_out_accuracy_rises(graph, tmp_path, comfy):  # noqa: F811
    import csv

    trained, lora_name, curves, summary = train(graph)
    assert lora_name == "colour.safetensors" and (tmp_path / "models" / "loras" / lora_name).is_file()
    rows = list(csv.DictReader(open(tmp_path / "models" / "promptist" / "colour" / "train_log.csv")))
    evals = [r for r in rows if r.get("valid_accuracy")]
    accuracy = float(evals[-1]["valid_accuracy"])
    gap = float(evals[-1]["valid_d_rejected"]) - float(evals[-1]["valid_d_chosen"])
    # A zero-initialised LoRA ties every pair (0.5). Accuracy is a sign test (a LoRA barely moved in the right
    # direction scores ~0.75 with D gaps of 1e-8), so the held-out captions, never trained on, must reach 0.9
    # AND the wrong caption's error must stand clearly above the right one's.
    assert len(evals) == 2 and accuracy >= 0.9 and gap > 0.05, evals[-1]
    assert "valid_accuracy" in summary and curves.shape[0] == 1 and curves.shape[-1] == 3
    assert not graph[0].weight_wrapper_patches  # the input MODEL is untouched
    # the output MODEL is the input with the saved file applied by ComfyUI's LoRA loading, at strength 1
    assert trained.weight_wrapper_patches == {"lora": [("lora file", str(tmp_path / "models" / "loras" / lora_name)),
                                                       1.0]}
    assert comfy.updates[-1][0] == 60  # the progress bar reached the last step
    # the negatives came from the rules editor: the colour-swapped caption among them
    data = (tmp_path / "models" / "promptist" / "colour" / "data" / "tpo_pairs.jsonl").read_text()
    assert '"a blue square"' in data and '"attribute"' in data


def test_saved_lora_has_kohya_diffusers_names_and_reproduces_the_node_in_a_diffusers_unet(graph, tmp_path,
                                                                                         base_state):  # noqa: F811
    from builders_sd import build_tiny_unet
    from safetensors import safe_open

    trained, lora_name, _, _ = train(graph, steps=6, save_every=3)
    path = tmp_path / "models" / "loras" / lora_name
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in keys
    assert not any("ldm" in k or k.startswith("diffusion_model") for k in keys)
    assert meta["ss_network_dim"] == "4" and meta["ss_base_model_version"] == "sd_v1"

    unet = build_tiny_unet(channels=(8, 16))
    unet.load_state_dict(base_state)
    # The base's block layout, described the same from ComfyUI's unet_config as from the diffusers config.
    from trainer.tpo.lora_layout import UNetLayout

    assert UNetLayout.from_json(meta["promptist_unet_layout"]) == UNetLayout.from_diffusers_config(unet.config)
    loras = load_kohya_lora(unet, path)
    assert len(loras) == len(keys) // 3
    # the file's weights in the node's denoiser (ComfyUI path: x_0 + sigma eps in, x_0 out, converted to eps)
    # and the diffusers UNet with the file loaded predict the same noise
    from safetensors.torch import load_file

    from trainer.tpo.lora import kohya_name

    model, clip, vae = graph
    denoiser = ComfyDenoiser(model, clip, vae, rank=4, device=torch.device("cpu"))
    tensors = load_file(str(path))
    with torch.no_grad():
        for module_path, lora in denoiser.loras.items():
            lora.down.weight.copy_(tensors[kohya_name(module_path) + ".lora_down.weight"].float())
            lora.up.weight.copy_(tensors[kohya_name(module_path) + ".lora_up.weight"].float())
    denoiser.load()
    from diffusers import DDPMScheduler

    schedule = DDPMScheduler(**SD_SCHEDULE)
    g = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([300, 800])
    with torch.no_grad():
        cond = denoiser.encode_text(["a red star", "a blue tree"])
        ours = denoiser.predict(denoiser.add_noise(x0, noise, t), t, cond)
        theirs = unet(schedule.add_noise(x0, noise, t), t, encoder_hidden_states=cond.hidden).sample
        with denoiser.adapters(False):
            base = denoiser.predict(denoiser.add_noise(x0, noise, t), t, cond)
    assert torch.allclose(denoiser.add_noise(x0, noise, t), schedule.add_noise(x0, noise, t), atol=1e-5)
    assert (ours - theirs).abs().max().item() < 2e-3  # fp16 file
    assert (ours - base).abs().max().item() > 1e-2  # the LoRA changes the prediction: the match is not trivial


def test_cancel_saves_and_queueing_again_continues_to_the_end(graph, tmp_path, comfy):  # noqa: F811
    from trainer.checkpoint import list_checkpoints

    comfy.cancel_at = 4
    with pytest.raises(type(comfy.mm.InterruptProcessingException())):
        train(graph, steps=8, save_every=100)
    run = tmp_path / "models" / "promptist" / "colour"
    assert [c.step for c in list_checkpoints(run)] == [4]
    assert not (tmp_path / "models" / "loras" / "colour.safetensors").exists()
    comfy.cancel_at = None
    _, _, _, summary = train(graph, steps=8, save_every=100)
    assert "TPO resumed" in summary and "steps 8" in summary
    with pytest.raises(ValueError, match="differ from those of the run"):
        train(graph, steps=9, captions="\n".join(["a red square"] * 48))


def test_bad_inputs_are_named(graph):
    model, clip, vae = graph
    with pytest.raises(ValueError, match="no images are connected"):
        TPOTrain.run(model, clip, vae, captions="a red square", save_name="x")
    images, _ = colour_images(per_caption=1)
    with pytest.raises(ValueError, match="16 images but 2 captions"):
        TPOTrain.run(model, clip, vae, images=images, captions="a\nb", save_name="x")
    with pytest.raises(ValueError, match="1 captions but 2 lines of negatives"):
        TPOTrain.run(model, clip, vae, images=images, captions="a red square", negatives="x\ny", save_name="x")
    with pytest.raises(ValueError, match="no such folder"):
        TPOTrain.run(model, clip, vae, source="folder", folder="/nowhere/at/all", save_name="x")


def test_tpo_node_runs_on_every_queue_and_returns_model_lora_name_and_curves():
    node = v1_node(TPOTrain)
    assert node.NOT_IDEMPOTENT is True and math.isnan(node.IS_CHANGED(save_name="x"))
    assert node.RETURN_TYPES == ("MODEL", "STRING", "IMAGE", "STRING")


def test_denoiser_targets_are_the_trainers():
    from nodes import comfy_denoiser
    from trainer.tpo.lora import DEFAULT_TARGETS

    assert comfy_denoiser.DEFAULT_TARGETS == DEFAULT_TARGETS


def test_a_short_run_at_the_default_learning_rate_says_what_it_can_show(graph, caplog):
    """4 steps at lr 1e-5 add up to too little learning rate to move the loss: the console and the summary say so
    in the node's words (learning_rate, steps, grad_accum), not the command line's."""
    import logging

    with caplog.at_level(logging.WARNING, logger="promptist"):
        _, _, _, summary = train(graph, steps=4, learning_rate=1e-5, grad_accum=2, batch_size=6)
    notes = [line for line in summary.splitlines() if line.startswith("note: ")]
    assert len(notes) == 2, summary
    assert notes[0].startswith("note: a 4-step run at lr 1e-05 adds up to a learning rate of 4e-05")  # no warmup
    assert "near its start (ln 2 = 0.693" in notes[0] and "raise learning_rate (e.g. 1e-4) or steps" in notes[0]
    assert "set grad_accum 1, about 2x faster per step" in notes[1] and "--" not in summary
    said = [r.getMessage() for r in caplog.records if "TPO: " in r.getMessage()]
    assert [s.split("TPO: ", 1)[1] for s in said] == [n[len("note: "):] for n in notes]
