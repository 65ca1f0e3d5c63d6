"""The optimizer's own beam search: the candidates of `generate(num_beams=...)`, with less work per step."""

from __future__ import annotations

import pytest
import torch

from promptist_core.beam_cache import layer_api_available
from promptist_core.beam_search import _assign_slots, beam_search, fast_beam_search_supported

pytestmark = pytest.mark.skipif(not layer_api_available(), reason="transformers has no cache layer API")

# Different lengths (left padding) and subjects the tiny policy ends at different steps (prompts settle apart).
PROMPTS = ["a cat", "a fox in the snow", "portrait of an old man with a hat, oil painting, dramatic", "a ship",
           "a red horse on the grass", "a dragon flying over mountains at dawn", "a tiger", "a cozy cabin"]


def _candidates(sequences: torch.Tensor, prompt_len: int, eos: int) -> list[list[int]]:
    """Generated tokens of each row up to (not including) the first EOS."""
    out = []
    for row in sequences[:, prompt_len:].tolist():
        out.append(row[: row.index(eos)] if eos in row else row)
    return out


def _run(tiny_optimizer, prompts, search, **kwargs) -> list[list[int]]:
    model, tokenizer = tiny_optimizer.model, tiny_optimizer.tokenizer
    batch = tokenizer([p + " Rephrase:" for p in prompts], padding=True, return_tensors="pt")
    eos = tokenizer.eos_token_id
    with torch.inference_mode():
        if search == "ours":
            sequences = beam_search(model, batch["input_ids"], batch["attention_mask"], eos_token_id=eos,
                                    pad_token_id=eos, **kwargs)
        else:
            sequences = model.generate(**batch, do_sample=False, eos_token_id=eos, pad_token_id=eos, **kwargs)
    return _candidates(sequences, batch["input_ids"].shape[1], eos)


def _both(tiny_optimizer, prompts, **kwargs):
    return _run(tiny_optimizer, prompts, "ours", **kwargs), _run(tiny_optimizer, prompts, "generate", **kwargs)


@pytest.mark.parametrize("length_penalty", [-1.0, 0.0, 1.0, 2.0])
def test_every_candidate_equals_generate_for_each_length_penalty(tiny_optimizer, length_penalty):
    ours, theirs = _both(tiny_optimizer, PROMPTS, num_beams=8, num_return_sequences=8, max_new_tokens=40,
                         length_penalty=length_penalty)
    assert ours == theirs


@pytest.mark.parametrize(("num_beams", "max_new_tokens"), [(2, 5), (4, 75), (8, 1)])
def test_candidates_equal_generate_for_other_beam_counts_and_lengths(tiny_optimizer, num_beams, max_new_tokens):
    ours, theirs = _both(tiny_optimizer, PROMPTS[:5], num_beams=num_beams, num_return_sequences=num_beams,
                         max_new_tokens=max_new_tokens, length_penalty=-1.0)
    assert ours == theirs


def test_settled_prompts_leave_the_batch_and_results_stay_the_same(tiny_optimizer):
    model = tiny_optimizer.model
    settings = dict(num_beams=8, num_return_sequences=3, max_new_tokens=60, length_penalty=-1.0)
    rows_per_forward = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: rows_per_forward.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        ours = _run(tiny_optimizer, PROMPTS, "ours", **settings)
    finally:
        hook.remove()
    theirs = _run(tiny_optimizer, PROMPTS, "generate", **settings)
    assert ours == theirs
    # prefill: one row per prompt, not per beam; then 8 rows per prompt still searching, fewer as prompts settle
    ours_rows = rows_per_forward
    assert ours_rows[0] == len(PROMPTS)
    assert ours_rows[1] == 8 * len(PROMPTS)
    assert min(ours_rows[1:]) < ours_rows[1]
    assert all(a >= b for a, b in zip(ours_rows[1:], ours_rows[2:], strict=False))


def test_a_parents_first_child_keeps_its_row_and_only_extra_children_are_copied():
    slots, src, dst = _assign_slots([[10, 11, 12, 13], [20, 21, 22, 23]], [[0, 0, 1, 3], [2, 2, 2, 2]])
    assert slots == [[10, 12, 11, 13], [22, 23, 21, 20]]
    assert list(zip(src, dst, strict=True)) == [(10, 12), (22, 23), (22, 21), (22, 20)]
    # every row used once per prompt; copies = beams - distinct parents
    assert all(sorted(s) == sorted(r) for s, r in zip(slots, [[10, 11, 12, 13], [20, 21, 22, 23]], strict=True))


def test_the_step_callback_sees_every_step_and_can_interrupt(tiny_optimizer):
    model, tokenizer = tiny_optimizer.model, tiny_optimizer.tokenizer
    batch = tokenizer(["a cat Rephrase:"], return_tensors="pt")
    seen = []

    def stop_at_three(step, total):
        seen.append((step, total))
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        beam_search(model, batch["input_ids"], batch["attention_mask"], num_beams=4, max_new_tokens=30,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
                    step_callback=stop_at_three)
    assert seen == [(1, 30), (2, 30), (3, 30)]


def test_a_model_whose_generation_config_adds_logits_processors_is_left_to_generate(tiny_optimizer):
    model = tiny_optimizer.model
    assert fast_beam_search_supported(model)
    old = model.generation_config.repetition_penalty
    model.generation_config.repetition_penalty = 1.3
    try:
        assert not fast_beam_search_supported(model)
        # and the optimizer still answers, through generate
        assert tiny_optimizer("a cat", max_new_tokens=10)[0].prompt
    finally:
        model.generation_config.repetition_penalty = old


def test_the_in_place_gelu_gives_transformers_gelu_new_bit_for_bit():
    from transformers.activations import NewGELUActivation

    from promptist_core.beam_search import InPlaceNewGELU

    generator = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(64, 3072, generator=generator) * scale for scale in (1e-3, 1.0, 5.0, 100.0)])
    x[0, :4] = torch.tensor([0.0, -0.0, float("inf"), float("-inf")])
    with torch.inference_mode():
        ours, theirs = InPlaceNewGELU()(x.clone()), NewGELUActivation()(x)
    assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))  # bits, so -inf's NaN compares too


def test_the_models_own_activations_are_back_after_a_search_even_an_interrupted_one(tiny_optimizer):
    model, tokenizer = tiny_optimizer.model, tiny_optimizer.tokenizer
    before = [type(block.mlp.act) for block in model.transformer.h]
    assert before[0].__name__ == "NewGELUActivation"
    batch = tokenizer(["a cat Rephrase:"], return_tensors="pt")

    def interrupt(step, total):
        assert type(model.transformer.h[0].mlp.act).__name__ == "InPlaceNewGELU"  # swapped during the search
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        beam_search(model, batch["input_ids"], batch["attention_mask"], num_beams=4, max_new_tokens=5,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id, step_callback=interrupt)
    assert [type(block.mlp.act) for block in model.transformer.h] == before
