"""trainer.training_run: the rules of a run folder that both hosts follow (their tests cover the glue)."""

from __future__ import annotations

import pytest

from trainer.training_run import (
    PROMPTS_FILE,
    LiveCurve,
    input_file,
    run_folder,
    run_prompts,
    save_name_problem,
)


def test_a_save_name_is_a_plain_folder_name_and_the_message_names_the_hosts_field():
    assert save_name_problem("my-run") is None
    assert save_name_problem("a/b", "save_name").startswith("save_name must be a plain folder name")
    assert save_name_problem(" ", "Save name").startswith("Save name is empty")


def test_run_folder_refuses_a_model_that_is_not_a_run_and_accepts_a_new_folder_or_a_run(tmp_path,
                                                                                      tiny_promptist_dir):
    assert run_folder(tmp_path, "new", label="save_name") == tmp_path / "new"
    with pytest.raises(ValueError, match="holds a model that is not a training run; choose another save name"):
        run_folder(tiny_promptist_dir, "tiny-promptist", label="Save name")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert run_folder(tmp_path, "run") == run
    with pytest.raises(ValueError, match="save_name must be a plain folder name"):
        run_folder(tmp_path, "../up", label="save_name")


def test_input_file_looks_in_the_hosts_folders_in_order(tmp_path):
    first, second = tmp_path / "input", tmp_path / "cwd"
    first.mkdir(), second.mkdir()
    (second / "pairs.jsonl").write_text("{}\n")
    assert input_file("pairs.jsonl", "data_file", search=[first, second]) == (second / "pairs.jsonl").resolve()
    assert input_file(str(second / "pairs.jsonl"), "data_file") == (second / "pairs.jsonl").resolve()
    with pytest.raises(ValueError, match=r"data_file: no such file 'nope.jsonl' \(looked at .*input.*cwd"):
        input_file("nope.jsonl", "data_file", search=[first, second])
    with pytest.raises(ValueError, match="data_file is empty"):
        input_file("  ", "data_file")


def test_typed_prompts_are_kept_with_the_run_and_other_prompts_are_refused_on_resume(tmp_path):
    run = tmp_path / "run"
    path = run_prompts("a cat\n\n  a dog  \n", "", run, resume=False)
    assert path == str(run / PROMPTS_FILE) and (run / PROMPTS_FILE).read_text() == "a cat\na dog\n"
    assert run_prompts("a cat\na dog", "", run, resume=True) == path
    with pytest.raises(ValueError, match="the prompts differ from those of the run in .* choose another save_name"):
        run_prompts("a bird", "", run, resume=True, labels=("prompts", "prompts_file", "save_name"))
    assert (run / PROMPTS_FILE).read_text() == "a cat\na dog\n"
    assert run_prompts("a bird", "", run, resume=False) == path  # a new run (no checkpoint) takes new prompts
    with pytest.raises(ValueError, match="Prompts is empty: .* or a prompts file"):
        run_prompts(" \n", "", run, resume=False, labels=("Prompts", "Prompts file", "Save name"))
    given = tmp_path / "plain.txt"
    given.write_text("a ship\n")
    assert run_prompts("", str(given), run, resume=True) == str(given.resolve())


def test_the_live_curve_starts_from_the_log_and_is_drawn_at_most_every_few_seconds(tmp_path):
    (tmp_path / "train_log.csv").write_text("step,loss,valid_loss\n1,3.0,\n2,2.5,2.7\n3,2.0,\n")
    now = [100.0]
    curve = LiveCurve(tmp_path, {"loss": ("loss", "valid_loss")}, "SFT", every_s=1.0, clock=lambda: now[0])
    assert curve.image().size[0] > 0  # before any step: the whole log
    curve.add(3, {"loss": 1.9, "lr": 1e-4, "valid_loss": float("nan")})
    assert curve.series == {"loss": [(1, 3.0), (2, 2.5), (3, 1.9)], "valid_loss": [(2, 2.7)]}
    assert curve.preview(3, 10) is not None  # the first
    now[0] += 0.5
    assert curve.preview(4, 10) is None
    assert curve.preview(10, 10) is not None  # the last step always
    now[0] += 1.0
    assert curve.preview(5, 10) is not None
