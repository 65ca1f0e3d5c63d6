"""What a short run can show is said at its start: TPO's default lr 1e-5 over a few steps adds up to too little
learning rate to move the loss from ln 2, and a quick look pays for every accumulated micro-batch."""

from __future__ import annotations

import json
import logging

from trainer.cli import main
from trainer.runtime import SHORT_RUN_TOTAL_LR, short_run_notes
from trainer.tpo.train import TPOConfig
from trainer.tpo.train import short_run_notes as tpo_notes


def test_an_8_step_run_at_the_default_lr_says_the_loss_will_stay_near_ln_2():
    notes = tpo_notes(TPOConfig(out="x.safetensors", max_steps=8))
    # inside the default 100-step warmup: 1e-5 x (1 + ... + 8) / 100 = 3.6e-6 in all
    assert notes[0] == ("a 8-step run at lr 1e-05 (still in its 100-step warmup) adds up to a learning rate of "
                        "3.6e-06: expect "
                        "the loss to end near its start (ln 2 = 0.693; a tiny test model moved 0.00036 at this total) "
                        "and the implicit accuracy to say little; for a quick check raise --lr (e.g. 1e-4) or "
                        "--max-steps")
    assert notes[1] == ("each step accumulates 4 micro-batches (--grad-accum 4): for a quick look set --grad-accum 1, "
                        "about 4x faster per step")
    assert "near its start (1.0;" in tpo_notes(TPOConfig(out="x.safetensors", max_steps=8, loss="tkto"))[0]


def test_runs_long_enough_or_fast_enough_get_no_note():
    assert tpo_notes(TPOConfig(out="x.safetensors")) == []  # the defaults: 1000 steps
    assert tpo_notes(TPOConfig(out="x.safetensors", max_steps=8, lr=1e-4, warmup_steps=0, grad_accum=1)) == []
    assert short_run_notes([SHORT_RUN_TOTAL_LR], 1, lr=SHORT_RUN_TOTAL_LR, start_loss="0") == []
    assert len(short_run_notes([SHORT_RUN_TOTAL_LR * 0.99], 1, lr=SHORT_RUN_TOTAL_LR, start_loss="0")) == 1


def test_headless_tpo_says_it_at_the_start_before_the_model_loads(tmp_path, caplog, capsys):
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(data / "0.png")
    (data / "tpo_pairs.jsonl").write_text(json.dumps({
        "id": "a", "image": "0.png", "caption": "a red square", "split": "train",
        "negatives": [{"text": "a blue square", "type": "attribute"}]}) + "\n")
    with caplog.at_level(logging.WARNING):
        code = main(["tpo", "--data", str(data), "--sd", str(tmp_path / "no-model"), "--out",
                     str(tmp_path / "x.safetensors"), "--max-steps", "8", "--no-progress"])
    assert code == 3  # the model is missing: the notes came first
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    start = "a 8-step run at lr 1e-05 (still in its 100-step warmup) adds up to a learning rate of 3.6e-06"
    assert any(s.startswith(start) for s in said), said
    assert any(s.startswith("each step accumulates 4 micro-batches (--grad-accum 4)") for s in said), said
