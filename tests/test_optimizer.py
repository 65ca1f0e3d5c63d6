"""The prompt optimizer on a tiny Promptist policy loaded through the real resolver and loader."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from promptist_core import optimizer as optimizer_module
from promptist_core.optimizer import MODES, PromptError, _load, load_optimizer

PROMPTS = ["a cat riding a bike", "a fox in the snow", "portrait of an old man with a hat, oil", "a ship"]


def reference_promptist(model, tokenizer, plain_text: str) -> str:
    """The reference code of the Promptist demo (microsoft/Promptist Space), verbatim in substance."""
    input_ids = tokenizer(plain_text.strip() + " Rephrase:", return_tensors="pt").input_ids
    eos_id = tokenizer.eos_token_id
    outputs = model.generate(input_ids, do_sample=False, max_new_tokens=75, num_beams=8, num_return_sequences=8,
                             eos_token_id=eos_id, pad_token_id=eos_id, length_penalty=-1.0)
    output_texts = tokenizer.batch_decode(outputs, skip_special_tokens=True)
    return output_texts[0].replace(plain_text + " Rephrase:", "").strip()


def test_default_call_returns_what_the_reference_code_returns(tiny_optimizer):
    model, tokenizer = tiny_optimizer.model, tiny_optimizer.tokenizer
    for prompt in PROMPTS:
        assert tiny_optimizer(prompt)[0].prompt == reference_promptist(model, tokenizer, prompt)


def test_batched_results_equal_one_at_a_time_results(tiny_optimizer):
    batched = tiny_optimizer(PROMPTS, candidates=3, batch_size=4)
    single = [tiny_optimizer(p, candidates=3)[0] for p in PROMPTS]
    assert [r.candidates for r in batched] == [r.candidates for r in single]
    assert [r.source for r in batched] == PROMPTS  # input order kept


def test_small_batches_give_the_same_results_as_one_big_batch(tiny_optimizer):
    big = tiny_optimizer(PROMPTS * 2, batch_size=8)
    small = tiny_optimizer(PROMPTS * 2, batch_size=3)
    assert [r.prompt for r in big] == [r.prompt for r in small]


def test_candidates_are_best_first_and_count_as_asked(tiny_optimizer):
    result = tiny_optimizer("a cat riding a bike", candidates=4)[0]
    assert len(result.candidates) == 4
    assert result.prompt == result.candidates[0]
    assert result.candidates[0] == tiny_optimizer("a cat riding a bike")[0].prompt


def test_same_seed_gives_the_same_samples_and_another_seed_differs(tiny_optimizer):
    a = tiny_optimizer("a red horse on the grass", mode="sample", candidates=4, seed=7, temperature=1.5)[0]
    b = tiny_optimizer("a red horse on the grass", mode="sample", candidates=4, seed=7, temperature=1.5)[0]
    c = tiny_optimizer("a red horse on the grass", mode="sample", candidates=4, seed=8, temperature=1.5)[0]
    assert a.candidates == b.candidates
    assert a.candidates != c.candidates


def test_sampling_with_a_seed_does_not_depend_on_the_other_prompts_of_the_call(tiny_optimizer):
    alone = tiny_optimizer("a fox in the snow", mode="sample", candidates=2, seed=3)[0]
    together = tiny_optimizer(["a cat", "a fox in the snow"], mode="sample", candidates=2, seed=3)[1]
    assert alone.candidates == together.candidates


def test_sampling_does_not_disturb_the_global_random_state(tiny_optimizer):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_optimizer("a cat", mode="sample", seed=5)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("bad", ["", "   ", "\n\t"])
def test_empty_prompt_is_a_clear_error(tiny_optimizer, bad):
    with pytest.raises(PromptError, match="empty"):
        tiny_optimizer(bad)


def test_the_bad_prompt_of_a_batch_is_named(tiny_optimizer):
    with pytest.raises(PromptError, match="prompt 2 is empty"):
        tiny_optimizer(["a cat", " "])
    with pytest.raises(PromptError, match="prompt 2 must be text, got int"):
        tiny_optimizer(["a cat", 3])


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "greedy"}, "mode must be one of"),
    ({"candidates": 9}, r"candidates \(9\) cannot exceed num_beams \(8\)"),
    ({"candidates": 0}, "candidates must be between"),
    ({"max_new_tokens": 0}, "max_new_tokens must be between"),
    ({"mode": "sample", "temperature": 0}, "temperature must be > 0"),
    ({"mode": "diverse", "num_beams": 8, "num_beam_groups": 3}, "divisible by num_beam_groups"),
])
def test_bad_options_are_clear_errors(tiny_optimizer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_optimizer("a cat", **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_beams": 65, "max_new_tokens": 2}, "num_beams must be between 1 and 64"),
    ({"batch_size": 257, "max_new_tokens": 2}, "batch_size must be between 1 and 256"),
    ({"mode": "sample", "seed": 2**64}, "seed must be between 0 and 2"),
    ({"mode": "sample", "candidates": 65, "max_new_tokens": 2}, "candidates must be between 1 and 64"),
    ({"max_new_tokens": 513}, "max_new_tokens must be between 1 and 512"),
])
def test_sizes_a_user_can_type_are_bounded_with_a_clear_error(tiny_optimizer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_optimizer("a cat", **kwargs)


def _never_stopping(optimizer):
    """The same policy with an end token it never writes, so every rewrite runs to max_new_tokens."""
    from promptist_core.optimizer import PromptOptimizer

    copy = PromptOptimizer(optimizer.model, optimizer.tokenizer, name="never-stops")
    copy.eos_token_id = optimizer.tokenizer.convert_tokens_to_ids("Ġof")
    return copy


@pytest.mark.parametrize("mode", ["beam", "diverse", "sample"])
@pytest.mark.parametrize("prompt", ["a cat", "a cat riding a bike in a very long story " * 20])
def test_max_new_tokens_is_checked_against_the_policys_context_in_every_mode(tiny_optimizer, mode, prompt):
    optimizer = _never_stopping(tiny_optimizer)
    limit = optimizer.max_new_tokens_for(prompt)
    assert optimizer.context_length == 128 and 64 <= limit < 128
    # Up to the limit the rewrite runs to the last position of the context (a short prompt is not cut,
    # a long one is cut to make room) ...
    result = optimizer(prompt, mode=mode, max_new_tokens=limit, num_beams=2, seed=1)[0]
    assert result.input_truncated == (limit == 64)
    if mode != "sample":
        assert len(optimizer._tokenize(result.candidates[0])) >= limit - 2
    # ... one more is a clear error (it was an IndexError inside generate), naming both numbers.
    with pytest.raises(PromptError, match=rf"context of 128 tokens.*allowed for it is {limit}$"):
        optimizer(prompt, mode=mode, max_new_tokens=limit + 1, num_beams=2, seed=1)


def test_a_prompt_longer_than_the_context_is_truncated_with_a_note_not_a_crash(tiny_optimizer):
    huge = "a cat riding a bike in a very long story " * 200  # far beyond the tiny model's 128 tokens
    result = tiny_optimizer(huge, max_new_tokens=20)[0]
    assert result.input_truncated
    assert any("longer than the model's context" in n for n in result.notes)
    assert result.prompt


def test_an_empty_rewrite_falls_back_to_the_users_prompt(tiny_optimizer):
    # One new token that is end-of-text: the model's rewrite is empty.
    eos = tiny_optimizer.tokenizer.eos_token_id
    bias = torch.zeros(tiny_optimizer.model.config.vocab_size)
    bias[eos] = 1e4
    head = tiny_optimizer.model.lm_head
    original = head.weight.detach().clone()
    try:
        with torch.no_grad():
            head.weight.zero_()
            head.weight[eos] = 1.0
        result = tiny_optimizer("a lonely lighthouse")[0]
    finally:
        with torch.no_grad():
            head.weight.copy_(original)
    assert result.prompt == "a lonely lighthouse"
    assert any("no rewrite" in n for n in result.notes)


def test_clip_token_count_is_reported_and_trim_cuts_at_a_comma(tiny_optimizer):
    from promptist_core.clip_tokens import count_clip_tokens, trim_to_clip

    long_prompt = "a cat, " + ", ".join(f"detail number {i}" for i in range(40))
    assert count_clip_tokens(long_prompt) > 75
    trimmed = trim_to_clip(long_prompt)
    assert count_clip_tokens(trimmed) <= 75
    assert trimmed.startswith("a cat, detail number 0")
    assert long_prompt.startswith(trimmed) and long_prompt[len(trimmed)] == ","
    result = tiny_optimizer("a cat riding a bike")[0]
    assert result.clip_tokens == count_clip_tokens(result.prompt)


def test_optimizer_is_loaded_once_and_reused(tiny_promptist_dir, tiny_optimizer):
    again = load_optimizer("tiny-promptist", models_dir=tiny_promptist_dir, device="cpu")
    assert again is tiny_optimizer


def retrained_copy(tiny_promptist_dir: Path, target: Path, seed: int) -> Path:
    """A copy of the tiny policy with its weights replaced by other (seeded random) ones, saved in place the way
    a trainer rewrites its save folder."""
    import shutil

    from transformers import AutoModelForCausalLM

    if not target.exists():
        shutil.copytree(tiny_promptist_dir / "tiny-promptist", target)
    model = AutoModelForCausalLM.from_pretrained(str(target))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(str(target))
    return target


def test_a_folder_retrained_in_place_is_loaded_again_and_an_unchanged_one_stays_cached(tiny_promptist_dir, tmp_path):
    folder = retrained_copy(tiny_promptist_dir, tmp_path / "policy", seed=1)
    first = load_optimizer(str(folder), device="cpu")
    assert load_optimizer(str(folder), device="cpu") is first  # unchanged: the cached policy
    retrained_copy(tiny_promptist_dir, folder, seed=2)
    second = load_optimizer(str(folder), device="cpu")
    assert second is not first
    saved = load_file(folder / "model.safetensors")
    assert torch.equal(second.model.state_dict()["transformer.wte.weight"], saved["transformer.wte.weight"])
    assert not torch.equal(first.model.state_dict()["transformer.wte.weight"], saved["transformer.wte.weight"])
    assert load_optimizer(str(folder), device="cpu") is second
    assert first not in optimizer_module._CACHE.values()  # the old weights are not kept alive by the cache


def test_model_folder_given_as_a_path_loads(tiny_promptist_dir):
    optimizer = load_optimizer(str(tiny_promptist_dir / "tiny-promptist"), device="cpu")
    assert optimizer("a cat")[0].prompt


@pytest.mark.parametrize("config", [
    {"model_type": "clip", "architectures": ["CLIPModel"]},  # a CLIP or PickScore folder in models/promptist
    {"model_type": "gpt2", "architectures": ["GPT2ForSequenceClassification"]},
])
def test_a_folder_that_is_no_causal_lm_is_a_one_line_error(tmp_path, config):
    (tmp_path / "not-a-policy").mkdir()
    (tmp_path / "not-a-policy" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as error:
        load_optimizer("not-a-policy", models_dir=tmp_path, device="cpu")
    message = str(error.value)
    assert "\n" not in message and "not a causal language model" in message
    assert str(tmp_path / "not-a-policy") in message and repr(config["model_type"]) in message


@pytest.mark.parametrize("mode", MODES)
def test_generation_raises_no_deprecation_warning(tiny_optimizer, mode):
    # transformers 5 renamed `past_key_values` to `cache`: the old name warns on every call in a host's log.
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert tiny_optimizer("a cat", mode=mode, candidates=2, seed=0)[0].prompt


def test_loading_draws_no_progress_bar_and_keeps_the_hosts_setting(tiny_promptist_dir, capfd):
    from transformers.utils import logging as hf_logging

    folder = tiny_promptist_dir / "tiny-promptist"
    assert hf_logging.is_progress_bar_enabled()
    _load(folder, folder, torch.device("cpu"), torch.float32, "tiny-promptist")
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()


def test_cpu_runs_in_float32(tiny_optimizer):
    assert next(tiny_optimizer.model.parameters()).dtype == torch.float32


def test_step_callback_reports_progress_and_can_interrupt(tiny_optimizer):
    steps = []
    tiny_optimizer("a cat riding a bike", max_new_tokens=10, step_callback=lambda s, n: steps.append((s, n)))
    assert steps and steps[0] == (1, 10) and all(n == 10 for _, n in steps) and len(steps) <= 10

    class Interrupted(Exception):
        pass

    def interrupt(step, total):
        if step == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        tiny_optimizer("a cat riding a bike", step_callback=interrupt)
    # The optimizer stays usable after an interrupt.
    assert tiny_optimizer("a cat riding a bike")[0].prompt


def test_diverse_mode_returns_distinct_candidates_unlike_plain_beams(tiny_optimizer):
    diverse = tiny_optimizer("a cat riding a bike", mode="diverse", candidates=4, num_beams=4,
                             diversity_penalty=2.0)[0]
    beams = tiny_optimizer("a cat riding a bike", mode="beam", candidates=4, num_beams=4)[0]
    assert len(set(diverse.candidates)) == 4
    assert diverse.candidates != beams.candidates


def test_diverse_mode_batched_equals_one_at_a_time(tiny_optimizer):
    kwargs = dict(mode="diverse", candidates=3, num_beams=8, num_beam_groups=4)
    batched = tiny_optimizer(PROMPTS, **kwargs)
    single = [tiny_optimizer(p, **kwargs)[0] for p in PROMPTS]
    assert [r.candidates for r in batched] == [r.candidates for r in single]
