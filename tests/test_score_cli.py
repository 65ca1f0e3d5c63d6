"""`python -m promptist_core score`: images and embeddings, JSON output, exit codes for bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import FIXTURES
from PIL import Image

from promptist_core.cli import main

AESTHETIC = FIXTURES / "aesthetic"


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def tiny_args(models_dir):
    return ["--clip-model", "tiny-open-clip-hub", "--aesthetic", "tiny-head.safetensors",
            "--models-dir", str(models_dir), "--device", "cpu", "--offline"]


def test_score_prints_one_json_object_per_image(tiny_clip_models_dir, image_files, capsys):
    code = main(["score", *image_files, "--prompt", "a cat, highly detailed", "--reference-prompt", "a cat",
                 "--json", *tiny_args(tiny_clip_models_dir)])
    out = capsys.readouterr()
    assert code == 0, out.err
    rows = [json.loads(line) for line in out.out.splitlines()]
    assert [r["image"] for r in rows] == image_files
    assert all(r["prompt"] == "a cat" and r["image_prompt"] == "a cat, highly detailed" for r in rows)
    assert all(r["total"] == pytest.approx(r["aesthetic_term"] + r["relevance_term"], abs=1e-5) for r in rows)
    assert "no --baseline images" in out.err


def test_score_with_baseline_images_reports_the_delta(tiny_clip_models_dir, image_files, capsys):
    code = main(["score", *image_files[:2], "--prompt", "a cat", "--baseline", *image_files[1:], "--json",
                 *tiny_args(tiny_clip_models_dir)])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0
    # Paired by position (same seeds): image 0's baseline is baseline file 0 (= image file 1).
    assert rows[0]["aesthetic_baseline"] == pytest.approx(rows[1]["aesthetic"], abs=1e-5)
    assert rows[0]["aesthetic_term"] == pytest.approx(rows[0]["aesthetic"] - rows[1]["aesthetic"], abs=1e-5)


def test_score_table_output(tiny_clip_models_dir, image_files, capsys):
    assert main(["score", image_files[0], "--prompt", "a cat", *tiny_args(tiny_clip_models_dir)]) == 0
    out = capsys.readouterr().out
    assert "total" in out.splitlines()[0] and image_files[0] in out


def test_unreadable_image_exits_2_naming_the_file(tiny_clip_models_dir, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    assert main(["score", str(bad), "--prompt", "a cat", *tiny_args(tiny_clip_models_dir)]) == 2
    assert "cannot read image" in capsys.readouterr().err
    assert main(["score", str(tmp_path / "missing.png"), "--prompt", "a cat"]) == 2
    assert "not found" in capsys.readouterr().err


def test_missing_prompt_or_images_exit_2(image_files, capsys):
    assert main(["score", image_files[0]]) == 2
    assert "no prompt" in capsys.readouterr().err
    assert main(["score", "--prompt", "a cat"]) == 2
    assert "no images" in capsys.readouterr().err


@pytest.mark.parametrize("size", ["0", "257", "1000000000"])
def test_batch_size_is_bounded_before_any_model_loads(image_files, tmp_path, capsys, size):
    # No weights in tmp_path: loading anything would exit 3 instead.
    code = main(["score", image_files[0], "--prompt", "a cat", "--models-dir", str(tmp_path), "--offline",
                 "--device", "cpu", "--batch-size", size])
    assert code == 2
    assert capsys.readouterr().err == f"error: batch_size must be between 1 and 256; got {size}\n"


def test_missing_weights_offline_exit_3_and_say_where_to_put_them(image_files, tmp_path, capsys):
    code = main(["score", image_files[0], "--prompt", "a cat", "--models-dir", str(tmp_path), "--offline",
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 3
    assert str(tmp_path / "vit_large_patch14_clip_224.openai") in err


def test_every_missing_reward_model_is_named_at_once_offline(image_files, tmp_path, capsys):
    code = main(["score", image_files[0], "--prompt", "a cat", "--preset", "pae", "--models-dir", str(tmp_path),
                 "--offline", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 3 and err.startswith("error: 4 models this job needs are not here (downloads are disabled")
    assert "- the scoring CLIP 'ViT-L-14/openai': put open_clip_config.json" in err
    assert f"- the aesthetic head 'improved': put sac+logos+ava1-l14-linearMSE.pth in {tmp_path}" in err
    assert "- PickScore 'yuvalkirstain/PickScore_v1': put config.json" in err
    assert str(tmp_path / "CLIP-ViT-H-14-laion2B-s32B-b79K") in err  # PickScore's tokenizer, a separate repo


@pytest.mark.skipif(not AESTHETIC.is_dir(), reason="real aesthetic heads not in ../shared/fixtures")
@pytest.mark.parametrize("head", ["improved", "laion-v1"])
def test_embeddings_mode_scores_the_rating_embeddings_in_order(tmp_path, capsys, head):
    stacked = np.concatenate([np.load(AESTHETIC / "vit_l_14_embeddings" / f"rating{i}.npy") for i in range(10)])
    np.save(tmp_path / "ratings.npy", stacked)
    code = main(["score", "--embeddings", str(tmp_path / "ratings.npy"), "--aesthetic", head,
                 "--models-dir", str(AESTHETIC), "--offline", "--json"])
    assert code == 0
    scores = [json.loads(line)["aesthetic"] for line in capsys.readouterr().out.splitlines()]
    assert len(scores) == 10 and scores == sorted(scores)


def test_embeddings_of_the_wrong_size_exit_2(tiny_clip_models_dir, tmp_path, capsys):
    np.save(tmp_path / "e.npy", np.ones((2, 768), dtype=np.float32))
    code = main(["score", "--embeddings", str(tmp_path / "e.npy"), "--aesthetic", "tiny-head.safetensors",
                 "--models-dir", str(tiny_clip_models_dir)])
    assert code == 2
    assert "32-dim CLIP embeddings; got 768-dim" in capsys.readouterr().err
    np.save(tmp_path / "s.npy", np.array(["x"]))
    assert main(["score", "--embeddings", str(tmp_path / "s.npy"), "--aesthetic", "tiny-head.safetensors",
                 "--models-dir", str(tiny_clip_models_dir)]) == 2
    assert "must be floats" in capsys.readouterr().err
