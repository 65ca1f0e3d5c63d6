"""The A1111 script renders DF-Prompts to the webui's own syntax, with the step counts of each pass."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from promptist_core import dfprompt as df

PROMPT = "a red horse, [anime:0-0.5:1.5], [detailed:0.5-1:1.25]"


@pytest.fixture(scope="module")
def script(a1111_script):
    return a1111_script


def processing(prompts, negatives=None, *, steps=20, hr_steps=None, **extra):
    """The attributes of the webui's processing object that the hook reads and writes (after setup_prompts)."""
    negatives = negatives or [""] * len(prompts)
    p = SimpleNamespace(prompt=prompts[0], main_prompt=prompts[0], all_prompts=list(prompts),
                        all_negative_prompts=list(negatives), steps=steps, extra_generation_params={}, **extra)
    if hr_steps is not None:
        p.enable_hr, p.hr_second_pass_steps = True, hr_steps
        p.all_hr_prompts, p.all_hr_negative_prompts = list(prompts), list(negatives)
    return p


def test_prompts_with_df_blocks_are_rendered_with_integer_steps(script):
    p = processing([PROMPT, "a plain (cat:1.2)"], ["blurry, [ugly:0-0.5:1.5]", "blurry"], steps=20)
    assert script.optimize.render_dfprompt_processing(p) is True
    assert p.all_prompts == ["a red horse[, (anime:1.5):9][, (detailed:1.25)::9]", "a plain (cat:1.2)"]
    assert p.all_negative_prompts == ["blurry[, (ugly:1.5):9]", "blurry"]
    assert p.main_prompt == p.all_prompts[0]
    assert p.extra_generation_params["DF-Prompt"] == [PROMPT, "a plain (cat:1.2)"]


def test_prompts_without_df_blocks_are_left_alone(script):
    p = processing(["a [cat:dog:10] in (snow:1.1)"])  # the webui's own prompt editing stays its own
    assert script.optimize.render_dfprompt_processing(p) is False
    assert p.all_prompts == ["a [cat:dog:10] in (snow:1.1)"] and p.extra_generation_params == {}


def test_hires_prompts_use_the_second_pass_steps_counted_after_the_first(script):
    p = processing([PROMPT], steps=20, hr_steps=10)
    script.optimize.render_dfprompt_processing(p)
    assert p.all_prompts == ["a red horse[, (anime:1.5):9][, (detailed:1.25)::9]"]
    assert p.all_hr_prompts == ["a red horse[, (anime:1.5):24][, (detailed:1.25)::24]"]
    p = processing([PROMPT], steps=20, hr_steps=0)  # 0: the hires pass uses p.steps
    script.optimize.render_dfprompt_processing(p)
    assert p.all_hr_prompts == ["a red horse[, (anime:1.5):29][, (detailed:1.25)::29]"]
    p = processing([PROMPT], steps=20, hr_steps=10)
    script.optimize.render_dfprompt_processing(p, old_scheduling=True)
    assert p.all_hr_prompts == ["a red horse[, (anime:1.5):4][, (detailed:1.25)::4]"]


def test_the_webuis_own_prompt_editing_keeps_working_beside_df_blocks(script):
    p = processing(["a [cat:dog:10], [detailed:0.5-1:1.25]"], steps=20)
    script.optimize.render_dfprompt_processing(p)
    assert p.all_prompts == ["a [cat:dog:10][, (detailed:1.25)::9]"]


def test_a_bad_block_stops_the_job_with_its_column(script):
    p = processing(["a cat, [fluffy:0.5-1.5:1]"])
    with pytest.raises(ValueError, match="column 20: expected a range within 0-1, got 1.5"):
        script.optimize.render_dfprompt_processing(p)


def test_the_webui_schedules_both_passes_as_pae_does(script, webui_prompt_parser):
    prompt_parser = webui_prompt_parser
    for steps, hr_steps in ((20, 10), (30, 15), (25, 25)):
        p = processing([PROMPT], steps=steps, hr_steps=hr_steps)
        script.optimize.render_dfprompt_processing(p)
        # As processing.py does: the first pass with its steps; the hires pass with (first, hires) steps.
        first = prompt_parser.get_learned_conditioning_prompt_schedules(p.all_prompts, steps)[0]
        hires = prompt_parser.get_learned_conditioning_prompt_schedules(p.all_hr_prompts, steps, hr_steps)[0]
        for entries, n in ((first, steps), (hires, hr_steps)):
            got = [next(t for end, t in entries if i <= end) for i in range(n)]
            assert got == df.step_texts(PROMPT, n)
