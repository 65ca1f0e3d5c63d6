"""Promptist Evaluate on the fake ComfyUI of test_train_nodes.py (its sampler paints conditioning that
mentions red red, everything else blue): the grid and the table come back, progress counts every image,
Cancel stops it, a broken policy is named before any image."""

from __future__ import annotations

import pytest
import torch
from test_train_nodes import FakeCLIP, FakeModel, FakeVAE, Interrupt, comfy, models_dir  # noqa: F401

from nodes.comfy_schema import v1_node
from nodes.evaluate import Evaluate
from nodes.rewards import RewardModelLoader
from trainer.evaluate import VariantError


def run_node(**overrides):
    (reward_model,) = RewardModelLoader.run(clip_model="tiny-open-clip-hub", aesthetic_head="tiny-head.safetensors",
                                            device="cpu")
    settings = dict(model=FakeModel(), clip=FakeCLIP(), vae=FakeVAE(), promptist_reward_model=reward_model,
                    prompts="a cat\na horse\n\na castle\n", policies="tiny-promptist,max_new_tokens=8\n# a comment\n"
                    "tiny-promptist,max_new_tokens=8,name=again", seeds=2, seed=0, sampler_name="euler",
                    scheduler="normal", steps=2, cfg=7.0, width=64, height=64, metric="aesthetic",
                    baseline="tiny-promptist,max_new_tokens=8", negative="")
    settings.update(overrides)
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        return v1_node(Evaluate)().run(**settings)


def test_evaluate_node_returns_the_grid_and_the_table_with_progress_per_image(models_dir, comfy):  # noqa: F811
    grid, table = run_node()
    assert grid.ndim == 4 and grid.shape[0] == 1 and grid.shape[-1] == 3
    assert grid.shape[1] > 3 * 192 and grid.shape[2] == 3 * 192  # rows = 3 prompts, columns = 3 variants
    assert table.splitlines()[0].startswith("variant") and "again" in table and "win vs tiny-promptist,max_new_tokens=8" in table
    assert comfy.updates[-1][:2] == (18, 18)  # 3 prompts x 2 seeds x 3 variants
    seeds_of = {}
    for sample in comfy.samples:  # every variant of a (prompt, seed) drew from the same noise
        seeds_of.setdefault(sample["seed"], []).extend(sample["noise"])  # identical rewrites share a batch
    assert len(seeds_of) == 6
    assert all(len(v) == 3 and all(torch.equal(v[0], n) for n in v) for v in seeds_of.values())


def test_cancel_stops_the_evaluation(models_dir, comfy):  # noqa: F811
    comfy.cancel_at = 4  # after the first generator call (2 (prompt, seed)s x 2 variants)
    with pytest.raises(Interrupt):
        run_node(policies="tiny-promptist,max_new_tokens=8", baseline="")
    assert len(comfy.samples) < 12


def test_a_broken_policy_is_named_before_any_image(models_dir, comfy, tmp_path):  # noqa: F811
    with pytest.raises(VariantError, match="'nowhere'"):
        run_node(policies=f"tiny-promptist\n{tmp_path / 'missing'},name=nowhere")
    assert comfy.samples == []
