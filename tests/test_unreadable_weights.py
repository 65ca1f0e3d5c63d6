"""A weights file that is there but broken (truncated, or a pickle we refuse) is one clear error naming it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from promptist_core.weights import UnreadableWeightsError, WeightsNotFoundError


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


class _Payload:
    """An object a malicious pickle would carry: unpickling it creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def save_pickle_with_an_object(path: Path, state: dict, marker: Path) -> Path:
    import torch

    torch.save({**state, "payload": _Payload(marker)}, str(path))
    return path


@pytest.fixture
def broken_policies(tiny_promptist_dir, tmp_path):
    """Copies of the tiny policy: `truncated/` (half a model.safetensors) and `pickled/` (a
    pytorch_model.bin that holds an object besides the tensors)."""
    from safetensors.torch import load_file

    source = tiny_promptist_dir / "tiny-promptist"
    truncated = shutil.copytree(source, tmp_path / "truncated")
    truncate(truncated / "model.safetensors")
    pickled = shutil.copytree(source, tmp_path / "pickled")
    state = load_file(str(pickled / "model.safetensors"))
    (pickled / "model.safetensors").unlink()
    save_pickle_with_an_object(pickled / "pytorch_model.bin", state, tmp_path / "UNPICKLED")
    return truncated, pickled


def run_optimize(model: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PROMPTIST_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "promptist_core", "optimize", "a cat", "--model", str(model),
                           "--device", "cpu"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def stderr_lines(done: subprocess.CompletedProcess) -> list[str]:
    # transformers may draw a "Loading weights" progress bar before the file turns out to be broken.
    return [line for line in done.stderr.splitlines() if line.strip() and "Loading weights" not in line]


def test_a_truncated_safetensors_policy_is_one_line_naming_the_file_exit_3(broken_policies):
    truncated, _ = broken_policies
    done = run_optimize(truncated)
    assert done.returncode == 3, done.stderr
    assert stderr_lines(done) == [
        f"error: cannot load {truncated / 'model.safetensors'}: it is not a complete safetensors file "
        "(Error while deserializing header: incomplete metadata, file not fully covered); it is probably "
        "truncated: download it again"]


def test_a_pickle_with_objects_is_refused_unopened_in_one_line_exit_3(broken_policies, tmp_path):
    _, pickled = broken_policies
    done = run_optimize(pickled)
    assert done.returncode == 3, done.stderr
    [line] = stderr_lines(done)
    assert line.startswith(f"error: cannot load {pickled / 'pytorch_model.bin'}: it is a pickle holding more "
                           "than tensors, and promptist never unpickles objects")
    assert "use the model's .safetensors file instead" in line
    assert not (tmp_path / "UNPICKLED").exists()  # the payload never ran


def test_the_core_raises_a_weights_error_that_hosts_already_report(broken_policies):
    from promptist_core.optimizer import load_optimizer

    truncated, pickled = broken_policies
    for folder, name in ((truncated, "model.safetensors"), (pickled, "pytorch_model.bin")):
        with pytest.raises(UnreadableWeightsError) as e:
            load_optimizer(str(folder), device="cpu")
        assert isinstance(e.value, WeightsNotFoundError)  # hosts and the CLI report these already
        assert e.value.path == folder / name
        assert len(str(e.value).splitlines()) == 1


def test_truncated_reward_model_files_name_the_file(tiny_clip_models_dir, tmp_path):
    from promptist_core.aesthetic import load_aesthetic_head
    from promptist_core.clip_models import load_clip

    head = truncate(Path(shutil.copy(tiny_clip_models_dir / "tiny-head.safetensors", tmp_path / "head.safetensors")))
    with pytest.raises(UnreadableWeightsError, match=f"cannot load {head}: it is not a complete safetensors"):
        load_aesthetic_head(str(head))
    hub = shutil.copytree(tiny_clip_models_dir / "tiny-open-clip-hub", tmp_path / "open-clip-hub")
    truncate(hub / "open_clip_model.safetensors")
    with pytest.raises(UnreadableWeightsError) as e:
        load_clip(str(hub), device="cpu")
    assert e.value.path == hub / "open_clip_model.safetensors"
    hf = shutil.copytree(tiny_clip_models_dir / "tiny-hf-clip", tmp_path / "hf-clip")
    truncate(hf / "model.safetensors")
    with pytest.raises(UnreadableWeightsError) as e:
        load_clip(str(hf), device="cpu")
    assert e.value.path == hf / "model.safetensors"


def test_a_pickled_aesthetic_head_with_objects_is_refused(tmp_path):
    import torch

    head = save_pickle_with_an_object(tmp_path / "head.pth", {"weight": torch.zeros(1, 4), "bias": torch.zeros(1)},
                                      tmp_path / "UNPICKLED")
    from promptist_core.aesthetic import load_aesthetic_head

    with pytest.raises(UnreadableWeightsError, match=f"cannot load {head}: it is a pickle holding more"):
        load_aesthetic_head(str(head))
    assert not (tmp_path / "UNPICKLED").exists()
