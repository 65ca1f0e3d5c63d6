"""The policy that ships with promptist: the files are the recipe's, it is found offline, and its rewrites
of prompts it never saw read like engineered prompts (judged as a user reads them)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from promptist_core.optimizer import load_optimizer
from promptist_core.rewrite_quality import corpus_vocabulary, judge
from promptist_core.weights import (
    BUNDLED_POLICY,
    BUNDLED_POLICY_DIR,
    DEFAULT_OPTIMIZER_MODEL,
    OFFLINE_ENV_VARS,
    WeightsNotFoundError,
    choose_default_policy,
    sha256_of,
)

ROOT = Path(__file__).resolve().parents[1]
COCO = ROOT / "data" / "coco" / "captions_val2017.txt"
CORPUS = ROOT / "data" / "diffusiondb" / "prompts.txt"


@pytest.fixture(scope="module")
def bundled():
    return load_optimizer(BUNDLED_POLICY, device="cpu")


@pytest.fixture
def offline_home(tmp_path, monkeypatch):
    """No models folder, an empty Hugging Face cache, downloads off: a fresh air-gapped machine."""
    monkeypatch.setenv("PROMPTIST_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PROMPTIST_OFFLINE", "1")
    monkeypatch.setattr("promptist_core.weights.hf_cache_dirs", lambda: [tmp_path / "hf"])
    return tmp_path


def test_the_shipped_files_are_the_ones_the_recipe_recorded():
    manifest = json.loads((BUNDLED_POLICY_DIR / "manifest.json").read_text(encoding="utf-8"))
    shipped = {p.name for p in BUNDLED_POLICY_DIR.iterdir() if p.is_file() and p.name != "manifest.json"}
    assert shipped == set(manifest["files"])
    for name, digest in manifest["files"].items():
        assert sha256_of(BUNDLED_POLICY_DIR / name) == digest, f"{name} is not the file the recipe wrote"
    assert manifest["recipe"] == "recipes/bundled-policy.toml"
    assert sha256_of(ROOT / manifest["recipe"]) == manifest["recipe_sha256"], "the recipe changed: rebuild the policy"
    assert sha256_of(CORPUS) == manifest["corpus_sha256"]
    config = json.loads((BUNDLED_POLICY_DIR / "config.json").read_text(encoding="utf-8"))
    assert {k: config[k] for k in manifest["architecture"]} == manifest["architecture"]
    assert (BUNDLED_POLICY_DIR / "model.safetensors").stat().st_size <= 20 * 2**20


def test_it_is_stored_in_fp16_and_runs_in_fp32_on_cpu(bundled):
    from safetensors import safe_open

    with safe_open(str(BUNDLED_POLICY_DIR / "model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.float16"}
    assert {str(p.dtype) for p in bundled.model.parameters()} == {"torch.float32"}


def test_its_rewrites_of_held_out_captions_keep_the_prompt_and_add_real_varied_modifiers(bundled):
    """COCO captions were never trained on. Thresholds sit a little below what bench/policy_quality.py
    measured on 1,000 of them (README's table)."""
    captions = COCO.read_text(encoding="utf-8").splitlines()[1000:1300]
    rewrites = [r.prompt for r in bundled(captions, batch_size=32)]
    report = judge(captions, rewrites, corpus_vocabulary(CORPUS.read_text(encoding="utf-8").splitlines()))
    assert report.kept >= 0.97, report
    assert report.added >= 0.93 and report.mean_modifiers >= 3, report
    assert report.clean >= 0.97, report
    assert report.fits == 1.0, report
    assert report.specific >= 0.8, report
    assert report.real >= 0.98, report


def test_it_is_found_offline_when_no_model_is_named_and_says_so_in_one_line(offline_home):
    name, note = choose_default_policy()
    assert name == BUNDLED_POLICY
    assert len(note.splitlines()) == 1
    assert BUNDLED_POLICY in note and DEFAULT_OPTIMIZER_MODEL in note and "downloads are disabled" in note
    assert str(offline_home / "models" / "Promptist") in note  # where to put Promptist


def test_promptist_is_preferred_where_it_is_installed(offline_home):
    folder = offline_home / "models" / "Promptist"
    folder.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (folder / name).write_text("{}")
    assert choose_default_policy() == (DEFAULT_OPTIMIZER_MODEL, None)


def test_an_unreachable_hub_falls_back_too(offline_home, monkeypatch):
    for var in OFFLINE_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    name, note = choose_default_policy()
    assert name == BUNDLED_POLICY and "cannot be reached" in note


def test_a_model_the_user_names_is_never_replaced(offline_home):
    with pytest.raises(WeightsNotFoundError, match="my-policy"):
        load_optimizer("my-policy", device="cpu")


def test_the_cli_rewrites_a_prompt_on_a_fresh_offline_machine(offline_home):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(offline_home / "home"), "PROMPTIST_OFFLINE": "1",
           "HF_HUB_CACHE": str(offline_home / "hf"), "PROMPTIST_MODELS_DIR": str(offline_home / "models"),
           "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "promptist_core", "optimize", "a cat riding a bike"], env=env,
                          cwd=offline_home, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rewrite = done.stdout.strip()
    assert rewrite.startswith("a cat riding a bike, ") and rewrite.count(",") >= 2, rewrite
    assert f"using the bundled policy {BUNDLED_POLICY}" in done.stderr


def test_it_loads_and_tokenizes_the_same_in_transformers_4_30(bundled, transformers430_python):
    code = """
import json, sys, torch
from promptist_core.optimizer import load_optimizer
opt = load_optimizer(sys.argv[1], device="cpu")
ids = opt._tokenize("a cat riding a bike Rephrase: a cat riding a bike")
with torch.no_grad():
    logits = opt.model(torch.tensor([ids])).logits[0, -1].tolist()
print(json.dumps({"ids": ids, "logits": logits, "decoding": opt.decoding.to_dict(),
                  "out": opt("a castle on a hill")[0].prompt}))
"""
    import torch

    done = transformers430_python.run(code, BUNDLED_POLICY)
    assert done.returncode == 0, done.stderr[-3000:]
    old = json.loads(done.stdout.strip().splitlines()[-1])
    ids = bundled._tokenize("a cat riding a bike Rephrase: a cat riding a bike")
    assert old["ids"] == ids
    assert old["decoding"] == bundled.decoding.to_dict()
    with torch.no_grad():
        logits = bundled.model(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(torch.tensor(old["logits"]), logits, rtol=1e-4, atol=1e-4)
    assert old["out"].startswith("a castle on a hill, ")
