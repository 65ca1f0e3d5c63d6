"""check_resume_settings: a resume with a changed setting is refused in one sentence that says both ways out."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from trainer.checkpoint import Checkpoint, check_resume_settings
from trainer.config import ConfigError

SAVED = Checkpoint(Path("/runs/mine/checkpoints/step-0000007"),
                   {"step": 7, "config": {"batch_size": 2, "seed": 0, "lr": 1e-5}})


def test_one_changed_setting_is_named_in_the_singular_with_both_ways_out():
    with pytest.raises(ConfigError) as refused:
        check_resume_settings(SimpleNamespace(batch_size=4, seed=0, lr=1e-5), SAVED, ("batch_size", "seed"))
    assert str(refused.value) == (
        "cannot resume /runs/mine/checkpoints/step-0000007 exactly: batch_size differs from the run being resumed "
        "(it used batch_size=2). Set it back to continue this run, or choose a new save name (command line: a new "
        "--out) to start a new run with the new setting")


def test_several_changed_settings_are_named_in_the_plural():
    with pytest.raises(ConfigError, match=r"exactly: batch_size and seed differ from the run being resumed \(it used "
                                          r"batch_size=2, seed=0\)\. Set them back .* with the new settings$"):
        check_resume_settings(SimpleNamespace(batch_size=4, seed=1, lr=1e-5), SAVED, ("batch_size", "seed"))


def test_unchanged_fixed_settings_resume():
    check_resume_settings(SimpleNamespace(batch_size=2, seed=0, lr=3e-5), SAVED, ("batch_size", "seed"))
