"""The open_clip path works on A1111 1.10's open_clip 2.20 (no `weights_only`, no `local-dir:`) and on current."""

from __future__ import annotations

import json

import torch

from promptist_core.clip_models import load_clip

# Loads CLIP both ways (Hub folder; weights file + architecture) and prints the embeddings, as JSON.
ENCODE = """
import json, sys, torch, open_clip
from promptist_core.clip_models import load_clip
sys.path.insert(0, sys.argv[3])
from builders_clip import register_tiny_open_clip, TINY_ARCH
from pathlib import Path
register_tiny_open_clip(Path(sys.argv[1]))
images = torch.linspace(0, 1, 2 * 32 * 32 * 3).reshape(2, 32, 32, 3)
out = {}
for kind, clip in (("hub", load_clip(sys.argv[2], device="cpu")),
                   ("file", load_clip(str(Path(sys.argv[1]) / "tiny_open_clip.safetensors"),
                                      architecture=TINY_ARCH, device="cpu"))):
    out[kind] = [clip.encode_images(images).tolist(), clip.encode_texts(["a cat", "a red horse"]).tolist()]
print(json.dumps(out))
"""


def _encodings(tiny_clip_models_dir):
    from builders_clip import TINY_ARCH

    images = torch.linspace(0, 1, 2 * 32 * 32 * 3).reshape(2, 32, 32, 3)
    out = {}
    for kind, clip in (("hub", load_clip(str(tiny_clip_models_dir / "tiny-open-clip-hub"), device="cpu")),
                       ("file", load_clip(str(tiny_clip_models_dir / "tiny_open_clip.safetensors"),
                                          architecture=TINY_ARCH, device="cpu"))):
        out[kind] = [clip.encode_images(images), clip.encode_texts(["a cat", "a red horse"])]
    return out


def test_open_clip_2_20_loads_the_same_model_as_current_open_clip(tiny_clip_models_dir, open_clip220_python):
    from conftest import ROOT

    done = open_clip220_python.run(ENCODE, str(tiny_clip_models_dir), str(tiny_clip_models_dir / "tiny-open-clip-hub"),
                                   str(ROOT / "tests"))
    assert done.returncode == 0, done.stderr[-3000:]
    old = json.loads(done.stdout.strip().splitlines()[-1])
    now = _encodings(tiny_clip_models_dir)
    for kind in ("hub", "file"):
        torch.testing.assert_close(torch.tensor(old[kind][0]), now[kind][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.tensor(old[kind][1]), now[kind][1], rtol=1e-4, atol=1e-5)


def test_open_clip_weights_are_never_unpickled_beyond_tensors(tiny_clip_models_dir, tmp_path):
    """A .bin checkpoint is read with weights_only=True by us, whatever open_clip's own loader would do."""
    import pickle

    import pytest
    from builders_clip import TINY_ARCH
    from safetensors.torch import load_file

    state = load_file(str(tiny_clip_models_dir / "tiny_open_clip.safetensors"))
    good = tmp_path / "tiny.bin"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, good)
    assert load_clip(str(good), architecture=TINY_ARCH, device="cpu") is not None

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled",))

    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps({"state_dict": Evil()}))
    from promptist_core.weights import UnreadableWeightsError

    with pytest.raises(UnreadableWeightsError, match="never unpickles"):
        load_clip(str(evil), architecture=TINY_ARCH, device="cpu")
