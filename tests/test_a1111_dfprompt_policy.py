"""A1111/Forge with a DF-Prompt policy: chosen as the optimizer model, its DF-Prompts reach the webui rendered
to prompt editing (`to_a1111`); the Train PPO section's DF-Prompt checkbox trains one. On the fake webui
(tests/fake_webui.py), which runs the hooks as A1111 1.10 does."""

from __future__ import annotations

import shutil
import sys

import pytest
from conftest import ROOT
from fake_webui import Job, load_script_in_fake_webui, run_process_hook

from promptist_core import dfprompt


@pytest.fixture
def webui(monkeypatch, tmp_path, tiny_dfprompt_dir, tiny_promptist_dir, tiny_clip_models_dir):
    """models/promptist holds the tiny policy, a tiny DF-Prompt policy (the optimizer model), CLIP and a head."""
    models = tmp_path / "models"
    for source in (tiny_promptist_dir, tiny_dfprompt_dir, tiny_clip_models_dir):
        shutil.copytree(source, models / "promptist", dirs_exist_ok=True)
    settings = {"promptist_model": "tiny-dfprompt", "promptist_device": "cpu", "promptist_score_device": "cpu",
                "promptist_score_clip": "tiny-open-clip-hub", "promptist_score_aesthetic": "tiny-head.safetensors"}
    module = load_script_in_fake_webui(ROOT / "scripts" / "promptist.py", monkeypatch, models, settings)
    module.root = models / "promptist"
    return module


def test_a_dfprompt_policy_as_the_optimizer_gives_the_webui_its_dfprompt_as_prompt_editing(webui):
    from promptist_core.optimizer import load_optimizer

    assert "tiny-dfprompt" in webui.tab._policy_choices()["choices"]
    source = "a cat riding a bike"
    p = Job(source, steps=20)
    assert run_process_hook(webui.PromptistScript(), p, True, "diverse", False) == []
    written = load_optimizer(str(webui.root / "tiny-dfprompt"), device="cpu")(source, mode="diverse")[0].prompt
    assert dfprompt.parse(written).modifiers, written  # the tiny policy's heads make blocks
    assert p.all_prompts == [dfprompt.to_a1111(written, 20)] and p.sampled
    assert "[" in p.all_prompts[0] and not dfprompt.has_dfprompt(p.all_prompts[0])  # the webui's syntax only
    assert p.extra_generation_params["Promptist original"] == [source]
    assert p.extra_generation_params["DF-Prompt"] == [written]  # PNG Info keeps the DF-Prompt
    # the Optimize tab shows the DF-Prompt itself (sent to txt2img, the script renders it there)
    best, _, _ = webui.tab._optimize_for_tab(source, "diverse", 1, 0)
    assert best == written


def test_train_ppo_with_the_dfprompt_checkbox_trains_heads_and_draws_their_prompt_editing(webui):
    from promptist_core.dfprompt_policy import load_heads
    from promptist_core.optimizer import load_optimizer
    from trainer.checkpoint import list_checkpoints

    curve, message = webui.tab._train_ppo(
        "task(ppo)", "tiny-promptist", "a cat riding a bike\na red horse on the grass\na ship at sea\n", "",
        "my-df-ppo", 2, 2, 1, "Euler", 4, 7.0, 32, 32, "", "promptist", 1e-4, 0.2, 1, 0, 1, True)
    out = webui.root / "my-df-ppo"
    assert "PPO finished" in message, message
    assert load_heads(out) is not None and list_checkpoints(out)[-1].state["config"]["dfprompt"] is True
    assert load_optimizer(str(out), device="cpu").is_dfprompt
    drawn = [t for j in sys.modules["modules.processing"].jobs for t in j.prompt]
    assert not any(dfprompt.has_dfprompt(t) for t in drawn)  # never a raw DF block: the webui's syntax
    assert any("::" in t or ":2]" in t or "[(" in t for t in drawn), drawn  # a range block as prompt editing
