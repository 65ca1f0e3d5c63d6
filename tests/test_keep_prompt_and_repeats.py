"""The decoding options a small policy needs: the prompt kept verbatim, and no n-gram twice."""

from __future__ import annotations

import json

import pytest
import torch

from promptist_core.decoding_constraints import (
    ConstraintProcessor,
    WrittenTokenConstraint,
    ban_early_end,
    ban_repeated_ngrams,
)
from promptist_core.optimizer import MODES, PromptOptimizer, join_kept, load_optimizer
from promptist_core.policy_folder import DecodingDefaults, read_decoding_defaults
from promptist_core.rewrite_quality import words

PROMPTS = ["a cat riding a bike", "portrait of an old man.", "a castle on a hill"]


def has_repeated_ngram(tokens: list[int], size: int) -> bool:
    grams = [tuple(tokens[i:i + size]) for i in range(len(tokens) - size + 1)]
    return len(grams) != len(set(grams))


def test_a_token_that_would_repeat_an_ngram_is_banned_and_nothing_else():
    generated = torch.tensor([[5, 6, 7, 5, 6], [1, 2, 3, 4, 5]])
    scores = torch.zeros(2, 10)
    out = ban_repeated_ngrams(generated, scores, 3)
    assert out[0, 7] == -float("inf") and torch.isfinite(out[0, :7]).all() and torch.isfinite(out[0, 8:]).all()
    assert torch.isfinite(out[1]).all()
    assert torch.isfinite(scores).all()  # the input is not written
    assert ban_repeated_ngrams(generated, scores, 0) is scores


def test_the_end_is_banned_until_enough_commas_are_written():
    generated = torch.tensor([[5, 1, 6, 6], [5, 1, 6, 1]])  # token 1 is a comma
    out = ban_early_end(generated, torch.zeros(2, 8), eos_token_id=7, separator_ids=frozenset({1}), minimum=2)
    assert out[0, 7] == -float("inf") and torch.isfinite(out[0, :7]).all() and torch.isfinite(out[1]).all()


@pytest.mark.parametrize("mode", MODES)
def test_a_rewrite_holds_at_least_min_modifiers_when_asked(tiny_optimizer, mode):
    kw = {"num_beams": 4, "candidates": 2, "seed": 2, "max_new_tokens": 60, "keep_prompt": True}
    for result in tiny_optimizer(PROMPTS, mode=mode, min_modifiers=3, no_repeat_ngram_size=2, **kw):
        for candidate in result.candidates:
            assert candidate.count(",") >= 3, candidate


def test_the_blocker_ignores_the_prompt_columns():
    blocker = ConstraintProcessor(WrittenTokenConstraint(2), prompt_length=3)
    ids = torch.tensor([[4, 9, 4, 9]])  # "4 9" is in the prompt part: the written tokens are only "9"
    assert torch.isfinite(blocker(ids, torch.zeros(1, 12))).all()


@pytest.mark.parametrize("mode", MODES)
def test_a_kept_prompt_starts_every_candidate_in_every_mode(tiny_optimizer, mode):
    kw = {"num_beams": 4, "candidates": 2, "seed": 1, "max_new_tokens": 20}
    for result, prompt in zip(tiny_optimizer(PROMPTS, mode=mode, keep_prompt=True, **kw), PROMPTS, strict=True):
        for candidate in result.candidates:
            assert candidate.startswith(prompt.rstrip(".")), candidate


def test_the_policy_writes_only_after_the_kept_prompt(tiny_optimizer):
    """The rewrite is the prompt plus what the policy wrote after " Rephrase: <prompt>", token for token."""
    kept = tiny_optimizer("a cat riding a bike", keep_prompt=True, max_new_tokens=20)[0].prompt
    query = tiny_optimizer._tokenize("a cat riding a bike Rephrase:") + tiny_optimizer._tokenize(" a cat riding a bike,")
    out = tiny_optimizer.model.generate(torch.tensor([query]), num_beams=8, max_new_tokens=20, length_penalty=-1.0,
                                        do_sample=False, pad_token_id=tiny_optimizer.eos_token_id)
    written = tiny_optimizer.tokenizer.decode(out[0, len(query):], skip_special_tokens=True).strip()
    assert kept == join_kept("a cat riding a bike", written)
    assert kept.startswith("a cat riding a bike, ")


def test_a_modifier_written_twice_is_kept_once():
    assert join_kept("a cat.", " highly detailed, 4k, Highly  detailed,, 4k") == "a cat, highly detailed, 4k"
    assert join_kept("a cat", "") == "a cat"


@pytest.mark.parametrize("search", ["beam", "diverse", "generate-beam", "sample"])
def test_no_candidate_repeats_an_ngram_of_its_own_tokens_when_repeats_are_banned(tiny_optimizer, search):
    from transformers import LogitsProcessorList

    from promptist_core.beam_search import beam_search
    from promptist_core.diverse_beam import diverse_beam_search

    model, eos = tiny_optimizer.model, tiny_optimizer.eos_token_id
    ids = torch.tensor([tiny_optimizer._tokenize("a cat riding a bike Rephrase:")])
    common = {"max_new_tokens": 40, "eos_token_id": eos, "pad_token_id": eos}
    rule = WrittenTokenConstraint(no_repeat_ngram_size=2)
    torch.manual_seed(0)
    with torch.inference_mode():
        if search == "beam":
            out = beam_search(model, ids, num_beams=4, num_return_sequences=4, constraint=rule, **common)
        elif search == "diverse":
            out = diverse_beam_search(model, ids, num_beams=4, num_beam_groups=4, diversity_penalty=1.0,
                                      num_return_sequences=4, constraint=rule, **common).sequences
        else:
            blocker = LogitsProcessorList([ConstraintProcessor(rule, ids.shape[1])])
            options = {"num_beams": 4} if search == "generate-beam" else {"do_sample": True}
            out = model.generate(ids, logits_processor=blocker, num_return_sequences=4, **options, **common)
    for row in out[:, ids.shape[1]:].tolist():
        written = row[:row.index(eos)] if eos in row else row
        assert len(written) >= 2 and not has_repeated_ngram(written, 2), written


def test_our_beam_search_and_generate_ban_the_same_ngrams(tiny_optimizer):
    """The fast loop and transformers' generate (with our logits processor) choose the same candidates."""
    kw = {"num_beams": 4, "candidates": 4, "max_new_tokens": 30, "no_repeat_ngram_size": 2}
    fast = tiny_optimizer(PROMPTS, **kw)
    tiny_optimizer.cache_implementation = "dynamic"
    try:
        slow = tiny_optimizer(PROMPTS, **kw)
    finally:
        tiny_optimizer.cache_implementation = "beam"
    assert [r.candidates for r in fast] == [r.candidates for r in slow]


def test_defaults_are_the_reference_recipe_unless_the_folder_asks(tiny_optimizer):
    assert tiny_optimizer.decoding == DecodingDefaults(False, 0, -1.0, 0, False)
    assert tiny_optimizer("a cat")[0].prompt == tiny_optimizer("a cat", keep_prompt=False, no_repeat_ngram_size=0)[0].prompt


def test_a_folders_promptist_json_sets_its_decoding_defaults(tiny_promptist_dir, tmp_path):
    import shutil

    folder = tmp_path / "kept"
    shutil.copytree(tiny_promptist_dir / "tiny-promptist", folder)
    (folder / "promptist.json").write_text(json.dumps({"decoding": {"keep_prompt": True, "no_repeat_ngram_size": 3}}))
    optimizer = load_optimizer(str(folder), device="cpu")
    assert optimizer.decoding == DecodingDefaults(True, 3)
    assert optimizer("a dragon flying over snowy mountains", max_new_tokens=20)[0].prompt.startswith(
        "a dragon flying over snowy mountains")
    (folder / "promptist.json").write_text('{"decoding": {"keep_prompt": "yes"}}')
    with pytest.raises(ValueError, match="promptist.json cannot be read"):
        read_decoding_defaults(folder)


@pytest.mark.parametrize("bad", [-1, 17, 2.5])
def test_a_bad_ngram_size_is_a_clear_error(tiny_optimizer, bad):
    with pytest.raises(ValueError, match="no_repeat_ngram_size must be between 0 and 16"):
        tiny_optimizer("a cat", no_repeat_ngram_size=bad)


def test_a_prompt_too_long_to_keep_whole_keeps_its_forced_copy(tiny_optimizer: PromptOptimizer):
    prompt = " ".join(["a red cat"] * 18)  # ~54 tokens: both copies do not fit 128 - 30
    result = tiny_optimizer(prompt, keep_prompt=True, max_new_tokens=30)[0]
    assert result.prompt.startswith(prompt)
    assert set(words(prompt)) <= set(words(result.prompt))
