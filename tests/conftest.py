"""Fixtures: tiny models of the real architectures, saved the way users' files look.

No weights can be downloaded in tests. The tiny Promptist is a real GPT2LMHeadModel (2 layers,
32 wide) with a byte-level BPE tokenizer trained here on prompt-like text, briefly trained on
`x Rephrase: y<eos>` so that it writes modifier lists and stops, and saved as safetensors +
config.json + tokenizer files. Tests load it through the real resolver and loader.
"""

from __future__ import annotations

import itertools
import os
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FIXTURES = SHARED / "fixtures"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Tiny models run fastest on one thread, and several threads stall badly on a busy shared CPU.
try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover - torch is installed by .ci/run
    pass

# Tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PROMPTIST_OFFLINE", "1")

SUBJECTS = [
    "a cat riding a bike", "a red horse on the grass", "portrait of an old man", "a castle on a hill",
    "a bowl of fruit", "a dragon flying over mountains", "a city street at night", "a lighthouse in a storm",
    "an astronaut in a jungle", "a fox in the snow", "a cozy cabin in the woods", "a robot reading a book",
    "a girl with a red umbrella", "a ship at sea", "a waterfall in a forest", "a tiger drinking water",
]
MODIFIERS = [
    "highly detailed", "digital painting", "artstation", "concept art", "sharp focus", "illustration",
    "smooth", "intricate", "elegant", "8k", "trending on artstation", "by greg rutkowski", "octane render",
    "cinematic lighting", "matte painting", "unreal engine", "volumetric lighting", "fantasy",
]


def prompt_pairs(n: int = 400, seed: int = 0) -> list[tuple[str, str]]:
    """(plain, engineered) prompt pairs shaped like Promptist's SFT data."""
    rng = random.Random(seed)
    pairs = []
    for subject in itertools.islice(itertools.cycle(SUBJECTS), n):
        mods = rng.sample(MODIFIERS, rng.randint(3, 7))
        pairs.append((subject, subject + ", " + ", ".join(mods)))
    return pairs


def build_tiny_promptist(folder: Path, *, train_steps: int = 150, seed: int = 0) -> Path:
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    pairs = prompt_pairs(seed=seed)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([f"{x} Rephrase: {y}" for x, y in pairs], vocab_size=400, min_frequency=1,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=128)
    tokenizer.save_pretrained(folder)
    bpe.save_model(str(folder))  # vocab.json + merges.txt too, as GPT-2's own repo ships them

    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=eos, eos_token_id=eos)
    model = GPT2LMHeadModel(config)
    # A few steps of teacher forcing so the tiny policy writes modifiers and stops.
    texts = [f"{x} Rephrase: {y}<|endoftext|>" for x, y in pairs]
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokenizer.pad_token = tokenizer.eos_token
    model.train()
    gen = random.Random(seed)
    for _ in range(train_steps):
        batch = tokenizer(gen.sample(texts, 32), return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
    model.eval()
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_promptist_dir(tmp_path_factory) -> Path:
    """A models folder holding `tiny-promptist/` (safetensors + config + tokenizer)."""
    models_dir = tmp_path_factory.mktemp("models")
    build_tiny_promptist(models_dir / "tiny-promptist")
    return models_dir


@pytest.fixture(scope="session")
def tiny_dfprompt_dir(tiny_promptist_dir, tmp_path_factory) -> Path:
    """A models folder holding `tiny-dfprompt/`: the tiny policy plus DF-Prompt weight and range heads (seeded
    random weights of a scale that makes most modifiers a block), as a trained DF-Prompt policy is saved."""
    import shutil

    import torch

    from promptist_core.dfprompt_policy import DFHeads, save_heads

    models_dir = tmp_path_factory.mktemp("df-models")
    folder = models_dir / "tiny-dfprompt"
    shutil.copytree(tiny_promptist_dir / "tiny-promptist", folder)
    heads = DFHeads(32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        heads.weight.weight.copy_(torch.randn(heads.weight.weight.shape, generator=g))
        heads.range.weight.copy_(torch.randn(heads.range.weight.shape, generator=g))
    save_heads(heads, folder)
    return models_dir


@pytest.fixture(scope="session")
def tiny_optimizer(tiny_promptist_dir):
    from promptist_core.optimizer import load_optimizer

    return load_optimizer("tiny-promptist", models_dir=tiny_promptist_dir, device="cpu")


@pytest.fixture(scope="session")
def transformers430_python(request):
    """A Python with transformers 4.30.2 + tokenizers 0.13.3 (A1111 1.10's pins) over this environment.

    Returns a `builders_transformers430.OverlayPython` (`.run(code, *args)`); installed once into
    pytest's cache dir (reused across runs), skipped with pip's reason when it cannot be installed.
    """
    from builders_transformers430 import PACKAGES

    return transformers_overlay(request, "transformers430", PACKAGES, "4.30")


def transformers_overlay(request, cache_name: str, packages: tuple[str, ...], version: str):
    """An OverlayPython with `packages` installed once under pytest's cache; skipped with pip's reason when they
    cannot be installed, or when transformers `version` does not import over this environment."""
    from builders_transformers430 import OverlayPython, install_overlay

    site = request.config.cache.mkdir(cache_name) / f"py{sys.version_info[0]}{sys.version_info[1]}"
    why = install_overlay(site, packages)
    if why is not None:
        pytest.skip(why)
    python = OverlayPython(site, ROOT)
    done = python.run("import transformers, tokenizers; print(transformers.__version__, tokenizers.__version__)")
    if done.returncode != 0 or not done.stdout.startswith(f"{version}."):
        pytest.skip(f"transformers {version} does not import over this environment: {done.stderr.strip()[-300:]}")
    return python


@pytest.fixture(scope="session")
def transformers456_python(request):
    """A Python with Forge Neo's pins over this environment: transformers 4.56.2, tokenizers 0.22.2,
    huggingface_hub 0.36.2, safetensors 0.7.0 and diffusers 0.37.1 (one overlay for the optimizer, scoring,
    SFT and the headless renderer); cached like transformers430, skipped with pip's reason when it cannot be
    installed."""
    from builders_transformers430 import DIFFUSERS_0371, TRANSFORMERS_456

    return transformers_overlay(request, "transformers456", TRANSFORMERS_456 + DIFFUSERS_0371, "4.56")


@pytest.fixture(scope="session")
def open_clip220_python(request):
    """A Python with open_clip 2.20.0 (A1111 1.10's pin) over this environment; cached like transformers430."""
    from builders_transformers430 import OPEN_CLIP_220, OverlayPython, install_overlay

    site = request.config.cache.mkdir("open_clip220") / f"py{sys.version_info[0]}{sys.version_info[1]}"
    why = install_overlay(site, OPEN_CLIP_220)
    if why is not None:
        pytest.skip(why)
    python = OverlayPython(site, ROOT)
    done = python.run("import open_clip, inspect; print(inspect.signature(open_clip.create_model))")
    if done.returncode != 0 or "weights_only" in done.stdout:
        pytest.skip(f"open_clip 2.20 does not import over this environment: {done.stderr.strip()[-300:]}")
    return python


# --- Tiny Stable Diffusion (DF-Prompt renderer, image generators; builders in tests/builders_sd.py) ---

@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    """A diffusers folder holding a tiny SD 1.x-architecture pipeline (random weights)."""
    from builders_sd import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


# --- The A1111 extension, loaded the way the webui loads it ---

WEBUI = ROOT.parent / "hosts" / "webui"  # an A1111 v1.10.1 checkout beside the project, when present


@pytest.fixture(scope="session")
def a1111_script():
    """scripts/promptist.py executed by path, as the webui does (without the webui: no webui classes)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("promptist_a1111_script", ROOT / "scripts" / "promptist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def webui_prompt_parser():
    """The webui's own `modules.prompt_parser`; skipped without a webui checkout or `lark`."""
    if not (WEBUI / "modules" / "prompt_parser.py").is_file():
        pytest.skip(f"no A1111 webui checkout at {WEBUI}")
    pytest.importorskip("lark")
    sys.path.insert(0, str(WEBUI))
    try:
        from modules import prompt_parser
    finally:
        sys.path.remove(str(WEBUI))
    return prompt_parser


# --- Rewards: tiny CLIPs and aesthetic heads (builders in tests/builders_clip.py) ---------------


@pytest.fixture(scope="session")
def tiny_clip_models_dir(tmp_path_factory) -> Path:
    """A models folder like ComfyUI's models/promptist: `tiny_open_clip.safetensors` (architecture
    `promptist-tiny-clip`), `tiny-open-clip-hub/` (open_clip Hub layout), `tiny-hf-clip/` (transformers
    CLIPModel + tokenizer + preprocessor), `tiny-pick/` (the same, logit scale 100) and a random
    32-dim aesthetic head `tiny-head.safetensors` in the improved predictor's key layout."""
    from builders_clip import build_tiny_open_clip, build_tiny_transformers_clip, save_random_head

    models_dir = tmp_path_factory.mktemp("clip_models")
    build_tiny_open_clip(models_dir)
    build_tiny_transformers_clip(models_dir / "tiny-hf-clip", seed=1)
    build_tiny_transformers_clip(models_dir / "tiny-pick", seed=2, logit_scale=100.0)
    save_random_head(models_dir / "tiny-head.safetensors", kind="mlp", seed=3)
    return models_dir
