"""SDXL single-file checkpoints headless: the layout users keep in their hosts' checkpoints folders.

The file is tests/builders_sdxl.py's original SDXL layout (model.diffusion_model.*, first_stage_model.*,
conditioner.embedders.0/1.*) at TINY_TEST widths, loaded offline with a weightless diffusers config folder
of the same architecture (`--sd-config`), as an SD 1.5 single file is.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from builders_sdxl import TINY_TEST, write_diffusers_config, write_tiny_sdxl
from safetensors.torch import load_file

from promptist_core.generators import load_diffusers_generator
from trainer.cli import main


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tiny-sdxl-file")
    write_tiny_sdxl(folder / "tiny-sdxl.safetensors", TINY_TEST, fp32=True)
    return folder / "tiny-sdxl.safetensors", write_diffusers_config(folder / "config", TINY_TEST)


def test_sdxl_single_file_loads_offline_as_an_sdxl_pipeline_with_the_files_weights(sdxl_file):
    file, config = sdxl_file
    generator = load_diffusers_generator(str(file), device="cpu", config_folder=str(config), allow_download=False)
    pipe = generator.pipe
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    weights = load_file(file)
    key = "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_k.weight"
    assert torch.equal(pipe.unet.up_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.weight, weights[key])
    # the second text encoder is the OpenCLIP tower (text_projection is stored transposed there)
    assert torch.equal(pipe.text_encoder_2.text_projection.weight,
                       weights["conditioner.embedders.1.model.text_projection"].T)
    images = generator.generate(["a red horse, [anime:0-1:1.5], [detailed:0.5-1:1.25]", "a cat"], [1, 2],
                                steps=2, guidance=5.0, size=(64, 64))
    assert images.shape == (2, 64, 64, 3) and torch.isfinite(images).all()


def test_headless_tpo_trains_an_sdxl_lora_on_the_single_file(sdxl_file, tmp_path, capsys):
    from test_tpo import write_image_data

    from trainer.tpo.lora import load_kohya_lora

    file, config = sdxl_file
    data = write_image_data(tmp_path / "data")
    out = tmp_path / "loras" / "sdxl_tpo.safetensors"
    assert main(["tpo", "--data", str(data), "--sd", str(file), "--sd-config", str(config), "--out", str(out),
                 "--resolution", "64", "--batch-size", "2", "--grad-accum", "1", "--device", "cpu", "--no-progress",
                 "--tensorboard", "false", "--rank", "2", "--max-steps", "2"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["steps"] == 2 and out.is_file()
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    pipe = load_diffusers_generator(str(file), device="cpu", config_folder=str(config), allow_download=False).pipe
    # every attention projection of the 17 transformer blocks (6 down, 2 mid, 9 up) x (attn1, attn2) x (q, k, v, out)
    assert len(load_kohya_lora(pipe.unet, out)) == 17 * 2 * 4


def test_unreadable_single_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match=r"broken\.safetensors: not a readable \.safetensors checkpoint"):
        load_diffusers_generator(str(bad), device="cpu", allow_download=False)


def test_headless_evaluate_draws_and_scores_on_the_sdxl_single_file(sdxl_file, tmp_path, tiny_promptist_dir,
                                                                    tiny_clip_models_dir, capsys):
    file, config = sdxl_file
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red car on a street\na cat on a couch\n")
    code = main(["evaluate", "--sd", str(file), "--sd-config", str(config), "--prompts", str(prompts), "--n", "2",
                 "--seeds", "1", "--variant", "tiny-promptist,max_new_tokens=8", "--steps", "2", "--size", "64",
                 "--clip-model", "tiny-open-clip-hub", "--aesthetic-head", "tiny-head.safetensors", "--models-dir",
                 str(tiny_clip_models_dir), "--models-dir", str(tiny_promptist_dir), "--device", "cpu",
                 "--out", str(tmp_path / "out"), "--save-images"])
    assert code == 0, capsys.readouterr().err
    assert len(list((tmp_path / "out" / "images").glob("*.png"))) == 2 * 2  # plain + the variant, 2 prompts
