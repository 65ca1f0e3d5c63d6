"""contents_fingerprint: what the model caches key on, so that a retrained folder is loaded again."""

from __future__ import annotations

import os

from promptist_core.fingerprint import contents_fingerprint


def model_folder(tmp_path):
    folder = tmp_path / "policy"
    (folder / "checkpoints" / "step-0000001").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights-1")
    return folder


def test_an_unchanged_folder_keeps_its_fingerprint(tmp_path):
    folder = model_folder(tmp_path)
    assert contents_fingerprint(folder) == contents_fingerprint(folder)


def test_rewritten_replaced_added_and_removed_files_change_the_fingerprint(tmp_path):
    folder = model_folder(tmp_path)
    seen = {contents_fingerprint(folder)}
    weights = folder / "model.safetensors"
    st = weights.stat()
    weights.write_bytes(b"weights-2")  # same size, rewritten in place: only the mtime tells
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    seen.add(contents_fingerprint(folder))
    (folder / "new.safetensors").write_bytes(b"x")
    os.replace(folder / "new.safetensors", weights)  # replaced by a new file (a new inode)
    seen.add(contents_fingerprint(folder))
    (folder / "dfprompt_heads.safetensors").write_bytes(b"heads")
    seen.add(contents_fingerprint(folder))
    (folder / "dfprompt_heads.safetensors").unlink()
    weights.unlink()
    seen.add(contents_fingerprint(folder))
    assert len(seen) == 5


def test_a_training_runs_checkpoints_below_the_folder_do_not_change_it(tmp_path):
    folder = model_folder(tmp_path)
    before = contents_fingerprint(folder)
    (folder / "checkpoints" / "step-0000002").mkdir()
    (folder / "checkpoints" / "step-0000002" / "model.safetensors").write_bytes(b"later")
    assert contents_fingerprint(folder) == before


def test_a_single_weights_file_and_a_missing_path_have_fingerprints(tmp_path):
    folder = model_folder(tmp_path)
    weights = folder / "model.safetensors"
    before = contents_fingerprint(weights)
    weights.write_bytes(b"other weights")
    assert contents_fingerprint(weights) != before
    assert contents_fingerprint(tmp_path / "missing") == contents_fingerprint(tmp_path / "missing")


def test_weights_fingerprint_names_the_weights_and_labels_not_the_object():
    import torch

    from promptist_core.fingerprint import weights_fingerprint

    first, second = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    second.load_state_dict(first.state_dict())
    assert weights_fingerprint(["Linear"], first) == weights_fingerprint(["Linear"], second)
    assert weights_fingerprint(["Linear"], first) != weights_fingerprint(["Linear", "config"], first)
    with torch.no_grad():
        second.weight[0, 0] += 1e-3
    assert weights_fingerprint(["Linear"], first) != weights_fingerprint(["Linear"], second)
    assert len(weights_fingerprint(["no encoder"], None)) == 16
