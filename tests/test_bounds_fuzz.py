"""Every number a user types into `python -m trainer ...` is checked before any model loads: random bad values of
every numeric flag of every command end in one line naming the setting and its allowed range, with exit code 2;
never a traceback, never an error that only comes after a model was looked for.

"Before any model loads" is proved by pointing every model flag at a path that does not exist: a bound checked
late would surface as the missing-model error (exit 3) instead of the bound error. The values are drawn from a
seeded generator (printed); set PROMPTIST_FUZZ_SEED to replay a draw.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path

import pytest

from trainer.cli import build_parser, main
from trainer.config import fields_of

SEED = int(os.environ.get("PROMPTIST_FUZZ_SEED") or random.SystemRandom().randrange(1 << 30))
BAD_EVERYWHERE = ("nan", "inf", "-inf", "abc", "1e12", "-1e12", "123456789012345678901234567890", "")
# Flags where 0 or a negative number is a real setting (a seed, "0 = off", a clip floor), so only the values
# above are bad for them; every other numeric flag needs a positive value.
ZERO_OK = {"seed", "warmup_steps", "weight_decay", "grad_clip", "eval_every", "save_every", "select_step",
           "minibatch_size", "trainable_top_blocks", "beta", "top_k", "no_repeat_ngram_size", "sample_every",
           "valid_every", "beta_weight", "beta_range", "head_entropy", "timestep_min", "timestep_max",
           "max_valid_pairs", "diversity_penalty", "vf_coef", "gamma", "lam", "guidance", "valid_fraction",
           "min_words", "adam_beta1", "adam_beta2"}
NEGATIVE_OK = {"cosine_floor", "negative_clip"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """Real input files (so the data checks pass) and model paths that do not exist."""
    from PIL import Image

    root = tmp_path_factory.mktemp("fuzz")
    (root / "prompts.txt").write_text("".join(f"a cat number {i}, highly detailed\n" for i in range(16)))
    (root / "pairs.jsonl").write_text("".join(json.dumps({"source": f"a cat {i}", "target": f"a cat {i}, detailed"})
                                              + "\n" for i in range(16)))
    data = root / "tpo-data"
    data.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(data / "0.png")
    (data / "tpo_pairs.jsonl").write_text(json.dumps({"id": "a", "image": "0.png", "caption": "a red square",
                                                      "negatives": [{"text": "a blue square", "type": "attribute"}],
                                                      "split": "train"}) + "\n")
    (root / "lora.safetensors").write_bytes(b"")
    return {"root": root, "missing": str(root / "no-such-model")}


def base_args(command: str, inputs: dict, out: Path) -> list[str]:
    root, missing = inputs["root"], inputs["missing"]
    return {
        "pairs": ["pairs", "--corpus", str(root / "prompts.txt"), "--out", str(out / "pairs.jsonl")],
        "sft": ["sft", "--pairs", str(root / "pairs.jsonl"), "--base", missing, "--out", str(out / "sft"),
                "--no-progress"],
        "ppo": ["ppo", "--prompts", str(root / "prompts.txt"), "--policy", missing, "--sd", missing, "--clip-model",
                missing, "--out", str(out / "ppo"), "--no-progress"],
        "tpo": ["tpo", "--data", str(root / "tpo-data"), "--sd", missing, "--out", str(out / "tpo.safetensors"),
                "--no-progress"],
        "tpo-data": ["tpo-data", "--prompts", str(root / "prompts.txt"), "--sd", missing, "--out", str(out / "data")],
        "tpo-eval": ["tpo-eval", "--sd", missing, "--lora", str(root / "lora.safetensors"), "--prompts",
                     str(root / "prompts.txt"), "--clip-model", missing, "--pick-model", "none"],
        "evaluate": ["evaluate", "--sd", missing, "--prompts", str(root / "prompts.txt"), "--clip-model", missing,
                     "--out", str(out / "eval")],
    }[command]


def numeric_flags(command: str) -> list[tuple[str, bool]]:
    """(name, may be empty) of the command's flags that take a number (the config fields of a trainer; typed
    flags of the others)."""
    if command in ("sft", "ppo", "tpo"):
        from trainer.policy.ppo import PPOConfig
        from trainer.policy.sft import SFTConfig
        from trainer.tpo.train import TPOConfig

        cls = {"sft": SFTConfig, "ppo": PPOConfig, "tpo": TPOConfig}[command]
        return [(f.name, f.optional) for f in fields_of(cls) if f.type in (int, float)]
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    names = [a.dest for a in sub._actions if getattr(a.type, "__name__", "") in ("int", "float")]
    return [(n, False) for n in names + (["size"] if command in ("tpo-eval", "evaluate") else [])]


def bad_values(name: str, optional: bool, rng: random.Random) -> list[str]:
    pool = [v for v in BAD_EVERYWHERE if v or not optional]  # empty is "none" for an optional setting
    if name not in NEGATIVE_OK:
        pool += ["-1", "-7"]
    if name not in ZERO_OK | NEGATIVE_OK:
        pool += ["0"]
    if name == "size":
        pool += ["0", "-64", "7x7", "513", "100000x512", "4"]
    return rng.sample(pool, 3)


def outcome(argv: list[str], name: str, capsys) -> tuple[str, str]:
    """'early' (exit 2, one line naming the setting), 'several lines' (the same, with argparse's usage), 'late'
    (any other exit: a missing model, a run that went on), or 'traceback' (an exception escaped main)."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    except Exception as e:  # noqa: BLE001 - the point is to count them
        capsys.readouterr()
        return "traceback", f"{type(e).__name__}: {e}"
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    named = err and (f"'{name}'" in err[-1] or f"--{name.replace('_', '-')}" in err[-1])
    if code == 2 and named:
        return ("early" if len(err) == 1 else "several lines"), err[-1]
    return "late", f"exit {code}: {err[-3:]}"


COMMANDS = ("pairs", "sft", "ppo", "tpo", "tpo-data", "tpo-eval", "evaluate")


def test_random_bad_numbers_in_every_command_end_in_one_line_before_any_model_loads(inputs, tmp_path, capsys):
    rng = random.Random(SEED)
    counts = {c: {"runs": 0, "early": 0, "several lines": 0, "late": 0, "traceback": 0} for c in COMMANDS}
    failures = []
    for command in COMMANDS:
        for name, optional in numeric_flags(command):
            for value in bad_values(name, optional, rng):
                out = tmp_path / f"{command}-{name}-{counts[command]['runs']}"
                argv = base_args(command, inputs, out) + [f"--{name.replace('_', '-')}={value}"]
                kind, said = outcome(argv, name, capsys)
                counts[command]["runs"] += 1
                counts[command][kind] += 1
                if kind != "early":
                    failures.append(f"{kind}: {command} --{name}={value!r}: {said}")
    total = {k: sum(c[k] for c in counts.values()) for k in ("runs", "early", "several lines", "late", "traceback")}
    print(f"PROMPTIST_FUZZ_SEED={SEED}: {json.dumps(total)}; by command: {json.dumps(counts)}")
    assert not failures, f"PROMPTIST_FUZZ_SEED={SEED}: {total}\n" + "\n".join(failures)


def test_the_same_bounds_hold_for_a_config_file(inputs, tmp_path, capsys):
    """A --config file is the same config type: its numbers get the same checks, named with the file."""
    config = tmp_path / "run.toml"
    config.write_text("lr = nan\n")
    assert main([*base_args("sft", inputs, tmp_path), "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {config}: 'lr' must be a finite number more than 0 and at most 1; got nan"]
    config.write_text("max_steps = 0\n")
    assert main([*base_args("tpo", inputs, tmp_path), "--config", str(config)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {config}: 'max_steps' must be between 1 and 1e+07; got 0"


def test_a_host_building_the_config_itself_gets_the_same_checks(tmp_path):
    from trainer.config import ConfigError
    from trainer.policy.ppo import PPOConfig, check_config
    from trainer.tpo.train import TPOConfig
    from trainer.tpo.train import check_config as check_tpo

    good = PPOConfig(prompts="p.txt", policy="x", out=str(tmp_path / "o"))
    with pytest.raises(ConfigError, match=r"^'head_lr' must be a finite number more than 0 and at most 1; got inf$"):
        check_config(dataclasses.replace(good, head_lr=float("inf")), None)
    with pytest.raises(ConfigError, match=r"^'width' must be a multiple of 8 between 8 and 8192; got 100$"):
        check_config(dataclasses.replace(good, width=100), None)
    with pytest.raises(ConfigError, match=r"^'lr' must be more than 0 and at most 1; got 0$"):
        check_tpo(TPOConfig(out=str(tmp_path / "x.safetensors"), lr=0.0))


def test_generator_batch_sizes_are_checked_before_the_pipeline_loads(tmp_path):
    from promptist_core.generators import DiffusersGenerator, load_diffusers_generator

    for bad in (0, -1, 10**9, 2.5, True):
        with pytest.raises(ValueError, match=r"^batch_size must be an integer between 1 and 256"):
            load_diffusers_generator(str(tmp_path / "no-such-model"), batch_size=bad)
        with pytest.raises(ValueError, match=r"^batch_size must be an integer between 1 and 256"):
            DiffusersGenerator(object(), batch_size=bad)


def test_a_pairs_file_with_no_usable_line_is_one_line_before_the_model(tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n\n   \n")
    assert main(["sft", "--pairs", str(pairs), "--base", str(tmp_path / "missing"), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pairs.jsonl" in err[0] and "holds no pairs" in err[0], err


def test_one_prompt_for_a_batch_of_8_is_refused_naming_both_ways_out_before_the_model(tmp_path, capsys):
    """PPO's rollout batches must be full (every prompt of a batch is rolled out together), so a prompt file
    smaller than one batch is an error, not a silently smaller batch."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    assert main(["ppo", "--prompts", str(prompts), "--policy", str(tmp_path / "missing"), "--sd",
                 str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--batch-size", "8", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {prompts}: 1 prompt is fewer than one batch (batch_size 8 x 1 device; a rollout batch is "
                   "used whole): give at least 8 prompts, or set batch_size to 1"], err


GOOD = {"pairs": ["--valid-fraction=0.5", "--min-words=0", "--seed=4294967295"],
        "sft": ["--lr=1e-4", "--valid-fraction=0.5", "--max-length=64", "--seed=7"],
        "ppo": ["--lr=1e-4", "--cosine-floor=-0.5", "--width=768", "--guidance=0", "--head-lr=1e-3"],
        "tpo": ["--lr=1e-4", "--negative-clip=-0.01", "--resolution=64", "--beta="],
        "tpo-data": ["--valid-fraction=0.5", "--guidance=7.5", "--width=768", "--batch-size=1"],
        "tpo-eval": ["--size=768x512", "--n=3", "--guidance=0"],
        "evaluate": ["--size=64", "--batch-size=8", "--seeds=1"]}


@pytest.mark.parametrize("command", COMMANDS)
def test_good_numbers_pass_the_bounds_and_reach_the_missing_model(command, inputs, tmp_path, capsys):
    """The fuzz's premise: with good numbers each command goes on to look for its (missing) model, exit 3; pairs,
    which has no model, finishes."""
    code = main(base_args(command, inputs, tmp_path) + GOOD[command])
    err = capsys.readouterr().err
    assert code == (0 if command == "pairs" else 3), err
