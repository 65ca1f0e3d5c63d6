"""The A1111 AlwaysVisible script's prompt-rewrite hook, on a p-like processing object."""

from __future__ import annotations

from types import SimpleNamespace

import pytest


@pytest.fixture(scope="module")
def script(a1111_script):
    return a1111_script


def processing(prompts, seeds=None, **extra):
    """The attributes of modules.processing.StableDiffusionProcessing that the hook touches."""
    return SimpleNamespace(prompt=prompts[0], all_prompts=list(prompts), main_prompt=prompts[0],
                           all_seeds=seeds or list(range(100, 100 + len(prompts))),
                           extra_generation_params={}, **extra)


def test_script_loads_without_the_webui_and_defines_no_webui_classes(script):
    assert script.host.scripts is None
    assert not hasattr(script, "PromptistScript")


def test_hook_rewrites_every_prompt_and_records_the_originals_in_infotext(script, tiny_optimizer):
    p = processing(["a cat riding a bike", "a cat riding a bike", "a ship"])
    script.optimize.optimize_processing(p, tiny_optimizer, mode="beam")
    expected = [r.prompt for r in tiny_optimizer(["a cat riding a bike", "a ship"])]
    assert p.all_prompts == [expected[0], expected[0], expected[1]]
    assert p.prompt == p.main_prompt == expected[0]
    assert p.extra_generation_params["Promptist original"] == ["a cat riding a bike"] * 2 + ["a ship"]
    assert p.extra_generation_params["Promptist mode"] == "beam"


def test_hook_keeps_lora_tags_out_of_the_policy_and_in_the_prompt(script, tiny_optimizer):
    p = processing(["a cat riding a bike <lora:catstyle:0.8>"])
    script.optimize.optimize_processing(p, tiny_optimizer)
    assert p.all_prompts == [tiny_optimizer("a cat riding a bike")[0].prompt + " <lora:catstyle:0.8>"]


def test_hook_rewrites_hires_prompts_that_followed_the_prompt(script, tiny_optimizer):
    p = processing(["a cat riding a bike", "a ship"], all_hr_prompts=["a cat riding a bike", "my own hires"])
    script.optimize.optimize_processing(p, tiny_optimizer)
    assert p.all_hr_prompts == [p.all_prompts[0], "my own hires"]


def test_sample_mode_uses_each_images_seed(script, tiny_optimizer):
    p = processing(["a fox in the snow"] * 2, seeds=[1, 2])
    script.optimize.optimize_processing(p, tiny_optimizer, mode="sample")
    assert p.all_prompts[0] == tiny_optimizer("a fox in the snow", mode="sample", seed=1)[0].prompt
    assert p.all_prompts[1] == tiny_optimizer("a fox in the snow", mode="sample", seed=2)[0].prompt


def test_split_keeps_tags_and_dfprompt_blocks_out_of_the_policy(script):
    assert script.optimize.split_for_policy("a cat, <lora:x:1> in a hat <hypernet:y:0.5>") == (
        "a cat, in a hat", " <lora:x:1> <hypernet:y:0.5>")
    assert script.optimize.split_for_policy("<lora:x:1>") == ("", " <lora:x:1>")
    assert script.optimize.split_for_policy("a red horse, [anime:0-1:1.5], [detailed:0.5-1:1.25] <lora:x:1>") == (
        "a red horse", ", [anime:0-1:1.5], [detailed:0.5-1:1.25] <lora:x:1>")


def test_optimizing_a_dfprompt_rewrites_its_text_and_keeps_its_blocks(script, tiny_optimizer):
    p = processing(["a red horse on the grass, [anime:0-1:1.5], [detailed:0.5-1:1.25]"])
    script.optimize.optimize_processing(p, tiny_optimizer)
    best = tiny_optimizer("a red horse on the grass")[0].prompt
    assert p.all_prompts == [best + ", [anime:0-1:1.5], [detailed:0.5-1:1.25]"]
    script.optimize.render_dfprompt_processing(p, steps=20, hires_steps=20)
    assert p.all_prompts == [best + ", (anime:1.5)[, (detailed:1.25)::9]"]  # a block takes its ", " along


def test_the_bundled_policy_is_offered_and_rewrites_with_the_prompt_kept(script):
    """Settings -> Optimizer model lists promptist-mini with nothing copied, and the hook's rewrite keeps the
    user's words in front."""
    from pathlib import Path

    from promptist_core.optimizer import load_optimizer
    from promptist_core.weights import BUNDLED_POLICY

    assert BUNDLED_POLICY in script.train.policy_names([Path("/nonexistent")], ("microsoft/Promptist",))
    p = processing(["a cat riding a bike"])
    script.optimize.optimize_processing(p, load_optimizer(BUNDLED_POLICY, device="cpu"))
    assert p.all_prompts[0].startswith("a cat riding a bike, ") and p.all_prompts[0].count(",") >= 2
