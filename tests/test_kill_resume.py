"""A literal `kill -9` of `python -m trainer sft|ppo|tpo` at a random moment, then `--resume` to the end, leaves the
same weights (byte for byte), log, curves and samples as a run that was never interrupted; a checkpoint with a
file cut short on disk is named and skipped.

The kill moment is random: a step drawn after the first checkpoint exists, plus a random fraction of a step, from
a seed printed with each kill (set PROMPTIST_KILL_SEED to replay one). Reference runs are in-process, killed runs
are real subprocesses killed by SIGKILL, resumed runs go through the same `trainer.cli.main`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from builders_lm import build_tiny_gpt2_base
from conftest import ROOT
from safetensors import safe_open

from trainer.checkpoint import CheckpointError, list_checkpoints, resume_checkpoint
from trainer.cli import main

SEED = int(os.environ.get("PROMPTIST_KILL_SEED") or random.SystemRandom().randrange(1 << 30))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # the tests' own process runs on one thread
SUBJECTS = ["cat", "dog", "fox", "owl", "castle", "tower", "bridge", "temple"]
COLOURS = ["red", "blue", "green", "golden"]


def rng_for(tag: str) -> random.Random:
    return random.Random(f"{SEED}:{tag}")


def logged_step(log: Path) -> int:
    """The last step written completely to a train_log.csv (0 when none is)."""
    try:
        text = log.read_text(encoding="utf-8")
    except OSError:
        return 0
    rows = [line for line in text.split("\n")[1:-1] if line]  # the last piece may be a row being written
    return int(rows[-1].split(",", 1)[0]) if rows else 0


def run_killed(argv: list[str], run_dir: Path, *, steps: tuple[int, int], tag: str, extra_env: dict | None = None,
               after_checkpoint: bool = True) -> str:
    """Start `python -m trainer ARGV`, wait for a random logged step in `steps` (after the first checkpoint
    exists, when `after_checkpoint`), wait a random part of a step more, and SIGKILL it. Returns what happened."""
    rng = rng_for(tag)
    target, delay = rng.randint(*steps), rng.uniform(0.0, 0.04)
    err = run_dir.parent / f"{run_dir.name}.stderr"
    err.parent.mkdir(parents=True, exist_ok=True)
    with open(err, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "trainer", *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=stderr, env={**ENV, **(extra_env or {})})
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        ready = not after_checkpoint or any((run_dir / "checkpoints").glob("step-*"))
        if ready and logged_step(run_dir / "train_log.csv") >= target:
            break
        time.sleep(0.005)
    time.sleep(delay)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    what = (f"{tag}: PROMPTIST_KILL_SEED={SEED}: SIGKILL after logged step {logged_step(run_dir / 'train_log.csv')} "
            f"(drawn {target}, +{delay * 1000:.0f} ms); checkpoints then: "
            f"{[c.step for c in list_checkpoints(run_dir)]}")
    print(what)
    assert proc.returncode == -signal.SIGKILL, f"{what}: the run ended on its own first ({err.read_text()[-2000:]})"
    return what


def same_files(a: Path, b: Path, names, what: str) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{what}: {name} differs"


# --- SFT -----------------------------------------------------------------------------------------

def sft_args(data: dict, out: Path, *extra: str) -> list[str]:
    return ["sft", "--pairs", str(data["pairs"]), "--base", str(data["base"]), "--out", str(out), "--max-steps", "12",
            "--batch-size", "4", "--effective-batch-size", "8", "--lr", "3e-3", "--lr-schedule", "constant",
            "--warmup-steps", "2",
            "--save-every", "3", "--eval-every", "3", "--log-every", "1", "--length-buckets", "2", "--select", "best",
            "--tensorboard", "false", "--no-progress", *extra]


SFT_FILES = ("model.safetensors", "last/model.safetensors", "best/model.safetensors", "train_log.csv", "curves.png")


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("kill-sft")
    pairs = [{"source": f"a {c} {s}", "target": f"a {c} {s}, highly detailed, {'fur' if i < 4 else 'golden hour'}",
              "split": "valid" if (i + j) % 9 == 0 else "train"}
             for i, s in enumerate(SUBJECTS) for j, c in enumerate(COLOURS)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    base = build_tiny_gpt2_base(root / "base", [p["target"] for p in pairs])  # dropout on: the global RNG matters
    data = {"root": root, "pairs": root / "pairs.jsonl", "base": base}
    assert main(sft_args(data, root / "reference")) == 0
    data["reference"] = root / "reference"
    return data


def test_sft_killed_after_a_checkpoint_resumes_to_the_same_bytes(sft_data, tmp_path):
    out = tmp_path / "killed"
    run_killed(sft_args(sft_data, out), out, steps=(3, 7), tag="sft")
    assert main(sft_args(sft_data, out, "--resume")) == 0
    same_files(sft_data["reference"], out, SFT_FILES, "sft")


def test_sft_killed_before_its_first_checkpoint_starts_over_on_resume(sft_data, tmp_path):
    out = tmp_path / "killed"
    run_killed(sft_args(sft_data, out, "--save-every", "0"), out, steps=(1, 7), tag="sft-early",
               after_checkpoint=False)
    assert list_checkpoints(out) == [] and (out / "train_log.csv").is_file()
    assert resume_checkpoint(out) is None
    assert main(sft_args(sft_data, out, "--save-every", "0", "--resume")) == 0
    same_files(sft_data["reference"], out, SFT_FILES, "sft, killed before a checkpoint")


def cut_short(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_checkpoint_cut_short_on_disk_is_named_and_the_previous_one_resumed(sft_data, tmp_path, caplog):
    """The newest checkpoint's model.safetensors is half its size (a full disk, a copy cut short): resume warns
    in one line naming the file and continues the checkpoint before it, to the same bytes. With every checkpoint
    broken, resume refuses in one line naming the file."""
    out = tmp_path / "run"
    assert main(sft_args(sft_data, out, "--max-steps", "9")) == 0  # checkpoints 6 and 9 (keep 2)
    newest = list_checkpoints(out)[-1].folder
    assert newest.name == "step-0000009"
    cut_short(newest / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        assert main(sft_args(sft_data, out, "--resume")) == 0
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and r.name == "trainer.checkpoint"]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert "step-0000009: model.safetensors is truncated" in warnings[0]
    assert "resuming from the previous complete checkpoint, step-0000006" in warnings[0]
    same_files(sft_data["reference"], out, SFT_FILES, "sft resumed past a cut-short checkpoint")

    for checkpoint in list_checkpoints(out):
        cut_short(checkpoint.folder / "optimizer.safetensors")
    with pytest.raises(CheckpointError, match=r"no complete checkpoint to resume: checkpoint .*step-0000012: "
                                              r"optimizer\.safetensors is truncated"):
        resume_checkpoint(out)


def test_every_trainer_refuses_a_run_whose_checkpoints_are_all_broken_in_one_line(sft_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(sft_args(sft_data, out, "--max-steps", "3")) == 0
    (list_checkpoints(out)[-1].folder / "rng.safetensors").write_bytes(b"\x08")
    assert main(sft_args(sft_data, out, "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no complete checkpoint to resume") and "rng.safetensors" in err[-1], err


# --- PPO, with and without the DF-Prompt heads -----------------------------------------------------

REWARDS = '''
def modifiers(plains, rewrites):
    return [min(r.count(","), 4) / 4.0 for r in rewrites]


def dfprompt(plains, rewrites):
    return [(r.count("(") + r.count("[")) / 4.0 + 0.1 * min(r.count(","), 4) for r in rewrites]
'''


@pytest.fixture(scope="module")
def rewards_module(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("kill-rewards")
    (folder / "kill_rewards.py").write_text(REWARDS, encoding="utf-8")
    return folder


def ppo_args(policy: Path, prompts: Path, out: Path, reward: str, *extra: str) -> list[str]:
    return ["ppo", "--prompts", str(prompts), "--policy", str(policy), "--out", str(out), "--text-reward",
            f"kill_rewards:{reward}", "--iterations", "8", "--batch-size", "4", "--minibatch-size", "2",
            "--ppo-epochs", "2", "--num-beam-groups", "4", "--min-new-tokens", "6", "--max-new-tokens", "14",
            "--lr", "1e-3", "--trainable-top-blocks", "1", "--save-every", "2", "--sample-every", "1",
            "--tensorboard", "false", "--no-progress", *extra]


PPO_FILES = ("model.safetensors", "train_log.csv", "curves.png", "samples.jsonl")


@pytest.mark.parametrize("dfprompt", [False, True], ids=["policy", "dfprompt-heads"])
def test_ppo_killed_at_random_resumes_to_the_same_bytes(dfprompt, tiny_promptist_dir, tiny_dfprompt_dir,
                                                       rewards_module, tmp_path, monkeypatch):
    from promptist_core.dfprompt_policy import HEADS_FILE

    policy = tiny_dfprompt_dir / "tiny-dfprompt" if dfprompt else tiny_promptist_dir / "tiny-promptist"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"a {c} {s}" for s in SUBJECTS for c in COLOURS[:2]) + "\n", encoding="utf-8")
    extra = ("--dfprompt", "true", "--head-lr", "5e-3") if dfprompt else ()
    reward = "dfprompt" if dfprompt else "modifiers"
    monkeypatch.syspath_prepend(str(rewards_module))
    assert main(ppo_args(policy, prompts, tmp_path / "reference", reward, *extra)) == 0

    out = tmp_path / "killed"
    tag = "ppo-dfprompt" if dfprompt else "ppo"
    run_killed(ppo_args(policy, prompts, out, reward, *extra), out, steps=(2, 5), tag=tag,
               extra_env={"PYTHONPATH": os.pathsep.join([str(rewards_module), str(ROOT)])})
    assert main(ppo_args(policy, prompts, out, reward, *extra, "--resume")) == 0
    names = PPO_FILES + ((HEADS_FILE,) if dfprompt else ())
    same_files(tmp_path / "reference", out, names, tag)
    value = [list_checkpoints(d)[-1].folder / "value.safetensors" for d in (tmp_path / "reference", out)]
    assert value[0].read_bytes() == value[1].read_bytes(), f"{tag}: the value model differs"


# --- TPO -------------------------------------------------------------------------------------------

def write_image_data(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    lines = []
    for i, (colour, rgb) in enumerate((("red", (220, 30, 30)), ("blue", (30, 30, 220))) * 3):
        Image.new("RGB", (72, 64), rgb).save(folder / f"{i}.png")
        other = "blue" if colour == "red" else "red"
        lines.append({"id": f"img{i}", "image": f"{i}.png", "caption": f"a {colour} square",
                      "negatives": [{"text": f"a {other} square", "type": "attribute"}],
                      "split": "valid" if i == 5 else "train"})
    (folder / "tpo_pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder


def tpo_args(data: Path, sd: Path, run: Path, *extra: str) -> list[str]:
    return ["tpo", "--data", str(data), "--sd", str(sd), "--out", str(run / "tiny_tpo.safetensors"), "--run-dir",
            str(run / "run"), "--resolution", "64", "--batch-size", "2", "--grad-accum", "2", "--max-steps", "7",
            "--warmup-steps", "2", "--lr", "1e-3", "--rank", "2", "--save-every", "2", "--eval-every", "3",
            "--log-every", "1", "--device", "cpu", "--tensorboard", "false", "--no-progress", *extra]


def lora_contents(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = dict(f.metadata())
    config = json.loads(metadata.pop("promptist_config"))
    return tensors, {**metadata, "promptist_config": {k: v for k, v in config.items() if k not in ("out", "run_dir")}}


def test_tpo_killed_at_random_resumes_to_the_same_lora_and_log(tiny_sd_dir, tmp_path):
    data = write_image_data(tmp_path / "data")
    assert main(tpo_args(data, tiny_sd_dir, tmp_path / "reference")) == 0
    killed = tmp_path / "killed"
    run_killed(tpo_args(data, tiny_sd_dir, killed), killed / "run", steps=(2, 4), tag="tpo")
    assert main(tpo_args(data, tiny_sd_dir, killed, "--resume")) == 0
    same_files(tmp_path / "reference" / "run", killed / "run", ("train_log.csv", "curves.png"), "tpo")
    (a, meta_a), (b, meta_b) = (lora_contents(run / "tiny_tpo.safetensors") for run in (tmp_path / "reference", killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "tpo: the LoRA differs"
    assert meta_a == meta_b
