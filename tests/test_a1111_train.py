"""A1111/Forge: the Train SFT / Train PPO sections of the Promptist tab and the webui image generator.

The tab's functions run in the fake webui (tests/fake_webui.py): `shared.state` records progress,
previews and Interrupt; `modules.processing` records each txt2img job and paints solid images.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, prompt_pairs
from fake_webui import FakeProcessing, FakeState, load_script_in_fake_webui
from safetensors.torch import load_file


@pytest.fixture
def webui(monkeypatch, tmp_path, tiny_promptist_dir, tiny_clip_models_dir):
    """The extension in the fake webui; models/promptist holds the tiny policy, CLIP and aesthetic head."""
    models = tmp_path / "models"
    shutil.copytree(tiny_promptist_dir, models / "promptist")
    shutil.copytree(tiny_clip_models_dir, models / "promptist", dirs_exist_ok=True)
    settings = {"promptist_model": "tiny-promptist", "promptist_device": "cpu", "promptist_score_device": "cpu",
                "promptist_score_clip": "tiny-open-clip-hub", "promptist_score_aesthetic": "tiny-head.safetensors"}
    module = load_script_in_fake_webui(ROOT / "scripts" / "promptist.py", monkeypatch, models, settings)
    module.root = models / "promptist"
    return module


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"source": x, "target": y}) for x, y in prompt_pairs(64)) + "\n")
    return path


def sft(webui, pairs_file, save_name, steps=6, **overrides):
    """Press Train SFT (the function the button calls through wrap_gradio_gpu_call)."""
    args = dict(base="tiny-promptist", data_file=str(pairs_file), data_format="auto", save_name=save_name,
                steps=steps, lr=1e-3, batch_size=8, effective_batch_size=8, seed=0, save_every=3)
    args.update(overrides)
    return webui.tab._train_sft("task(test)", *args.values())


def log_steps(folder: Path) -> list[int]:
    return [int(line.split(",")[0]) for line in (folder / "train_log.csv").read_text().splitlines()[1:]]


# --- the generator ---------------------------------------------------------------------------------

def test_generator_builds_one_job_per_batch_with_the_seeds_size_and_rendered_dfprompts(a1111_script):
    state = FakeState()
    processing = FakeProcessing(state)
    generator = a1111_script.train.WebuiGenerator(processing, state, sampler_name="DPM++ 2M", negative="blurry",
                                            schedule_steps=lambda n: 2 * n, max_batch=2)
    prompts = ["a red horse, [anime:0-1:1.5], [detailed:0.5-1:1.25]", "a blue ship", "a red car"]
    images = generator.generate(prompts, [11, 12, 13], steps=10, guidance=6.5, size=(64, 48))

    assert images.shape == (3, 48, 64, 3) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert images[0, 0, 0].tolist() == pytest.approx([230 / 255, 25 / 255, 25 / 255])  # red prompt -> red image
    assert images[1, 0, 0, 2] > 0.8
    first, second = processing.jobs
    # DF blocks rendered for the sampler's 20 model calls (2nd order, 10 steps), as txt2img would
    assert first.prompt == ["a red horse, (anime:1.5)[, (detailed:1.25)::9]", "a blue ship"]
    assert second.prompt == ["a red car"]
    assert (first.seed, second.seed) == ([11, 12], [13])
    assert first.negative_prompt == ["blurry", "blurry"] and first.batch_size == 2 and first.n_iter == 1
    assert (first.width, first.height, first.steps, first.cfg_scale, first.sampler_name) == (64, 48, 10, 6.5,
                                                                                             "DPM++ 2M")
    assert first.do_not_save_samples and first.do_not_save_grid
    assert first.scripts is None and second.scripts is None  # no always-on script rewrites these prompts
    assert state.job_no == 0  # the trainer's progress is put back after each job


def test_interrupt_while_drawing_redraws_the_images_then_stops_at_the_callback(a1111_script, tmp_path):
    from trainer.progress import StopTraining

    state = FakeState()
    processing = FakeProcessing(state)
    generator = a1111_script.train.WebuiGenerator(processing, state, sampler_name="Euler")
    processing.interrupt_next = 1
    images = generator.generate(["a cat"], [1], steps=4, guidance=7, size=(8, 8))
    assert images.shape == (1, 8, 8, 3) and len(processing.jobs) == 2  # the partial image was drawn again
    assert generator.stop_requested and not state.interrupted
    progress = a1111_script.train.WebuiProgress(state, tmp_path, {"reward": ("reward",)}, "PPO", generator)
    with pytest.raises(StopTraining):
        progress(1, 5, {"reward": 0.5})

    processing.interrupt_next = 2  # Interrupt again while the images are drawn again: stop now
    with pytest.raises(StopTraining):
        generator.generate(["a cat"], [1], steps=4, guidance=7, size=(8, 8))


# --- Train SFT ---------------------------------------------------------------------------------------

def test_train_sft_saves_a_policy_the_settings_list_and_the_optimizer_loads(webui, pairs_file):
    from promptist_core.optimizer import load_optimizer

    curve, message = sft(webui, pairs_file, "my-sft")
    out = webui.root / "my-sft"
    assert "SFT finished" in message and "my-sft" in message
    assert curve.size[0] > 0 and log_steps(out)[-1] == 6
    state = webui.host.shared.state
    assert (state.job_count, state.job_no) == (6, 6) and state.textinfo.startswith("Promptist SFT: 6/6, loss ")
    assert state.previews and state.previews[-1].size == curve.size  # the live curve
    assert "my-sft" in webui.tab._policy_choices()["choices"]  # Settings -> Optimizer model lists it (refresh)
    optimizer = load_optimizer("my-sft", models_dir=webui.host.models_dirs(webui.host.shared.models_path), device="cpu")
    assert optimizer("a cat riding a bike")[0].prompt


def test_interrupt_saves_a_checkpoint_and_the_same_save_name_resumes_to_the_uninterrupted_weights(webui, pairs_file):
    from trainer.checkpoint import list_checkpoints

    sft(webui, pairs_file, "straight")
    state = webui.host.shared.state
    state.interrupt_at_job_no = 4  # Interrupt pressed during step 4
    _, message = sft(webui, pairs_file, "stopped")
    out = webui.root / "stopped"
    assert "interrupted at step 4" in message and "same save name" in message
    assert [c.step for c in list_checkpoints(out)][-1] == 4
    state.interrupt_at_job_no, state.interrupted = None, False  # what wrap_gradio_gpu_call resets
    _, message = sft(webui, pairs_file, "stopped")
    assert "SFT resumed and finished" in message
    assert log_steps(out)[-1] == 6
    straight, resumed = load_file(webui.root / "straight" / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.parametrize(("change", "error"), [
    ({"save_name": "a/b"}, "Save name must be a plain folder name"),
    ({"save_name": "tiny-promptist"}, "holds a model that is not a training run"),
    ({"data_file": "/no/such/pairs.jsonl"}, "no such file"),
    ({"base": "no-such-policy"}, "training (SFT): model 'no-such-policy' was not found"),
    ({"effective_batch_size": 12}, "multiple"),
])
def test_bad_sft_inputs_are_one_clear_error(webui, pairs_file, change, error):
    with pytest.raises(webui.errors.PromptistError) as e:
        change = dict(change)
        sft(webui, pairs_file, change.pop("save_name", "bad"), **change)
    assert error in str(e.value)


def press_train_sft(webui, monkeypatch, **values):
    """Build the section, then press Train SFT with its inputs' defaults and `values` (by _train_sft's names),
    as the webui calls the button's function (its call wrapper prints a traceback for anything raised)."""
    import inspect

    components = sys.modules["gradio"].Button
    monkeypatch.setattr(components, "clicks", [])
    webui.tab._sft_section()
    (_, fn, inputs, outputs, _), = [c for c in components.clicks if c[4].get("_js") == "promptistStartTraining_sft"]
    names = list(inspect.signature(webui.tab._train_sft).parameters)
    args = {**{n: c.kwargs.get("value") for n, c in zip(names, inputs, strict=True)}, **values}
    return fn(*args.values())


@pytest.mark.parametrize(("change", "error"), [
    ({"save_name": "a/b"}, "Save name must be a plain folder name"),
    ({"base": "no-such-policy"}, "model &#x27;no-such-policy&#x27; was not found"),
    ({"effective_batch_size": 12}, "multiple"),
])
def test_the_train_buttons_user_errors_show_in_the_ui_with_one_console_line(webui, pairs_file, monkeypatch, capfd,
                                                                            change, error):
    # Raised, they reached A1111's call wrapper: "*** Error completing request", the arguments, a traceback.
    curve, box = press_train_sft(webui, monkeypatch, **{"data_file": str(pairs_file), "steps": 2, **change})
    assert curve is None and box.startswith("<div class='error'>PromptistError: ") and error in box
    assert "\n" not in box
    console = [line for line in capfd.readouterr().err.splitlines() if "PromptistError" in line or "Traceback" in line]
    assert len(console) == 1 and console[0].startswith("*** PromptistError: ")


def test_a_bug_in_a_train_button_still_reaches_the_webuis_wrapper(webui, pairs_file, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(webui.tab, "train_sft_in_webui", broken)
    with pytest.raises(RuntimeError, match="a bug"):  # the webui prints it with its traceback
        press_train_sft(webui, monkeypatch, data_file=str(pairs_file))


# --- Train PPO ---------------------------------------------------------------------------------------

def test_train_ppo_draws_with_the_webui_and_trains_two_iterations(webui):
    curve, message = webui.tab._train_ppo(
        "task(ppo)", "tiny-promptist", "a cat riding a bike\na red horse on the grass\na ship at sea\n", "",
        "my-ppo", 2, 2, 1, "Euler", 3, 7.0, 32, 32, "", "promptist", 1e-4, 0.2, 1, 0, 1)
    out = webui.root / "my-ppo"
    assert "PPO finished" in message, message
    assert log_steps(out) == [1, 2]
    jobs = sys.modules["modules.processing"].jobs
    assert jobs and all(j.scripts is None and (j.width, j.height, j.steps) == (32, 32, 3) for j in jobs)
    drawn = [t for j in jobs for t in j.prompt]
    plains = {"a cat riding a bike", "a red horse on the grass", "a ship at sea"}
    assert set(drawn) & plains and set(drawn) - plains  # the plain prompts (once) and the policy's rewrites
    assert (out / "prompts.txt").read_text().splitlines() == ["a cat riding a bike", "a red horse on the grass", "a ship at sea"]
    assert webui.host.shared.state.textinfo.startswith("Promptist PPO: 2/2")
    assert "my-ppo" in webui.tab._policy_choices()["choices"]
    with pytest.raises(webui.errors.PromptistError, match="started from the policy 'tiny-promptist', not 'my-ppo'"):
        webui.tab._train_ppo("task(ppo)", "my-ppo", "a ship at sea\na cat\n", "", "my-ppo", 3, 2, 1, "Euler", 3, 7.0,
                         32, 32, "", "promptist", 1e-4, 0.2, 1, 0, 1)


def test_curves_draw_with_the_bitmap_font_of_the_webuis_pillow(monkeypatch):
    """A1111 1.10 pins Pillow 9.5, whose default font is a latin-1 bitmap font: the live curve must draw."""
    from PIL import ImageDraw, ImageFont

    from trainer.training_log import plot_curves

    bitmap = getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)()
    monkeypatch.setattr(ImageDraw.ImageDraw, "getfont", lambda self: bitmap)
    image = plot_curves({"loss": {"loss": [(1, 2.0), (2, 1.5)], "valid_loss": [(2, 1.7)]}}, "SFT")
    assert image.size[0] > 0
