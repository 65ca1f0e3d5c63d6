"""The beam-search KV cache: same numbers as transformers' default cache, same optimizer outputs, clean fallback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from promptist_core.beam_cache import layer_api_available, make_beam_cache

ROOT = Path(__file__).resolve().parents[1]
# Lengths differ so that batches are left-padded; repeats make several batches of the same length.
PROMPTS = ["a cat", "a fox in the snow", "portrait of an old man with a hat, oil painting, dramatic", "a ship",
           "a red horse on the grass", "a dragon flying over mountains at dawn", "a tiger", "a cozy cabin"]

needs_layer_api = pytest.mark.skipif(not layer_api_available(), reason="transformers has no cache layer API")


@pytest.fixture
def with_cache(tiny_optimizer):
    """Run the shared tiny optimizer with a given cache, then put its default back."""
    default = tiny_optimizer.cache_implementation

    def run(cache, prompts, **kwargs):
        tiny_optimizer.cache_implementation = cache
        try:
            return [r.to_dict() for r in tiny_optimizer(prompts, **kwargs)]
        finally:
            tiny_optimizer.cache_implementation = default

    return run


def test_the_beam_cache_is_the_optimizer_default(tiny_optimizer):
    assert tiny_optimizer.cache_implementation == "beam"


@needs_layer_api
@pytest.mark.parametrize(("batch_size", "candidates"), [(8, 3), (3, 4), (1, 1)])
def test_optimizer_outputs_are_identical_with_and_without_the_beam_cache(with_cache, batch_size, candidates):
    ours = with_cache("beam", PROMPTS, batch_size=batch_size, candidates=candidates, max_new_tokens=40)
    default = with_cache("dynamic", PROMPTS, batch_size=batch_size, candidates=candidates, max_new_tokens=40)
    assert ours == default
    assert all(len(r["candidates"]) == candidates for r in ours)


@needs_layer_api
def test_generate_with_the_beam_cache_returns_the_default_caches_sequences_and_scores(tiny_optimizer):
    model, tokenizer = tiny_optimizer.model, tiny_optimizer.tokenizer
    batch = tokenizer([p + " Rephrase:" for p in PROMPTS[:4]], padding=True, return_tensors="pt")
    kwargs = dict(do_sample=False, num_beams=8, num_return_sequences=3, length_penalty=-1.0, max_new_tokens=30,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
                  return_dict_in_generate=True, output_scores=True)
    cache = make_beam_cache(model, 30)
    with torch.inference_mode():
        ours = model.generate(**batch, past_key_values=cache, **kwargs)
        default = model.generate(**batch, **kwargs)
    assert torch.equal(ours.sequences, default.sequences)
    assert torch.equal(ours.sequences_scores, default.sequences_scores)
    assert all(torch.equal(a, b) for a, b in zip(ours.scores, default.scores, strict=True))
    assert cache.get_seq_length() > batch["input_ids"].shape[1]  # it was the cache generate used


@needs_layer_api
def test_layer_holds_what_the_default_layer_holds_through_updates_reorders_crops_and_growth():
    from transformers.cache_utils import DynamicLayer

    from promptist_core.beam_cache import BeamSearchLayer

    g = torch.Generator().manual_seed(0)

    def kv(rows, length):
        # Non-contiguous like a model's (transpose of [rows, length, heads, dim]).
        return (torch.randn(rows, length, 2, 4, generator=g).transpose(1, 2),
                torch.randn(rows, length, 2, 4, generator=g).transpose(1, 2))

    ours, default = BeamSearchLayer(extra_tokens=3), DynamicLayer()
    steps = [("update", kv(6, 5)), ("update", kv(6, 1)), ("reorder", torch.tensor([1, 1, 0, 5, 2, 2])),
             ("update", kv(6, 1)), ("reorder", torch.tensor([3, 0, 0, 0, 4, 1])), ("update", kv(6, 2)),
             ("update", kv(6, 1)), ("reorder", torch.tensor([5, 4, 3, 2, 1, 0])),  # past the announced room
             ("crop", -2), ("update", kv(6, 1)), ("repeat", 2), ("update", kv(12, 1)),
             ("select", torch.tensor([0, 3, 7])), ("update", kv(3, 1)), ("reorder", torch.tensor([2, 2, 0]))]
    for op, arg in steps:
        for layer in (ours, default):
            if op == "update":
                out = layer.update(*arg)
            elif op == "reorder":
                layer.reorder_cache(arg)
            elif op == "crop":
                layer.crop(arg)
            elif op == "repeat":
                layer.batch_repeat_interleave(arg)
            else:
                layer.batch_select_indices(arg)
        if op == "update":
            assert torch.equal(out[0], default.keys) and torch.equal(out[1], default.values)
        assert ours.get_seq_length() == default.get_seq_length()
        assert torch.equal(ours.keys, default.keys) and torch.equal(ours.values, default.values)
    ours.reset()
    assert ours.get_seq_length() == 0


def test_models_that_are_not_plain_full_attention_get_the_default_cache():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=16)
    assert (make_beam_cache(GPT2LMHeadModel(config), 4) is not None) == layer_api_available()
    own_cache = GPT2LMHeadModel(config)
    own_cache.generation_config.cache_implementation = "static"  # generate refuses a cache object next to it
    assert make_beam_cache(own_cache, 4) is None
    config.sliding_window = 4  # what a sliding-window decoder's config says
    assert make_beam_cache(GPT2LMHeadModel(config), 4) is None


_WITHOUT_LAYER_API = """
import json, sys
import transformers.cache_utils as cache_utils
dynamic_layer = cache_utils.DynamicLayer
del cache_utils.DynamicLayer  # what transformers 4.x looks like to beam_cache: no cache layers
from promptist_core.beam_cache import layer_api_available, make_beam_cache
cache_utils.DynamicLayer = dynamic_layer  # transformers itself keeps working
from promptist_core.optimizer import load_optimizer
optimizer = load_optimizer("tiny-promptist", models_dir=sys.argv[1], device="cpu")
results = optimizer(json.loads(sys.argv[2]), batch_size=3, candidates=3, max_new_tokens=40)
print(json.dumps({"api": layer_api_available(), "cache": make_beam_cache(optimizer.model, 40) is None,
                  "results": [r.to_dict() for r in results]}))
"""


def test_without_the_cache_layer_api_the_optimizer_falls_back_to_the_default_cache(tiny_promptist_dir, with_cache):
    env_torch_threads = "import torch; torch.set_num_threads(1)\n"
    done = subprocess.run([sys.executable, "-c", env_torch_threads + _WITHOUT_LAYER_API, str(tiny_promptist_dir),
                           json.dumps(PROMPTS)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["api"] is False and out["cache"] is True
    assert out["results"] == with_cache("dynamic", PROMPTS, batch_size=3, candidates=3, max_new_tokens=40)
