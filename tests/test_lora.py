"""trainer.tpo.lora: our minimal LoRA on a tiny diffusers UNet, and the kohya file that hosts load."""

from __future__ import annotations

import json

import pytest
import torch
from builders_sd import TEXT_DIM, build_tiny_unet
from safetensors import safe_open

from trainer.tpo.lora import (
    LoRALinear,
    adapters_enabled,
    attach_lora,
    kohya_name,
    load_kohya_lora,
    save_kohya_lora,
)


def unet_inputs(seed: int = 0, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([10, 500][:batch]),
            torch.randn(batch, 7, TEXT_DIM, generator=g))


def run(unet, inputs) -> torch.Tensor:
    with torch.no_grad():
        return unet(*inputs).sample


def randomize(loras, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in loras.values():
            lora.up.weight.copy_(torch.randn(lora.up.weight.shape, generator=g) * 0.5)


def test_a_fresh_lora_changes_nothing_and_trains_only_its_own_weights():
    unet, inputs = build_tiny_unet(), unet_inputs()
    before = run(unet, inputs)
    loras = attach_lora(unet, rank=2, alpha=2)
    assert len(loras) == 4 * 2 * 4  # 4 transformer blocks (down, mid, 2 up) x (attn1, attn2) x (q, k, v, out)
    assert all(path.endswith(("to_q", "to_k", "to_v", "to_out.0")) for path in loras)
    assert torch.equal(run(unet, inputs), before)
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all(".down." in n or ".up." in n for n in trainable)


def test_adapters_off_is_the_base_model_and_on_is_not():
    unet, inputs = build_tiny_unet(), unet_inputs()
    base = run(unet, inputs)
    loras = attach_lora(unet, rank=2, alpha=4)
    randomize(loras)
    tuned = run(unet, inputs)
    assert (tuned - base).abs().max() > 1e-3
    with adapters_enabled(loras, False):
        assert torch.equal(run(unet, inputs), base)
    assert torch.equal(run(unet, inputs), tuned)


def test_lora_weights_stay_fp32_on_an_fp16_base():
    layer = torch.nn.Linear(8, 6).half()
    lora = LoRALinear(layer, rank=2, alpha=2)
    assert lora.down.weight.dtype == torch.float32 and lora.up.weight.dtype == torch.float32
    out = lora(torch.randn(3, 8).half())
    assert out.dtype == torch.float16


def test_saved_file_has_kohya_keys_and_metadata(tmp_path):
    unet = build_tiny_unet()
    loras = attach_lora(unet, rank=2, alpha=1)
    path = save_kohya_lora(tmp_path / "my.safetensors", loras, {"ss_sd_model_hash": "abc", "promptist_config": {"beta": 5}})
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        assert f.get_tensor(next(iter(keys))).dtype == torch.float16
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0"
    assert name == kohya_name("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0")
    assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= keys
    assert len(keys) == 3 * len(loras)
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "1" and meta["ss_sd_model_hash"] == "abc"
    assert json.loads(meta["promptist_config"]) == {"beta": 5}
    assert not list(tmp_path.glob(".*tmp*"))


def test_reloaded_lora_reproduces_the_outputs_in_a_fresh_unet(tmp_path):
    unet, inputs = build_tiny_unet(), unet_inputs()
    loras = attach_lora(unet, rank=3, alpha=1.5)
    randomize(loras)
    tuned = run(unet, inputs)
    save_kohya_lora(tmp_path / "fp32.safetensors", loras, dtype=torch.float32)
    save_kohya_lora(tmp_path / "fp16.safetensors", loras)

    fresh = build_tiny_unet()
    loaded = load_kohya_lora(fresh, tmp_path / "fp32.safetensors")
    assert set(loaded) == set(loras) and all(lora.alpha == 1.5 for lora in loaded.values())
    assert torch.allclose(run(fresh, inputs), tuned, atol=1e-6)
    fresh16 = build_tiny_unet()
    load_kohya_lora(fresh16, tmp_path / "fp16.safetensors")
    assert torch.allclose(run(fresh16, inputs), tuned, atol=1e-2)


def test_diffusers_own_loader_reads_our_file_and_reproduces_our_outputs(tmp_path, tiny_sd_dir):
    pytest.importorskip("peft")  # diffusers converts kohya files to peft adapters
    from builders_sd import load_tiny_sd

    ours = load_tiny_sd(tiny_sd_dir)
    loras = attach_lora(ours.unet, rank=2, alpha=2)
    randomize(loras)
    save_kohya_lora(tmp_path / "tpo.safetensors", loras, dtype=torch.float32)
    inputs = unet_inputs()
    expected = run(ours.unet, inputs)

    theirs = load_tiny_sd(tiny_sd_dir)
    base = run(theirs.unet, inputs)
    theirs.load_lora_weights(str(tmp_path), weight_name="tpo.safetensors")
    got = run(theirs.unet, inputs)
    assert (expected - base).abs().max() > 1e-3
    assert torch.allclose(got, expected, atol=1e-5)


def test_a_lora_for_another_unet_is_one_clear_error(tmp_path):
    loras = attach_lora(build_tiny_unet(channels=(8, 16)), rank=2, alpha=2)
    save_kohya_lora(tmp_path / "other.safetensors", loras)
    with pytest.raises(ValueError, match="shapes"):
        load_kohya_lora(build_tiny_unet(), tmp_path / "other.safetensors")
    from safetensors.torch import save_file

    save_file({"lora_te_text_model_x.lora_down.weight": torch.zeros(2, 2)}, str(tmp_path / "te.safetensors"))
    with pytest.raises(ValueError, match="no UNet LoRA"):
        load_kohya_lora(build_tiny_unet(), tmp_path / "te.safetensors")
    save_file({"lora_unet_nothing_here.lora_down.weight": torch.zeros(2, 2)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="match no Linear"):
        load_kohya_lora(build_tiny_unet(), tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="no nn.Linear"):
        attach_lora(build_tiny_unet(), 2, 2, targets=("to_nothing",))
