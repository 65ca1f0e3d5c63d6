"""A1111/Forge VRAM manners: the policy and the reward models leave the GPU after each job (to RAM, still
loaded), unless Settings → Promptist → "Keep Promptist models on the GPU between jobs" is on.

The GPU is faked: `nn.Module.to` records where each module is sent (and moves nothing), and
`promptist_core.devices.module_device` reports that place, so the test runs on CPU-only torch.
"""

from __future__ import annotations

import shutil
import sys

import pytest
import torch
from conftest import ROOT
from fake_webui import Job, load_script_in_fake_webui, run_process_hook
from torch import nn

from promptist_core import devices as core_devices


@pytest.fixture
def fake_gpu(monkeypatch):
    """moves[i] = the devices module i was sent to, in order; `empty_cache` counts CUDA cache empties."""
    moves: dict[int, list[str]] = {}
    where: dict[int, str] = {}

    def to(self, *args, **kwargs):
        device = kwargs.get("device", args[0] if args else None)
        if isinstance(device, (str, torch.device)):
            moves.setdefault(id(self), []).append(str(torch.device(device)))
            where[id(self)] = str(torch.device(device))
        return self

    monkeypatch.setattr(nn.Module, "to", to)
    monkeypatch.setattr(core_devices, "module_device", lambda m: torch.device(where.get(id(m), "cpu")))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    moves["empty_cache"] = emptied
    moves["where"] = where
    return moves


@pytest.fixture
def webui(monkeypatch, tmp_path, tiny_promptist_dir, tiny_clip_models_dir):
    models = tmp_path / "models"
    shutil.copytree(tiny_promptist_dir, models / "promptist")
    shutil.copytree(tiny_clip_models_dir, models / "promptist", dirs_exist_ok=True)
    settings = {"promptist_model": "tiny-promptist", "promptist_device": "gpu", "promptist_score_device": "gpu",
                "promptist_score_clip": "tiny-open-clip-hub", "promptist_score_aesthetic": "tiny-head.safetensors"}
    module = load_script_in_fake_webui(ROOT / "scripts" / "promptist.py", monkeypatch, models, settings)
    monkeypatch.setattr(sys.modules["modules.devices"], "device", torch.device("cuda"))
    return module


@pytest.fixture
def optimizer(webui, tiny_optimizer, monkeypatch):
    """The policy the script loads (already loaded on the CPU: this torch has no CUDA)."""
    monkeypatch.setattr(webui.optimize, "load_optimizer", lambda *a, **k: tiny_optimizer)
    return tiny_optimizer


@pytest.mark.parametrize("keep", [False, True])
def test_the_policy_goes_to_the_gpu_for_the_job_and_leaves_after_it_unless_kept(webui, optimizer, fake_gpu, keep):
    webui.host.shared.opts.data["promptist_keep_on_gpu"] = keep
    p = Job("a cat riding a bike")
    assert run_process_hook(webui.PromptistScript(), p, True, "beam", False) == []
    assert p.extra_generation_params["Promptist original"] == ["a cat riding a bike"]  # optimized on the "GPU"
    assert fake_gpu[id(optimizer.model)] == (["cuda"] if keep else ["cuda", "cpu"])
    assert len(fake_gpu["empty_cache"]) == (0 if keep else 1)  # the freed VRAM is given back to the sampler

    run_process_hook(webui.PromptistScript(), Job("a red horse"), True, "beam", False)  # the next job
    assert fake_gpu[id(optimizer.model)] == (["cuda"] if keep else ["cuda", "cpu", "cuda", "cpu"])


@pytest.mark.parametrize("keep", [False, True])
def test_the_reward_models_wait_in_ram_while_sampling_and_score_on_the_gpu(webui, fake_gpu, keep, monkeypatch,
                                                                           tiny_clip_models_dir):
    from promptist_core.aesthetic import load_aesthetic_head
    from promptist_core.clip_models import load_clip
    from promptist_core.rewards import RewardScorer

    scorer = RewardScorer(load_clip("tiny-open-clip-hub", models_dir=tiny_clip_models_dir, device="cpu"),
                          load_aesthetic_head("tiny-head.safetensors", models_dir=tiny_clip_models_dir))
    monkeypatch.setattr(webui.score, "load_scorer", lambda *a, **k: scorer)
    webui.host.shared.opts.data["promptist_keep_on_gpu"] = keep
    clip = id(scorer.clip.module)
    fake_gpu.pop(clip, None)  # its loading's own moves
    script, p = webui.PromptistScoreScript(), Job("a cat")
    script.process(p, True, False, "promptist")
    assert fake_gpu[clip] == (["cuda"] if keep else ["cuda", "cpu"])  # not on the GPU while the image is sampled
    p.prompts, p.extra_generation_params = ["a cat"], {}
    batch = type("Batch", (), {"images": [torch.rand(3, 32, 32)]})()
    script.postprocess_batch_list(p, batch, True, False, "promptist", batch_number=0)
    assert "Promptist score" in p.extra_generation_params
    assert fake_gpu[clip] == (["cuda"] if keep else ["cuda", "cpu", "cuda", "cpu"])


@pytest.mark.parametrize("keep", [False, True])
def test_a_tab_job_moves_every_loaded_model_off_the_gpu_when_it_ends(webui, fake_gpu, keep, monkeypatch):
    from promptist_core.optimizer import load_optimizer

    webui.host.shared.opts.data["promptist_keep_on_gpu"] = keep
    policy = load_optimizer("tiny-promptist", models_dir=webui.host.models_dirs(webui.host.shared.models_path),
                            device="cpu")  # in promptist's cache (this torch has no CUDA: the job "moves" it)
    monkeypatch.setattr(webui.optimize, "load_optimizer", lambda *a, **k: policy)
    fake_gpu.pop(id(policy.model), None)  # its loading's own move
    optimize = webui.vram.releasing(webui.tab._opts, webui.tab._optimize_for_tab)  # what the Optimize button runs
    optimize("a cat riding a bike", "beam", 2, 0)
    assert fake_gpu[id(policy.model)] == (["cuda"] if keep else ["cuda", "cpu"])


def test_evaluate_gets_its_cached_policies_back_on_their_device_and_parks_them_after(webui, fake_gpu, monkeypatch,
                                                                                     tiny_optimizer):
    from promptist_core import optimizer as core_optimizer

    monkeypatch.setitem(core_optimizer._CACHE, ("policy", "tokenizer", "cuda", torch.float16, "a", "b"), tiny_optimizer)
    seen = []
    job = webui.vram.releasing(webui.tab._opts, lambda: seen.append(fake_gpu["where"].get(id(tiny_optimizer.model))),
                               policies_back=True)
    fake_gpu.pop(id(tiny_optimizer.model), None)
    job()
    assert seen == ["cuda"]  # on its device while the job runs (Evaluate's policies come from the core's cache)
    assert fake_gpu[id(tiny_optimizer.model)] == ["cuda", "cpu"]
