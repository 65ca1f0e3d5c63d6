"""Every decoding mode of the optimizer gives `generate`'s candidates on the transformers the hosts pin.

A1111 1.10 runs transformers 4.30 (no cache layers: `generate` and legacy cache tuples), Forge Neo pins 4.56.2
(cache layers of an older shape than 5's: the fast beam search must still fit them), and a fresh install gets
the newest. Each run below loads the same policy folder through the real loader in a subprocess with that
transformers, rewrites a few prompts in every mode (batched, so left padding is in play), and decodes what
`model.generate` returns for each prompt on its own with the same settings.

Diverse mode is our own group beam search with transformers 4.46's semantics (DESIGN.md: the target). 4.56's
`generate` still has group beam search and agrees with it candidate for candidate. 4.30's does not: it divides
a finished candidate's log-probs by the length *with* the prompt (`hyp.shape[-1] ** length_penalty`, changed in
4.35) and also ranks differently at length_penalty 0, so on 4.30 diverse mode is held to the same candidates
as on 4.56 and the newest, not to 4.30's `generate`. transformers 5 serves group beam search only from the Hub
(`trust_remote_code`); there the outputs recorded with 4.46 (test_diverse_beam.py) and the 4.56 run stand in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a cat", "a fox in the snow", "portrait of an old man with a hat, oil painting"]
SETTINGS = {
    "beam": {"mode": "beam", "num_beams": 8, "candidates": 3, "length_penalty": -1.0},
    "diverse": {"mode": "diverse", "num_beams": 4, "candidates": 4, "length_penalty": -1.0},
    "sample": {"mode": "sample", "num_beams": 1, "candidates": 2, "length_penalty": 1.0, "seed": 7},
}
MAX_NEW_TOKENS = 30

# argv: policy folder, prompts (JSON), settings (JSON). Prints one JSON object.
EVERY_MODE_AND_GENERATE = """
import json, sys, torch, transformers
torch.set_num_threads(1)
from promptist_core.beam_search import fast_beam_search_supported
from promptist_core.optimizer import REPHRASE_SUFFIX, load_optimizer
folder, prompts, settings, max_new = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
opt = load_optimizer(folder, device="cpu")

def by_generate(s):
    rows = []
    for prompt in prompts:
        ids = torch.tensor([opt._tokenize(prompt + REPHRASE_SUFFIX)])
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=max_new, eos_token_id=opt.eos_token_id,
                  pad_token_id=opt.eos_token_id, num_return_sequences=s["candidates"])
        if s["mode"] == "sample":
            torch.manual_seed(s["seed"])
            kw.update(do_sample=True, num_beams=1, temperature=1.0, top_k=50, top_p=1.0)
        else:
            kw.update(do_sample=False, num_beams=s["num_beams"], length_penalty=s["length_penalty"])
        if s["mode"] == "diverse":
            kw.update(num_beam_groups=s["num_beams"], diversity_penalty=1.0)
        try:
            with torch.inference_mode():
                out = opt.model.generate(ids, **kw)
        except ValueError as e:
            if "trust_remote_code" in str(e):  # transformers 5: group beam search lives on the Hub
                return None
            raise
        texts = opt.tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        rows.append([t.strip() or prompt for t in texts])  # the optimizer never returns an empty rewrite
    return rows

result = {"version": transformers.__version__, "fast_beam": fast_beam_search_supported(opt.model), "modes": {}}
for name, s in settings.items():
    extra = {"seed": s["seed"]} if s["mode"] == "sample" else {"num_beams": s["num_beams"]}
    ours = opt(prompts, mode=s["mode"], candidates=s["candidates"], max_new_tokens=max_new,
               length_penalty=s["length_penalty"], batch_size=len(prompts), **extra)
    result["modes"][name] = {"ours": [r.candidates for r in ours], "generate": by_generate(s)}
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def policy_folder(tiny_promptist_dir, tmp_path_factory) -> Path:
    """The tiny policy saved so that transformers 4.30 reads it too (save_policy_folder)."""
    from test_policy_folder import transformers5_style_policy

    from promptist_core.policy_folder import save_policy_folder

    model, tokenizer = transformers5_style_policy(tiny_promptist_dir)
    return save_policy_folder(model, tokenizer, tmp_path_factory.mktemp("versions") / "policy")


def every_mode(run, policy_folder: Path) -> dict:
    done = run(EVERY_MODE_AND_GENERATE, str(policy_folder), json.dumps(PROMPTS), json.dumps(SETTINGS),
               str(MAX_NEW_TOKENS))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def installed_python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def on_430(transformers430_python, policy_folder) -> dict:
    return every_mode(transformers430_python.run, policy_folder)


@pytest.fixture(scope="module")
def on_456(transformers456_python, policy_folder) -> dict:
    return every_mode(transformers456_python.run, policy_folder)


@pytest.fixture(scope="module")
def on_installed(policy_folder) -> dict:
    return every_mode(installed_python, policy_folder)


def assert_same_as_generate(result: dict, names: list[str]) -> None:
    for name in names:
        mode = result["modes"][name]
        assert mode["generate"] is not None, name
        assert mode["ours"] == mode["generate"], (result["version"], name)
        assert all(len(c) == SETTINGS[name]["candidates"] for c in mode["ours"])


def test_every_mode_gives_generates_candidates_on_transformers_4_56(on_456):
    assert on_456["version"].startswith("4.56.")
    assert on_456["fast_beam"] is True  # its cache layers fit: the fast beam search runs there, and agrees
    assert_same_as_generate(on_456, ["beam", "diverse", "sample"])


def test_every_mode_gives_generates_candidates_on_transformers_4_30(on_430):
    assert on_430["version"].startswith("4.30.")
    assert on_430["fast_beam"] is False  # no cache layers: beam mode is generate's own search
    assert_same_as_generate(on_430, ["beam", "sample"])


def test_every_mode_gives_generates_candidates_on_the_installed_transformers(on_installed):
    assert_same_as_generate(on_installed, ["beam", "sample"])
    if on_installed["modes"]["diverse"]["generate"] is not None:  # a transformers that still ships group beams
        assert_same_as_generate(on_installed, ["diverse"])


def test_diverse_candidates_are_the_same_on_transformers_4_30_4_56_and_the_installed_one(on_430, on_456,
                                                                                         on_installed):
    ours = [result["modes"]["diverse"]["ours"] for result in (on_430, on_456, on_installed)]
    assert ours[0] == ours[1] == ours[2]
