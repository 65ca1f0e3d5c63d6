"""What the extension runs inside Forge Neo works on Forge Neo's pins (transformers 4.56.2, tokenizers 0.22.2,
huggingface_hub 0.36.2, safetensors 0.7.0, diffusers 0.37.1), not only on the newest versions the tests run on.

Inside Neo the extension uses transformers (optimizer, SFT/PPO policy, transformers CLIP/PickScore scoring) and
open_clip (which Neo lacks: install.py adds the newest, which is this environment's); diffusers only on the
headless paths (the DF-Prompt renderer, image generators, TPO), never in the webui. Each run here is a
subprocess over the `transformers456_python` overlay (Neo's stack); the optimizer's every-mode check on 4.56 is
in test_decoding_versions.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from test_sft import rule_data  # noqa: F401  (the tiny GPT-2 base and pairs SFT learns from)

ROOT = Path(__file__).resolve().parents[1]

NEO_VERSIONS = """
import diffusers, huggingface_hub, safetensors, tokenizers, transformers
assert transformers.__version__ == "4.56.2", transformers.__version__
assert diffusers.__version__ == "0.37.1", diffusers.__version__
"""

SFT = NEO_VERSIONS + """
import json, sys
import torch
torch.set_num_threads(1)
from trainer.policy.sft import SFTConfig, train_sft
from promptist_core.optimizer import load_optimizer
result = train_sft(SFTConfig(**json.loads(sys.argv[1])))
print(json.dumps({"steps": result.steps, "rewrite": load_optimizer(sys.argv[2], device="cpu")(
    "a red cat", num_beams=2, max_new_tokens=8)[0].prompt}))
"""


def test_sft_trains_on_forge_neos_transformers_and_its_folder_loads_on_the_newest(rule_data, tmp_path,  # noqa: F811
                                                                                 transformers456_python):
    """The Train SFT tab inside Neo: the run works there, and what it saved loads on the newest transformers."""
    from promptist_core.optimizer import load_optimizer

    out = tmp_path / "trained-in-neo"
    settings = dict(pairs=str(rule_data["pairs"]), base=str(rule_data["base"]), max_steps=2, batch_size=8,
                    effective_batch_size=8, save_every=1, eval_every=1, tensorboard=False, out=str(out))
    done = transformers456_python.run(SFT, json.dumps(settings), str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["rewrite"]
    here = load_optimizer(str(out), device="cpu")("a red cat", num_beams=2, max_new_tokens=8)[0].prompt
    assert here == summary["rewrite"]  # the same weights decode the same on both versions


# argv: CLIP folders (JSON list). Prints {folder: [image embeddings, text embeddings]}.
ENCODE = NEO_VERSIONS + """
import json, sys, torch
from promptist_core.clip_models import load_clip
images = torch.linspace(0, 1, 2 * 32 * 32 * 3).reshape(2, 32, 32, 3)
out = {}
for folder in json.loads(sys.argv[1]):
    clip = load_clip(folder, device="cpu")
    out[folder] = [clip.encode_images(images).tolist(), clip.encode_texts(["a cat", "a red horse"]).tolist()]
print(json.dumps(out))
"""


def test_transformers_clip_and_pickscore_encode_the_same_on_forge_neos_transformers(tiny_clip_models_dir,
                                                                                    transformers456_python):
    """Score's transformers backend (a CLIPModel folder: PickScore, or a CLIP chosen in Settings) inside Neo."""
    from promptist_core.clip_models import load_clip

    folders = [str(tiny_clip_models_dir / "tiny-hf-clip"), str(tiny_clip_models_dir / "tiny-pick")]
    done = transformers456_python.run(ENCODE, json.dumps(folders))
    assert done.returncode == 0, done.stderr[-3000:]
    neo = json.loads(done.stdout.strip().splitlines()[-1])
    images = torch.linspace(0, 1, 2 * 32 * 32 * 3).reshape(2, 32, 32, 3)
    for folder in folders:
        clip = load_clip(folder, device="cpu")
        torch.testing.assert_close(torch.tensor(neo[folder][0]), clip.encode_images(images), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.tensor(neo[folder][1]), clip.encode_texts(["a cat", "a red horse"]),
                                   rtol=1e-4, atol=1e-5)


DF_PROMPT = "a red horse, [anime:0-1:1.5], [detailed:0.5-1:1.25], [sharp:0-0.5:0.75]"
# argv: tiny SD folder, output .npy. Renders the DF-Prompt, and checks a plain prompt is the pipeline's own image.
RENDER = NEO_VERSIONS + """
import sys, numpy as np, torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[3])
from builders_sd import load_tiny_sd
from promptist_core.render_diffusers import generate_dfprompt
pipe = load_tiny_sd(sys.argv[1])
kw = {"num_inference_steps": 3, "guidance_scale": 6.0, "output_type": "np", "height": 64, "width": 64}
ours = generate_dfprompt(pipe, "a cat riding a bike", generator=torch.Generator().manual_seed(7), **kw)
theirs = pipe("a cat riding a bike", generator=torch.Generator().manual_seed(7), **kw)
assert np.array_equal(ours.images, theirs.images), "plain prompt differs from the pipeline's own path"
np.save(sys.argv[2], generate_dfprompt(pipe, sys.argv[4], generator=torch.Generator().manual_seed(7), **kw).images)
"""


def hub_layout_copy(tiny_sd_dir: Path, folder: Path) -> Path:
    """The tiny SD folder as SD folders on the Hub are laid out, which transformers 4.x reads.

    The newest transformers saved the tiny one's CLIP text encoder without the `text_model.` key prefix
    (4.56 loads such a file with every weight missing: random, and says so only in a warning) and its
    tokenizer as tokenizer.json only (4.x's CLIPTokenizer wants vocab.json + merges.txt)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_sd_dir, folder)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(folder / "_tokenizer_build" / name, folder / "tokenizer" / name)
    weights = folder / "text_encoder" / "model.safetensors"
    state = load_file(str(weights))
    save_file({k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}, str(weights),
              metadata={"format": "pt"})
    return folder


def test_dfprompt_rendering_on_forge_neos_diffusers_draws_what_the_newest_draws(tiny_sd_dir, tmp_path,
                                                                               transformers456_python):
    """The headless DF-Prompt renderer (generators, `trainer tpo`) on diffusers 0.37.1 + transformers 4.56."""
    from builders_sd import load_tiny_sd

    from promptist_core.render_diffusers import generate_dfprompt

    folder = hub_layout_copy(tiny_sd_dir, tmp_path / "tiny-sd")
    out = tmp_path / "neo.npy"
    done = transformers456_python.run(RENDER, str(folder), str(out), str(ROOT / "tests"), DF_PROMPT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    kw = {"num_inference_steps": 3, "guidance_scale": 6.0, "output_type": "np", "height": 64, "width": 64}
    here = generate_dfprompt(load_tiny_sd(folder), DF_PROMPT, generator=torch.Generator().manual_seed(7), **kw)
    np.testing.assert_allclose(np.load(out), here.images, atol=1e-6)  # measured: bit-identical here


# The modules the webui entry and its Train/Score/Evaluate tabs import, with diffusers made unimportable.
WEBUI_IMPORTS = """
import importlib, sys
class NoDiffusers:
    def find_spec(self, name, path=None, target=None):
        if name == "diffusers" or name.startswith("diffusers."):
            raise ImportError("diffusers is not importable here (as in a webui that lacks it)")
sys.meta_path.insert(0, NoDiffusers())
for name in ("promptist_webui.errors", "promptist_webui.evaluate", "promptist_webui.infotext",
             "promptist_webui.optimize", "promptist_webui.score", "promptist_webui.tab", "promptist_webui.train",
             "promptist_core.optimizer", "promptist_core.clip_models", "promptist_core.rewards",
             "trainer.policy.sft", "trainer.policy.ppo", "trainer.evaluate"):
    importlib.import_module(name)
print(sorted(n for n in sys.modules if n.split(".")[0] == "diffusers"))
"""


def test_the_webui_code_paths_need_no_diffusers():
    """So Neo's diffusers pin never meets our code inside the webui: only the headless paths above use it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", WEBUI_IMPORTS], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"
