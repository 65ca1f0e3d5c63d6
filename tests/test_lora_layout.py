"""Which layer A1111 1.10 puts each module of our kohya LoRAs on, for a UNet's block layout (trainer.tpo.lora_layout).

The expected names were written from AUTOMATIC1111/stable-diffusion-webui v1.10.1 (commit 82a973c0),
extensions-builtin/Lora/networks.py `convert_diffusers_name_to_compvis`; where that checkout is beside the project
(../hosts/webui, or $PROMPTIST_HOSTS_DIR/webui) its function itself is run on the same names, and where ComfyUI is (../hosts/comfyui) its
`comfy.utils.unet_to_diffusers` (which maps by the checkpoint's config) gives each module's true layer.
"""

from __future__ import annotations

import ast
import logging
import os
from pathlib import Path

import pytest
from conftest import ROOT

from trainer.tpo.lora import _linear_modules, attach_lora, kohya_name
from trainer.tpo.lora_layout import (
    UNetLayout,
    a1111_compvis_name,
    a1111_mapping,
    a1111_misplaced,
    a1111_save_warning,
    true_compvis_name,
)

HOSTS = Path(os.environ.get("PROMPTIST_HOSTS_DIR") or ROOT.parent / "hosts")  # the host checkouts, when present
A1111_NETWORKS = HOSTS / "webui" / "extensions-builtin" / "Lora" / "networks.py"
COMFY_UTILS = HOSTS / "comfyui" / "comfy" / "utils.py"
SD15 = UNetLayout((2, 2, 2, 2), (True, True, True, False))
TINY = UNetLayout((1, 1), (True, False))  # tests/builders_sd.py and the hosts' tiny-sd15: two levels, one ResNet each


def tiny_unet(**overrides):
    from diffusers import UNet2DConditionModel

    config = dict(block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
                  cross_attention_dim=8, norm_num_groups=2, attention_head_dim=2,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    return UNet2DConditionModel(**{**config, **overrides})


def sd15_shaped_unet():
    """SD 1.5's block structure (4 levels, 2 ResNets each, attention on the first three) at tiny widths."""
    return tiny_unet(block_out_channels=(4, 4, 4, 4), layers_per_block=2,
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def lora_modules(unet) -> list[str]:
    return sorted(kohya_name(path) for path in attach_lora(unet, 1, 1.0))


def every_module(unet) -> list[str]:
    return sorted(kohya_name(path) for path, _ in _linear_modules(unet))


def test_a1111s_names_for_the_standard_layout_are_the_true_layers():
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert a1111_compvis_name(name) == "diffusion_model_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert a1111_mapping(name, SD15).loads
    up = "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0"
    assert a1111_compvis_name(up) == "diffusion_model_output_blocks_11_1_transformer_blocks_0_attn2_to_out_0"
    assert a1111_mapping(up, SD15).loads
    assert a1111_compvis_name("lora_unet_mid_block_resnets_1_time_emb_proj") == "diffusion_model_middle_block_2_emb_layers_1"
    assert a1111_misplaced(lora_modules(sd15_shaped_unet()), SD15) == []


def test_on_one_resnet_per_level_a1111_drops_some_modules_and_puts_others_on_the_wrong_layer():
    assert a1111_mapping("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", TINY).loads
    first = a1111_mapping("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", TINY)
    # A1111 counts three output blocks per level: the first up attention lands on output block 3 ...
    assert first.a1111_name.startswith("diffusion_model_output_blocks_3_1_")
    assert first.true_name.startswith("diffusion_model_output_blocks_2_1_") and not first.loads
    # ... where the second one belongs (same shapes: applied to the wrong layer), and the second one goes to
    # output block 4, which this UNet does not have (blocks 0..3): dropped.
    second = a1111_mapping("lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn1_to_q", TINY)
    assert second.true_name == first.a1111_name
    assert second.a1111_name.startswith("diffusion_model_output_blocks_4_1_") and not second.loads
    modules = lora_modules(tiny_unet())
    wrong = a1111_misplaced(modules, TINY)
    assert 0 < len(wrong) < len(modules)
    warning = a1111_save_warning(modules, TINY)
    assert warning.startswith("this LoRA's UNet has [1, 1] ResNets per level, not the 2 of SD 1.x/2.x/SDXL: ")
    assert f"A1111 1.10 would drop or misplace {len(wrong)} of its {len(modules)} modules" in warning
    assert a1111_save_warning(lora_modules(sd15_shaped_unet()), SD15) is None


def test_the_layout_reads_the_same_from_a_diffusers_config_and_from_comfyuis_unet_config():
    assert UNetLayout.from_diffusers_config(tiny_unet().config) == TINY
    assert UNetLayout.from_diffusers_config(sd15_shaped_unet().config) == SD15
    # ComfyUI's detected unet_config of SD 1.5 and of the hosts' tiny-sd15 (transformer_depth: per input ResNet).
    assert UNetLayout.from_ldm_unet_config({"num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
                                            "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
                                            "transformer_depth_middle": 1}) == SD15
    assert UNetLayout.from_ldm_unet_config({"num_res_blocks": [1, 1], "channel_mult": [1, 1],
                                            "transformer_depth": [1, 0], "transformer_depth_middle": 1}) == TINY
    assert UNetLayout.from_json(TINY.to_json()) == TINY
    assert SD15.describe() == "4 levels of 2 ResNets, attention at levels 1, 2, 3"
    assert TINY.describe() == "2 levels of 1 ResNet, attention at level 1"


def _functions_from(path, names: set[str], prelude: str) -> dict:
    """Some top-level functions and constants of a host's file, run without importing the host."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    keep = [node for node in tree.body if (isinstance(node, ast.FunctionDef) and node.name in names) or (
        isinstance(node, ast.Assign) and any(getattr(t, "id", "") in names for t in node.targets))]
    namespace = {}
    exec(prelude + "\n" + ast.unparse(ast.Module(keep, type_ignores=[])), namespace)
    return namespace


@pytest.mark.skipif(not A1111_NETWORKS.is_file(), reason="no A1111 v1.10.1 checkout at ../hosts/webui")
@pytest.mark.parametrize("build", [tiny_unet, sd15_shaped_unet])
def test_a1111_compvis_name_is_a1111s_own_conversion(build):
    a1111 = _functions_from(A1111_NETWORKS, {"convert_diffusers_name_to_compvis", "suffix_conversion", "re_digits",
                                             "re_compiled"}, "import re")
    for name in every_module(build()):
        assert a1111_compvis_name(name) == a1111["convert_diffusers_name_to_compvis"](name, False), name


@pytest.mark.skipif(not COMFY_UTILS.is_file(), reason="no ComfyUI checkout at ../hosts/comfyui")
@pytest.mark.parametrize(("build", "layout", "config"), [
    (tiny_unet, TINY, {"num_res_blocks": [1, 1], "channel_mult": [1, 1], "transformer_depth": [1, 0],
                       "transformer_depth_output": [0, 0, 1, 1], "transformer_depth_middle": 1}),
    (sd15_shaped_unet, SD15, {"num_res_blocks": [2] * 4, "channel_mult": [1, 1, 1, 1],
                              "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
                              "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
                              "transformer_depth_middle": 1}),
])
def test_true_compvis_name_is_the_layer_comfyui_maps_the_module_to(build, layout, config):
    comfy = _functions_from(COMFY_UTILS, {"unet_to_diffusers", "UNET_MAP_ATTENTIONS", "TRANSFORMER_BLOCKS",
                                          "UNET_MAP_RESNET", "UNET_MAP_BASIC"}, "")
    weights = {k.rsplit(".", 1)[0]: v.rsplit(".", 1)[0] for k, v in comfy["unet_to_diffusers"](config).items()
               if k.endswith(".weight")}
    checked = 0
    for path, _ in _linear_modules(build()):
        if path in weights:
            expected = "diffusion_model_" + weights[path].replace(".", "_")
            assert true_compvis_name(kohya_name(path), layout) == expected, path
            checked += 1
    assert checked > 10


def test_saving_a_lora_that_a1111_would_misplace_warns_naming_how_many_modules(tmp_path, caplog):
    from safetensors import safe_open

    from trainer.tpo.lora import save_kohya_lora

    loras = attach_lora(tiny_unet(), 2, 2.0)
    with caplog.at_level(logging.WARNING, logger="trainer.tpo.lora"):
        path = save_kohya_lora(tmp_path / "tiny.safetensors", loras, {"promptist_unet_layout": TINY.to_json()})
    (said,) = [r.getMessage() for r in caplog.records]
    assert said.startswith("promptist: this LoRA's UNet has [1, 1] ResNets per level") and "ComfyUI and Forge" in said
    with safe_open(str(path), "pt") as f:
        assert UNetLayout.from_json(f.metadata()["promptist_unet_layout"]) == TINY
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainer.tpo.lora"):
        save_kohya_lora(tmp_path / "sd15.safetensors", attach_lora(sd15_shaped_unet(), 2, 2.0),
                        {"promptist_unet_layout": SD15.to_json()})
    assert caplog.records == []
