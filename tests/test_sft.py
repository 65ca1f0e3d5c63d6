"""The SFT trainer learns a rule (not only runs), resumes bit-identically, and runs data parallel."""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from builders_lm import build_tiny_gpt2_base
from conftest import ROOT
from safetensors.torch import load_file

from trainer.checkpoint import list_checkpoints
from trainer.policy.sft import SFTConfig, train_sft
from trainer.progress import StopTraining

ANIMALS = ["cat", "dog", "fox", "wolf", "bear", "horse", "owl", "rabbit"]
BUILDINGS = ["castle", "tower", "church", "bridge", "temple", "house", "lighthouse", "palace"]
COLORS = ["red", "blue", "green", "white", "black", "golden"]
MODIFIERS = {"animal": "highly detailed, fur", "building": "architecture, golden hour"}


def rule_pair(color: str, subject: str) -> dict:
    """The learnable rule: the modifiers depend on the kind of subject named in the source."""
    source = f"a {color} {subject}"
    return {"source": source, "target": f"{source}, {MODIFIERS['animal' if subject in ANIMALS else 'building']}"}


def rule_split(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Every (color, subject) combination; 10 per kind held out. Every word is seen in training, the
    held-out combinations never are."""
    combos = [(c, s) for c in COLORS for s in ANIMALS + BUILDINGS]
    random.Random(seed).shuffle(combos)
    held = [c for c in combos if c[1] in ANIMALS][:10] + [c for c in combos if c[1] in BUILDINGS][:10]
    return [rule_pair(*c) for c in combos if c not in held], [rule_pair(*c) for c in held]


@pytest.fixture(scope="module")
def rule_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sft")
    train, held = rule_split()
    texts = [p["target"] for p in train + held]
    base = build_tiny_gpt2_base(root / "base", texts)
    base_no_dropout = build_tiny_gpt2_base(root / "base-no-dropout", texts, dropout=0.0)
    pairs = root / "pairs.jsonl"
    # Two of the training targets go to validation (for best/ and valid_loss); held-out ones stay unseen.
    records = [{**p, "kind": "mc", "split": "valid" if i < 2 else "train"} for i, p in enumerate(train)]
    pairs.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return {"root": root, "base": base, "base_no_dropout": base_no_dropout, "pairs": pairs, "train": train,
            "held": held}


def _config(data: dict, out: Path, **overrides) -> SFTConfig:
    settings = dict(pairs=str(data["pairs"]), base=str(data["base"]), out=str(out), max_steps=10, batch_size=8,
                    effective_batch_size=16, lr=3e-3, warmup_steps=2, save_every=3, eval_every=3, log_every=1,
                    length_buckets=2, tensorboard=False, select="last")
    settings.update(overrides)
    return SFTConfig(**settings)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _log(out: Path) -> list[dict]:
    with open(out / "train_log.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_sft_learns_the_rule_and_generalises_to_held_out_combinations(rule_data, tmp_path):
    from promptist_core.cli import main as promptist_main
    from promptist_core.optimizer import load_optimizer

    out = tmp_path / "policy"
    config = _config(rule_data, out, max_steps=250, batch_size=19, effective_batch_size=19, warmup_steps=10,
                     save_every=50, eval_every=50, length_buckets=1, select="best")
    result = train_sft(config)
    losses = [float(r["loss"]) for r in _log(out)]
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])
    assert result.best_step is not None and (out / "best").is_dir() and (out / "last").is_dir()

    optimizer = load_optimizer(str(out), device="cpu")  # the output folder, as every host loads it

    def rewrite(pairs):
        return [r.prompt for r in optimizer([p["source"] for p in pairs], num_beams=1, max_new_tokens=24)]

    train_out = rewrite(rule_data["train"])
    exact = sum(o == p["target"] for o, p in zip(train_out, rule_data["train"], strict=True))
    assert exact >= 0.9 * len(rule_data["train"]), train_out[:5]
    held_out = rewrite(rule_data["held"])
    right = sum(o.endswith(", " + p["target"].split(", ", 1)[1]) for o, p in zip(held_out, rule_data["held"], strict=True))
    assert right >= 0.8 * len(rule_data["held"]), held_out

    assert promptist_main(["optimize", "--model", str(out), "--num-beams", "1", "--max-new-tokens", "20", "--offline", "--json",
                           rule_data["held"][0]["source"]]) == 0


def test_stopped_and_crashed_runs_resume_to_bit_identical_weights(rule_data, tmp_path):
    reference = train_sft(_config(rule_data, tmp_path / "full"))
    assert reference.steps == 10

    # Stopped from the callback at step 4 (Ctrl-C, Cancel): a checkpoint is written there.
    def stop_at_4(step, total, metrics):
        if step == 4:
            raise StopTraining("test")

    stopped = tmp_path / "stopped"
    with pytest.raises(StopTraining):
        train_sft(_config(rule_data, stopped), callback=stop_at_4)
    assert [c.step for c in list_checkpoints(stopped)] == [3, 4]
    train_sft(_config(rule_data, stopped), resume=True)

    # Crashed at step 8 (no save): resumes from the step-6 checkpoint.
    def crash_at_8(step, total, metrics):
        if step == 8:
            raise RuntimeError("power cut")

    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError):
        train_sft(_config(rule_data, crashed), callback=crash_at_8)
    assert list_checkpoints(crashed)[-1].step == 6
    (crashed / "checkpoints" / ".step-0000009.tmp-1").mkdir()  # a save that died half way is ignored
    train_sft(_config(rule_data, crashed), resume=True)

    expected = _weights(tmp_path / "full" / "last")
    for out in (stopped, crashed):
        got = _weights(out / "last")
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected), out.name
        assert _log(out) == _log(tmp_path / "full")  # the same losses, step by step, and no duplicate rows


def test_checkpoints_are_safetensors_and_json_only(rule_data, tmp_path):
    train_sft(_config(rule_data, tmp_path / "run", max_steps=3))
    checkpoint = list_checkpoints(tmp_path / "run")[-1]
    suffixes = {p.suffix for p in checkpoint.folder.iterdir()}
    assert suffixes <= {".json", ".safetensors", ".txt"}, suffixes
    assert checkpoint.state["config"]["lr"] == 3e-3 and checkpoint.state["cursor"]["index"] > 0
    optimizer = load_file(str(checkpoint.folder / "optimizer.safetensors"))
    assert any(k.endswith(".exp_avg_sq") for k in optimizer)


def test_a_second_run_into_the_same_folder_needs_resume_and_the_same_data_settings(rule_data, tmp_path):
    from trainer.config import ConfigError

    train_sft(_config(rule_data, tmp_path / "run", max_steps=3))
    with pytest.raises(ConfigError, match="pass --resume"):
        train_sft(_config(rule_data, tmp_path / "run", max_steps=3))
    with pytest.raises(ConfigError, match="seed"):
        train_sft(_config(rule_data, tmp_path / "run", max_steps=6, seed=1), resume=True)


# --- the command line -----------------------------------------------------------------------------

def _sft_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", "sft", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


def test_print_config_lists_every_setting_with_its_doc_and_is_a_valid_config_file(tmp_path, capsys):
    from trainer.cli import main
    from trainer.config import build_config, fields_of, read_config_file

    assert main(["sft", "--print-config", "--lr", "1e-4"]) == 0
    text = capsys.readouterr().out
    for info in fields_of(SFTConfig):
        assert info.doc and info.doc in text
    (tmp_path / "c.toml").write_text(text)
    assert build_config(SFTConfig, ("file", read_config_file(tmp_path / "c.toml"))).lr == 1e-4


@pytest.mark.parametrize("suffix", [".toml", ".yaml", ".json"])
def test_config_files_are_read_and_flags_win(tmp_path, capsys, suffix):
    from trainer.cli import main

    body = {".toml": 'lr = 0.001\nmax-steps = 7\nselect = "last"\n', ".yaml": "lr: 0.001\nmax_steps: 7\nselect: last\n",
            ".json": '{"lr": 0.001, "max_steps": 7, "select": "last"}'}[suffix]
    (tmp_path / f"c{suffix}").write_text(body)
    assert main(["sft", "--config", str(tmp_path / f"c{suffix}"), "--max-steps", "9", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert "lr = 0.001" in text and "max_steps = 9" in text and 'select = "last"' in text


@pytest.mark.parametrize(("args", "message"), [
    (["--lerning-rate", "1"], "unrecognized arguments"),
    (["--lr", "fast"], "'lr' must be float; got 'fast'"),
    (["--select", "worst"], "'select' must be one of best, last, step"),
    (["--pairs", "x.jsonl", "--out", "o", "--batch-size", "3", "--effective-batch-size", "8"], "must be a multiple"),
])
def test_bad_flags_exit_2_with_one_line(args, message, capsys):
    from trainer.cli import main

    try:
        code = main(["sft", *args, "--print-config"] if "--out" not in args else ["sft", *args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]


def test_unknown_config_key_suggests_the_right_one(tmp_path, capsys):
    from trainer.cli import main

    (tmp_path / "d.toml").write_text("max_step = 3\n")
    assert main(["sft", "--config", str(tmp_path / "d.toml"), "--print-config"]) == 2
    assert "unknown setting 'max_step' (did you mean 'max_steps'?)" in capsys.readouterr().err


def test_cli_ctrl_c_saves_a_checkpoint_exits_130_and_resume_finishes(rule_data, tmp_path):
    out = tmp_path / "run"
    args = ["--pairs", str(rule_data["pairs"]), "--base", str(rule_data["base"]), "--out", str(out),
            "--batch-size", "8", "--effective-batch-size", "8", "--lr-schedule", "constant", "--warmup-steps", "0",
            "--save-every", "0", "--eval-every", "0", "--log-every", "1", "--no-progress", "--tensorboard", "false"]
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "sft", *args, "--max-steps", "100000"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = out / "train_log.csv"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) > 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err
    step = list_checkpoints(out)[-1].step
    assert step >= 3
    done = _sft_cli(*args, "--max-steps", str(step + 2), "--resume")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["steps"] == step + 2


def test_missing_base_model_exits_3_naming_where_it_goes(rule_data, tmp_path):
    done = _sft_cli("--pairs", str(rule_data["pairs"]), "--base", "no-such-policy", "--out", str(tmp_path / "o"),
                    "--models-dir", str(tmp_path / "models"), "--no-progress")
    assert done.returncode == 3
    assert "no-such-policy" in done.stderr and str(tmp_path / "models") in done.stderr


# --- data parallel --------------------------------------------------------------------------------

WORKER = """
import json, os, sys
import torch
torch.set_num_threads(1)
from trainer.runtime import runtime_from_env
from trainer.policy.sft import SFTConfig, train_sft
config = SFTConfig(**json.loads(sys.argv[1]))
runtime = runtime_from_env("cpu", "fp32")
result = train_sft(config, runtime=runtime)
weights = torch.cat([p.detach().flatten() for p in result.model.parameters()])
from safetensors.torch import save_file
save_file({"w": weights}, os.path.join(config.out, f"rank{runtime.rank}.safetensors"))
"""


@pytest.mark.skipif(shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
                    reason="accelerate's launcher is not installed")
def test_accelerate_launch_two_cpu_processes_leaves_identical_weights_on_both_ranks(rule_data, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    settings = dict(pairs=str(rule_data["pairs"]), base=str(rule_data["base_no_dropout"]), max_steps=4, batch_size=4,
                    effective_batch_size=16, lr=3e-3, warmup_steps=1, save_every=2, eval_every=2, length_buckets=2,
                    tensorboard=False, select="last")
    launcher = Path(sys.executable).parent / "accelerate"
    done = subprocess.run(
        [str(launcher) if launcher.exists() else "accelerate", "launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
         str(worker), json.dumps({**settings, "out": str(tmp_path / "ddp")})],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rank0 = load_file(str(tmp_path / "ddp" / "rank0.safetensors"))["w"]
    rank1 = load_file(str(tmp_path / "ddp" / "rank1.safetensors"))["w"]
    assert torch.equal(rank0, rank1)
    # The same effective batch in one process gives the same model (up to float summation order).
    single = train_sft(SFTConfig(**settings, out=str(tmp_path / "single")))
    expected = torch.cat([p.detach().flatten() for p in single.model.parameters()])
    assert torch.allclose(rank0, expected, atol=1e-5), (rank0 - expected).abs().max()
    assert [c.step for c in list_checkpoints(tmp_path / "ddp")] == [2, 4]


@pytest.mark.skipif(not (ROOT.parent / "shared" / "fixtures" / "prompts").is_dir(), reason="shared fixtures are absent")
def test_pairs_then_sft_on_the_fixture_corpus_writes_a_folder_the_optimize_cli_loads(rule_data, tmp_path, capsys):
    from promptist_core.cli import main as promptist_main
    from trainer.cli import main

    corpus = ROOT.parent / "shared" / "fixtures" / "prompts" / "diffusiondb_imagereward.txt"
    pairs, out = tmp_path / "pairs.jsonl", tmp_path / "models" / "my-policy"
    assert main(["pairs", "--corpus", str(corpus), "--limit", "300", "--out", str(pairs), "--valid-fraction", "0.1"]) == 0
    assert main(["sft", "--pairs", str(pairs), "--base", str(rule_data["base"]), "--out", str(out), "--max-steps", "3",
                 "--batch-size", "8", "--effective-batch-size", "8", "--eval-every", "3", "--no-progress",
                 "--tensorboard", "false"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["selected"] == "best" and summary["valid_loss"] is not None
    assert (out / "curves.png").is_file() and (out / "model.safetensors").is_file()
    # By name from the models folder, as the hosts' pickers do.
    assert promptist_main(["optimize", "--model", "my-policy", "--models-dir", str(out.parent), "--offline",
                           "--num-beams", "2", "--max-new-tokens", "8", "a cat"]) == 0


SFT_IN_430 = """
import json, sys
import torch
torch.set_num_threads(1)
import transformers
assert transformers.__version__.startswith("4.30"), transformers.__version__
from trainer.policy.sft import SFTConfig, train_sft
from promptist_core.optimizer import load_optimizer
result = train_sft(SFTConfig(**json.loads(sys.argv[1])))
print(json.dumps({"steps": result.steps, "rewrite": load_optimizer(sys.argv[2], device="cpu")(
    "a red cat", num_beams=1, max_new_tokens=8)[0].prompt}))
"""


def test_sft_runs_under_transformers_430_and_its_folders_load_in_430_and_current(rule_data, tmp_path,
                                                                                 transformers430_python):
    """A1111 1.10 pins transformers 4.30: training inside it must work, and every folder a trainer
    writes (here or there) must load in both."""
    from promptist_core.optimizer import load_optimizer

    settings = dict(pairs=str(rule_data["pairs"]), base=str(rule_data["base"]), max_steps=2, batch_size=8,
                    effective_batch_size=8, save_every=1, eval_every=1, tensorboard=False)
    old = tmp_path / "trained-in-430"
    done = transformers430_python.run(SFT_IN_430, json.dumps({**settings, "out": str(old)}), str(old))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["steps"] == 2
    assert load_optimizer(str(old), device="cpu")("a red cat", num_beams=1, max_new_tokens=8)[0].prompt

    new = tmp_path / "trained-here"
    train_sft(SFTConfig(**settings, out=str(new)))
    for folder in (new, new / "best", new / "last", list_checkpoints(new)[-1].folder):
        loaded = transformers430_python.run(
            "import sys\nfrom promptist_core.optimizer import load_optimizer\n"
            "print(load_optimizer(sys.argv[1], device='cpu')('a red cat', num_beams=1, max_new_tokens=8)[0].prompt)",
            str(folder))
        assert loaded.returncode == 0, (folder, loaded.stderr[-2000:])


def test_a_step_plan_is_said_and_data_smaller_than_one_step_is_warned_with_the_setting_to_change():
    from trainer.runtime import step_plan

    plan, small = step_plan(40, 8, 32, 1, what="pairs", setting="effective_batch_size", suggestion="8")
    assert plan == "each step: 32 micro-batches of 8 pairs = 256 pairs per step; 40 pairs to train on"
    assert small == ("the data (40 pairs) is smaller than one step (256): every step goes over it 6.4 times; "
                     "for data this small set effective_batch_size to 8")
    assert step_plan(500, 8, 32, 1, what="pairs", setting="x", suggestion="8")[1] is None


def test_sft_on_a_few_pairs_with_the_paper_batch_warns_at_the_start(rule_data, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="trainer.policy.sft")
    train_sft(_config(rule_data, tmp_path / "out", max_steps=1, effective_batch_size=4096, batch_size=8))
    messages = [r.getMessage() for r in caplog.records if r.name == "trainer.policy.sft"]
    assert any(m.startswith("each step: 512 micro-batches of 8 pairs") for m in messages), messages
    assert any("set effective_batch_size to 8 (batch_size x devices)" in m for m in messages), messages
