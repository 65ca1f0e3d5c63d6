"""A1111/Forge: a prompt naming one of our TPO LoRAs that the loaded checkpoint would not take whole gets a
visible warning (console, infotext, the comments under the image), and the job goes on.

Seen in A1111 1.10.1: a TPO LoRA on a checkpoint of another UNet layout lost 120 of 264 keys, logged at debug
level only. The fake webui's checkpoint exposes A1111's layer names (`network_layer_mapping`) of a UNet layout.
"""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
from conftest import ROOT
from fake_webui import Job, load_script_in_fake_webui, run_process_hook
from test_lora_layout import SD15, TINY, sd15_shaped_unet, tiny_unet

from trainer.tpo.lora import _linear_modules, attach_lora, kohya_name, save_kohya_lora
from trainer.tpo.lora_layout import true_compvis_name


@pytest.fixture
def webui(monkeypatch, tmp_path, tiny_promptist_dir):
    models = tmp_path / "models"
    shutil.copytree(tiny_promptist_dir, models / "promptist")
    settings = {"promptist_model": "tiny-promptist", "promptist_device": "cpu"}
    module = load_script_in_fake_webui(ROOT / "scripts" / "promptist.py", monkeypatch, models, settings)
    module.loras = models / "Lora"
    return module


def checkpoint_named_as_a1111_does(unet, layout):
    """A loaded checkpoint of `layout` as A1111's Lora extension sees it: its layers' compvis names."""
    names = {true_compvis_name(kohya_name(path), layout) for path, _ in _linear_modules(unet)}
    return SimpleNamespace(network_layer_mapping={n: object() for n in names if n})


def save_ours(folder, name, unet, layout):
    return save_kohya_lora(folder / f"{name}.safetensors", attach_lora(unet, 2, 2.0),
                           {"promptist_unet_layout": layout.to_json(), "ss_sd_model_name": "tiny-sd15"})


def test_our_lora_that_a1111_would_misplace_is_warned_about_and_the_job_goes_on(webui, monkeypatch, capfd):
    save_ours(webui.loras, "tiny-tpo", tiny_unet(), TINY)
    monkeypatch.setattr(webui.host.shared, "sd_model", checkpoint_named_as_a1111_does(tiny_unet(), TINY))
    p = Job("a red horse <lora:tiny-tpo:0.8>")
    comments = []
    p.comment = comments.append
    assert run_process_hook(webui.PromptistScript(), p, False, "beam", False) == []
    assert p.sampled  # a warning, not a stop
    (warning,) = comments
    assert warning.startswith("LoRA 'tiny-tpo' does not fit this checkpoint: ")
    assert "on other layers" in warning and "dropped" in warning and "trained on tiny-sd15" in warning
    assert "A TPO LoRA fits the UNet layout it was trained on" in warning
    assert p.extra_generation_params["Promptist LoRA warning"] == warning
    assert f"*** Promptist: {warning}" in capfd.readouterr().err


def test_our_lora_on_a_checkpoint_a1111_maps_right_and_others_loras_are_not_warned_about(webui, monkeypatch):
    save_ours(webui.loras, "sd15-tpo", sd15_shaped_unet(), SD15)
    save_kohya_lora(webui.loras / "someone-elses.safetensors", attach_lora(tiny_unet(), 2, 2.0), {
        "ss_training_comment": "not ours"})
    monkeypatch.setattr(webui.host.shared, "sd_model", checkpoint_named_as_a1111_does(sd15_shaped_unet(), SD15))
    p = Job("a red horse <lora:sd15-tpo:1> <lora:someone-elses:1> <lora:not-there:1>")
    assert run_process_hook(webui.PromptistScript(), p, False, "beam", False) == []
    assert "Promptist LoRA warning" not in p.extra_generation_params and p.sampled


def test_our_sd15_lora_on_the_tiny_checkpoint_is_warned_about(webui, monkeypatch):
    save_ours(webui.loras, "sd15-tpo", sd15_shaped_unet(), SD15)
    monkeypatch.setattr(webui.host.shared, "sd_model", checkpoint_named_as_a1111_does(tiny_unet(), TINY))
    p = Job("a red horse <lora:sd15-tpo:1>")
    run_process_hook(webui.PromptistScript(), p, False, "beam", False)
    assert "dropped" in p.extra_generation_params["Promptist LoRA warning"]


def test_on_forge_only_a_lora_of_another_block_layout_is_warned_about(webui, monkeypatch):
    # Forge classic maps LoRA names through the checkpoint's guessed unet_config (its UNet's `config`), so our tiny
    # LoRA loads whole on the tiny checkpoint there (seen: "Loaded ... with 56 keys ... (skipped 0 keys)").
    save_ours(webui.loras, "tiny-tpo", tiny_unet(), TINY)
    save_ours(webui.loras, "sd15-tpo", sd15_shaped_unet(), SD15)
    tiny_config = {"num_res_blocks": [1, 1], "channel_mult": [1, 1], "transformer_depth": [1, 0],
                   "transformer_depth_middle": 1}
    forge = SimpleNamespace(forge_objects=SimpleNamespace(unet=SimpleNamespace(model=SimpleNamespace(
        diffusion_model=SimpleNamespace(config=tiny_config)))))
    monkeypatch.setattr(webui.host.shared, "sd_model", forge)
    p = Job("a red horse <lora:tiny-tpo:1>")
    run_process_hook(webui.PromptistScript(), p, False, "beam", False)
    assert "Promptist LoRA warning" not in p.extra_generation_params
    p = Job("a red horse <lora:sd15-tpo:1>")
    run_process_hook(webui.PromptistScript(), p, False, "beam", False)
    assert p.extra_generation_params["Promptist LoRA warning"].startswith(
        "LoRA 'sd15-tpo' was trained on a UNet of another block layout (4 levels of 2 ResNets, attention at levels "
        "1, 2, 3; this checkpoint: 2 levels of 1 ResNet, attention at level 1)")
