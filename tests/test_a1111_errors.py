"""A1111/Forge: our errors stop the job and reach the user; PNG Info restores the user's prompt; settings.

The webui's classes of scripts/promptist.py run here on a fake webui (tests/fake_webui.py) that calls
the hooks as A1111 1.10 does: each hook's exception is only logged, then `p.init` runs unwrapped.
"""

from __future__ import annotations

import shutil
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT
from fake_webui import Job, execute_entry, load_script_in_fake_webui, run_job_hooks, run_process_hook


@pytest.fixture
def webui(monkeypatch, tmp_path, tiny_promptist_dir):
    """scripts/promptist.py loaded in the fake webui; the optimizer model is the tiny one, on the CPU."""
    models = tmp_path / "models"
    shutil.copytree(tiny_promptist_dir, models / "promptist")
    settings = {"promptist_model": "tiny-promptist", "promptist_device": "cpu", "promptist_score_device": "cpu"}
    module = load_script_in_fake_webui(ROOT / "scripts" / "promptist.py", monkeypatch, models, settings)
    module.settings = module.host.shared.opts.data
    return module


def test_a_missing_model_stops_the_job_and_df_blocks_are_still_rendered(webui):
    webui.settings["promptist_model"] = "no-such-model"
    p = Job("a red horse, [anime:0-1:1.5], [detailed:0.5-1:1.25]")
    with pytest.raises(webui.errors.PromptistError) as e:
        run_process_hook(webui.PromptistScript(), p, True, "beam", False)
    # One line for the webui's box (it drops line breaks), and the name said once: "PromptistError: optimizing ..."
    assert str(e.value).startswith("optimizing the prompt: model 'no-such-model' was not found")
    assert "\n" not in str(e.value) and "Looked in: | " in str(e.value)
    assert "Put the model files" in str(e.value)
    assert e.value.status_code == 500
    assert not p.sampled
    # DF rendering does not depend on the optimizer: the webui never sees a raw DF block
    assert p.all_prompts == ["a red horse, (anime:1.5)[, (detailed:1.25)::9]"]


@pytest.mark.parametrize("prompt, column, expected, marked", [
    ("a red horse, [anime:1-0.5:1.5]", 21, "expected a range with start <= end", '"a red horse, [anime:▶1-0.5:1.5]"'),
    ("a red horse, [anime:0-1:abc]", 25, "expected a weight like 1.25", '"a red horse, [anime:0-1:▶abc]"'),
])
def test_a_malformed_dfprompt_stops_the_job_naming_the_column(webui, prompt, column, expected, marked):
    p = Job(prompt)
    with pytest.raises(webui.errors.PromptistError) as e:
        run_process_hook(webui.PromptistScript(), p, False, "beam", False)
    assert str(e.value).startswith(f"DF-Prompt error in the prompt, column {column}: {expected}")
    # The webui shows the error as HTML, which folds a caret line into a lone "^" after the prompt
    # (seen in A1111 1.10's txt2img): one line, with the place marked inside the prompt.
    assert "\n" not in str(e.value) and str(e.value).endswith(marked)
    assert e.value.status_code == 422  # the webui's API answers with the error's status_code
    assert p.all_prompts == [prompt] and not p.sampled


def test_a_dfprompt_error_in_a_long_prompt_shows_the_text_around_the_column(webui):
    prompt = "a red horse standing on the green grass under a blue sky, [anime:0-1:abc], highly detailed, 8k, trending on artstation"
    p = Job(prompt)
    with pytest.raises(webui.errors.PromptistError) as e:
        run_process_hook(webui.PromptistScript(), p, False, "beam", False)
    column = prompt.index("abc") + 1
    assert str(e.value).endswith(f'"…{prompt[column - 31:column - 1]}▶{prompt[column - 1:column + 29]}…"')


def test_a_malformed_dfprompt_in_the_tab_is_one_line_with_the_place_marked(webui):
    # The Promptist tab's errors go through the same HTML box (wrap_gradio_gpu_call).
    with pytest.raises(webui.errors.PromptistError) as e:
        webui.tab._optimize_for_tab("a red horse, [anime:1-0.5:1.5]", "beam", 4, 0)
    assert str(e.value) == ('DF-Prompt error, column 21: expected a range with start <= end, got 1-0.5 '
                            '(write 0.5-1): "a red horse, [anime:▶1-0.5:1.5]"')
    assert e.value.status_code == 422


def test_an_unreadable_tokenizer_stops_the_job(webui, tmp_path):
    folder = tmp_path / "models" / "promptist" / "tiny-promptist"
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (folder / name).write_text("{not a tokenizer", encoding="utf-8")
    p = Job("a cat riding a bike")
    with pytest.raises(webui.errors.PromptistError, match="^optimizing the prompt: the tokenizer in .* cannot be read"):
        run_process_hook(webui.PromptistScript(), p, True, "beam", False)
    assert p.all_prompts == ["a cat riding a bike"]


def test_errors_of_several_steps_are_all_reported_once(webui):
    p = Job("a cat")
    webui.errors.stop_job(p, webui.errors.PromptistError("first"))
    webui.errors.stop_job(p, webui.errors.PromptistError("second"))
    with pytest.raises(webui.errors.PromptistError, match=r"^first \| second$"):
        p.init([], [], [])


def test_a_missing_scoring_model_stops_the_job_before_sampling(webui):
    webui.settings["promptist_score_clip"] = "no-such-clip"
    p = Job("a cat")
    with pytest.raises(webui.errors.PromptistError, match="^loading the scoring models: .*no-such-clip"):
        run_process_hook(webui.PromptistScoreScript(), p, True, False, "promptist")
    assert not p.sampled


def test_every_missing_model_of_the_job_is_named_in_one_message_before_anything_runs(webui, monkeypatch):
    # A1111 1.10.1 offline with default settings said only the scoring CLIP; the next try met the next model.
    monkeypatch.setenv("PROMPTIST_OFFLINE", "1")
    webui.settings["promptist_model"] = "no-such-policy"
    p = Job("a red horse")
    with pytest.raises(webui.errors.PromptistError) as e:
        run_job_hooks(p, (webui.PromptistScript(), (True, "beam", False)),
                      (webui.PromptistScoreScript(), (True, False, "pae")))
    said = str(e.value)
    assert said.startswith("5 models this job needs are not here (")
    assert "\n" not in said and said.count(" | - ") == 5
    for role, name, files in [
            ("the optimizer policy", "no-such-policy", "config.json"),
            ("the scoring CLIP", "ViT-L-14/openai", "open_clip_config.json, open_clip_model.safetensors"),
            ("the aesthetic head", "improved", "sac+logos+ava1-l14-linearMSE.pth"),
            ("PickScore", "yuvalkirstain/PickScore_v1", "config.json"),
            ("PickScore's tokenizer", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "preprocessor_config.json")]:
        line = next(part for part in said.split(" | ") if part.startswith(f"- {role} '{name}': put "))
        assert files in line, line
        if role == "the optimizer policy":  # the webui's own models folder, where its users look
            assert f"{webui.host.shared.models_path}/promptist" in line.split(" (from ")[0], line
    assert "improved-aesthetic-predictor" in said  # where to download the head
    assert p.all_prompts == ["a red horse"] and not p.sampled  # the optimizer never ran


def test_a_job_whose_models_are_all_there_passes_the_check(webui):
    p = Job("a red horse")
    assert run_job_hooks(p, (webui.PromptistScript(), (True, "beam", False))) == []
    assert p.all_prompts != ["a red horse"] and p.sampled


def test_a_scoring_error_after_sampling_stops_the_job_at_saving(webui):
    p = Job("a cat")

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    p._promptist_scorer = broken
    pp = SimpleNamespace(images=[torch.zeros(3, 8, 8)])
    webui.PromptistScoreScript().postprocess_batch_list(p, pp, True, False, "promptist", batch_number=0)
    with pytest.raises(webui.errors.PromptistError, match="^scoring the images: CUDA out of memory"):
        p.save_samples()


def test_a_working_job_is_untouched(webui):
    p = Job("a red horse, [anime:0-1:1.5]")
    assert run_process_hook(webui.PromptistScript(), p, True, "beam", False) == []
    assert p.sampled and "\n" not in p.all_prompts[0] and p.all_prompts[0].endswith(", (anime:1.5)")
    assert p.extra_generation_params["Promptist original"] == ["a red horse, [anime:0-1:1.5]"]


def test_the_entry_holds_the_two_scripts_and_registers_each_callback_once_per_load(webui):
    """The webui registers the Script subclasses in the entry's namespace; Reload UI clears its callbacks and
    executes the entry again, which must register them again (the adapter package is imported only once)."""
    import inspect

    Script = sys.modules["modules.scripts"].Script
    registered = webui.host.script_callbacks.registered

    def script_classes(module):
        return {c.__name__ for c in module.__dict__.values() if inspect.isclass(c) and issubclass(c, Script)}

    assert script_classes(webui) == {"PromptistScript", "PromptistScoreScript"}
    assert [len(registered[kind]) for kind in ("ui_tabs", "ui_settings", "infotext_pasted")] == [1, 1, 1]
    for kind in ("ui_tabs", "ui_settings", "infotext_pasted"):
        registered[kind].clear()  # what the webui's load_scripts does before executing the scripts again
    again = execute_entry(ROOT / "scripts" / "promptist.py")
    assert script_classes(again) == {"PromptistScript", "PromptistScoreScript"}
    assert [len(registered[kind]) for kind in ("ui_tabs", "ui_settings", "infotext_pasted")] == [1, 1, 1]


def test_png_info_restores_the_users_prompt_not_the_rewrite(webui):
    (paste,) = webui.host.script_callbacks.registered["infotext_pasted"]
    params = {"Prompt": "a cat riding a bike, highly detailed", "Promptist original": "a cat riding a bike",
              "Promptist mode": "beam", "Steps": "20"}
    paste("...", params)
    assert params["Prompt"] == "a cat riding a bike"
    params = {"Prompt": "a red horse, (anime:1.5)", "DF-Prompt": "a red horse, [anime:0-1:1.5]"}
    paste("...", params)
    assert params["Prompt"] == "a red horse, [anime:0-1:1.5]"
    params = {"Prompt": "my own prompt"}
    paste("...", params)
    assert params == {"Prompt": "my own prompt"}


def test_rewrites_lose_line_breaks_and_control_characters(webui):
    class Optimizer:
        def __call__(self, texts, **kwargs):
            return [SimpleNamespace(prompt="a cat,\nhighly\tdetailed\x00, \u200bsharp  focus\r\n")
                    for _ in ([texts] if isinstance(texts, str) else texts)]

    assert webui.optimize.optimize_prompts(Optimizer(), ["a cat"]) == ["a cat, highly detailed, sharp focus"]


def test_the_tab_shows_each_candidate_once(webui, monkeypatch):
    result = SimpleNamespace(prompt="a cat, 8k", candidates=["a cat, 8k", "a cat, 8k\n", "a cat, smooth"],
                             clip_tokens=5, notes=[])
    monkeypatch.setattr(webui.tab, "loaded_optimizer", lambda: lambda *a, **k: [result])
    best, candidates, _ = webui.tab._optimize_for_tab("a cat", "beam", 3, 0)
    assert best == "a cat, 8k"
    assert candidates == "a cat, 8k\na cat, smooth"


def test_settings_have_a_section_in_a_category_and_name_both_model_folders(webui):
    (register,) = webui.host.script_callbacks.registered["ui_settings"]
    register()
    options = webui.host.shared.opts.add_option.__self__
    assert set(options) == {key for key, *_ in webui.tab.SETTINGS}
    assert {o.section for o in options.values()} == {("promptist", "Promptist")}
    assert {o.category_id for o in options.values()} == {"sd"}
    label = options["promptist_model"].label
    assert "models/promptist" in label and "extensions/promptist/models" in label


def test_the_default_setting_rewrites_with_the_bundled_policy_on_a_fresh_offline_webui(webui, monkeypatch, capsys):
    # A1111 offline with default settings reported microsoft/Promptist missing, though the CLI's default
    # falls back to the bundled policy: the setting's default is now that same choice.
    from promptist_core.weights import BUNDLED_POLICY

    monkeypatch.setenv("PROMPTIST_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(ROOT / "no-such-hub-cache"))
    del webui.settings["promptist_model"]
    assert webui.optimize.policy_name(webui.settings) == BUNDLED_POLICY
    p = Job("a red horse")
    assert run_job_hooks(p, (webui.PromptistScript(), (True, "beam", False))) == []
    assert p.all_prompts[0].startswith("a red horse, ") and p.sampled  # the bundled policy keeps the prompt
    assert "using the bundled policy" in capsys.readouterr().err
    webui.settings["promptist_model"] = "no-such-policy"  # a named policy is never replaced
    assert webui.optimize.policy_name(webui.settings) == "no-such-policy"
