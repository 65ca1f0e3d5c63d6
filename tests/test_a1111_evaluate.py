"""A1111/Forge: the Evaluate section of the Promptist tab on the fake webui (tests/fake_webui.py), whose
txt2img paints solid images; the tiny policy and the tiny CLIP + aesthetic head of Settings → Promptist."""

from __future__ import annotations

import inspect
import sys
from types import SimpleNamespace

import pytest
from test_a1111_train import webui  # noqa: F401

POLICIES = "tiny-promptist,max_new_tokens=8,name=tiny\ntiny-promptist,mode=sample,seed=1,max_new_tokens=8,name=sampled"


def press_evaluate(webui, monkeypatch, **values):  # noqa: F811
    """Build the section, then press Evaluate with its inputs' defaults and `values` (by _evaluate's names)."""
    components = sys.modules["gradio"].Button
    monkeypatch.setattr(components, "clicks", [])
    monkeypatch.setattr(sys.modules["modules.sd_samplers"], "visible_samplers", lambda: [SimpleNamespace(name="Euler")],
                        raising=False)
    webui.tab._evaluate_section()
    (_, fn, inputs, outputs, options), = [c for c in components.clicks if c[4].get("_js") == "promptistStartEvaluate"]
    names = list(inspect.signature(webui.tab._evaluate).parameters)
    assert len(names) == len(inputs) and len(outputs) == 3
    defaults = {n: c.kwargs.get("value") for n, c in zip(names, inputs, strict=True)}
    assert defaults["policies"] == "promptist-mini" and defaults["prompt_set"] == "typed"
    args = {**defaults, **values}
    return fn(*args.values())


def small(tmp_path, **overrides):
    return {"prompts": "a cat riding a bike\na red horse on the grass\n", "policies": POLICIES, "seeds": 1,
            "steps": 2, "width": 32, "height": 32, "metric": "aesthetic", "baseline": "tiny",
            "out_folder": str(tmp_path / "eval"), **overrides}


def test_evaluate_returns_the_grid_and_a_table_naming_each_variant(webui, monkeypatch, tmp_path):  # noqa: F811
    grid, table, message = press_evaluate(webui, monkeypatch, **small(tmp_path))
    assert grid.size == (3 * 192, 18 + 2 * (192 + 16))  # rows = 2 prompts, columns = plain, tiny, sampled
    rows = [line.split()[0] for line in table.splitlines()[2:5]]
    assert rows == ["plain", "tiny", "sampled"] and "win vs tiny" in table.splitlines()[0]
    assert "Evaluate finished: 6 images" in message
    assert {p.name for p in (tmp_path / "eval").iterdir()} == {"results.csv", "summary.json", "grid.png", "report.html"}
    jobs = sys.modules["modules.processing"].jobs
    assert sum(len(j.prompt) for j in jobs) == 6
    assert all(j.scripts is None and (j.width, j.height, j.steps) == (32, 32, 2) for j in jobs)
    assert {tuple(j.seed) == (j.seed[0],) * len(j.seed) for j in jobs} == {True}  # variants share a seed
    assert webui.host.shared.state.textinfo == "Promptist Evaluate: 6/6 images"


def test_a_missing_policy_is_one_clear_error_before_any_image(webui, tmp_path):  # noqa: F811
    error = webui.errors.PromptistError
    args = ("task", "a cat\na horse", "typed", 4, "", 1, 0, "Euler", 2, 7.0, 32, 32, "", "aesthetic", "",
            str(tmp_path / "eval"))
    with pytest.raises(error, match=r"variant 'nowhere' \(.*missing\)"):
        webui.tab._evaluate(*args[:4], f"tiny-promptist\n{tmp_path / 'missing'},name=nowhere", *args[5:])
    with pytest.raises(error, match="unknown option 'bogus'"):
        webui.tab._evaluate(*args[:4], "tiny-promptist,bogus=1", *args[5:])
    with pytest.raises(error, match="needs PickScore"):
        webui.tab._evaluate(*args[:4], "tiny-promptist", *args[5:13], "pick", *args[14:])
    assert sys.modules["modules.processing"].jobs == []
    assert not (tmp_path / "eval").exists()


def test_interrupt_stops_between_images_and_shows_the_prompts_that_were_complete(webui, monkeypatch,  # noqa: F811
                                                                                 tmp_path):
    state, processing = webui.host.shared.state, sys.modules["modules.processing"]
    state.interrupt_at_job_no = 2  # Interrupt pressed once 2 images (the first prompt's) are done
    settings = small(tmp_path, prompts="a cat\na red horse\na castle", policies="tiny-promptist,max_new_tokens=8",
                     baseline="")
    grid, table, message = press_evaluate(webui, monkeypatch, **settings)
    assert len(processing.jobs) == 1  # no image after the Interrupt
    assert "interrupted after 2 of 6 images" in message and "1 of 3 prompts" in message
    assert grid.size == (2 * 192, 18 + 192 + 16) and "1 prompts x 1 seeds" in table
    assert (tmp_path / "eval" / "report.html").is_file()

    state.interrupt_at_job_no, state.interrupted = None, False  # what wrap_gradio_gpu_call resets
    processing.interrupt_next = 1  # Interrupt while the first batch is sampled: it is dropped, not redrawn
    grid, table, message = press_evaluate(webui, monkeypatch, **{**settings, "out_folder": str(tmp_path / "e2")})
    assert len(processing.jobs) == 2 and (grid, table) == (None, "")
    assert "after 0 of 6 images" in message and not (tmp_path / "e2").exists()
