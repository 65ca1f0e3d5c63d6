"""`python -m promptist_core optimize`: arguments, stdin, files, JSON, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from promptist_core.cli import EXIT_BAD_INPUT, EXIT_MISSING_WEIGHTS, main


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PROMPTIST_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "promptist_core", *args], input=stdin, capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)


def test_optimize_prints_one_rewrite_per_prompt(tiny_promptist_dir, tiny_optimizer, capsys):
    code = main(["optimize", "a cat riding a bike", "a ship", "--model", "tiny-promptist",
                 "--models-dir", str(tiny_promptist_dir), "--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert lines == [r.prompt for r in tiny_optimizer(["a cat riding a bike", "a ship"])]


def test_optimize_json_gives_prompt_and_candidates_per_input(tiny_promptist_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat riding a bike\n\na fox in the snow\n")
    code = main(["optimize", "--file", str(prompts), "--model", "tiny-promptist", "--candidates", "3",
                 "--models-dir", str(tiny_promptist_dir), "--device", "cpu", "--json"])
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0
    assert [r["prompt"] for r in records] == ["a cat riding a bike", "a fox in the snow"]
    assert all(len(r["candidates"]) == 3 and r["optimized"] == r["candidates"][0] for r in records)


def test_optimize_reads_stdin_in_a_real_process(tiny_promptist_dir):
    done = run_cli("optimize", "--model", "tiny-promptist", "--models-dir", str(tiny_promptist_dir),
                   "--device", "cpu", stdin="a cat riding a bike\na ship\n")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 2


def test_empty_prompt_exits_2_with_one_line(tiny_promptist_dir):
    done = run_cli("optimize", "   ", "--model", "tiny-promptist", "--models-dir", str(tiny_promptist_dir))
    assert done.returncode == EXIT_BAD_INPUT
    assert done.stderr.strip().splitlines() == [
        "error: the prompt is empty: type a few words to optimize, e.g. 'a cat riding a bike'"]


def test_bad_option_exits_2(tiny_promptist_dir, capsys):
    code = main(["optimize", "a cat", "--candidates", "20", "--model", "tiny-promptist",
                 "--models-dir", str(tiny_promptist_dir), "--device", "cpu"])
    assert code == EXIT_BAD_INPUT
    assert "cannot exceed num_beams" in capsys.readouterr().err


@pytest.mark.parametrize("option, value, message", [
    ("--num-beams", "1000000", "num_beams must be between 1 and 64; got 1000000"),
    ("--batch-size", "1000000000", "batch_size must be between 1 and 256; got 1000000000"),
    ("--max-new-tokens", "100000", "max_new_tokens must be between 1 and 512; got 100000"),
    ("--seed", "-1", "seed must be between 0 and 2**64-1; got -1"),
    ("--no-repeat-ngram", "17", "no_repeat_ngram_size must be between 0 and 16; got 17"),
])
def test_sizes_out_of_range_exit_2_before_the_model_is_looked_for(tmp_path, capsys, option, value, message):
    # No model in tmp_path: looking for it would exit 3 instead.
    code = main(["optimize", "a cat", "--models-dir", str(tmp_path), "--offline", option, value])
    assert code == EXIT_BAD_INPUT
    assert capsys.readouterr().err == f"error: {message}\n"


def test_max_new_tokens_beyond_the_policys_context_exits_2(tiny_promptist_dir, capsys):
    code = main(["optimize", "a cat", "--max-new-tokens", "256", "--model", "tiny-promptist",
                 "--models-dir", str(tiny_promptist_dir), "--device", "cpu"])
    assert code == EXIT_BAD_INPUT
    assert "does not fit the policy's context of 128 tokens" in capsys.readouterr().err


def test_a_named_missing_model_exits_3_and_says_where_to_put_it(tmp_path):
    """Named, it is never replaced by the bundled policy (only an unnamed default falls back)."""
    done = run_cli("optimize", "a cat", "--model", "microsoft/Promptist", "--models-dir", str(tmp_path / "models"))
    assert done.returncode == EXIT_MISSING_WEIGHTS
    assert "model 'microsoft/Promptist' was not found" in done.stderr
    assert "Put the model files (config.json, model.safetensors or pytorch_model.bin" in done.stderr
    assert str(tmp_path / "models" / "Promptist") in done.stderr
