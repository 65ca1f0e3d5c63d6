"""The ComfyUI nodes, executed directly with a tiny policy (no ComfyUI needed)."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from nodes.comfy_schema import v1_node, v3_validate_inputs
from nodes.optimize import ModelLoader, OptimizePrompt


@pytest.fixture
def comfy_models_dir(tiny_promptist_dir, monkeypatch):
    # Without ComfyUI, nodes look in $PROMPTIST_MODELS_DIR (ComfyUI: models/promptist).
    monkeypatch.setenv("PROMPTIST_MODELS_DIR", str(tiny_promptist_dir))
    return tiny_promptist_dir


def test_loader_lists_model_folders_and_the_default(comfy_models_dir):
    inputs = v1_node(ModelLoader).INPUT_TYPES()["required"]
    names, options = inputs["model_name"]
    assert names == ["microsoft/Promptist", "promptist-mini", "tiny-promptist"]  # the bundled one with nothing copied
    assert options["default"] == "microsoft/Promptist"
    assert inputs["device"][0] == ["auto", "gpu", "cpu"]


def test_loader_lists_causal_lm_folders_only(tiny_promptist_dir, tmp_path, monkeypatch):
    (tmp_path / "tiny-promptist").symlink_to(tiny_promptist_dir / "tiny-promptist")
    for name, config in {"clip-vit-large-patch14": {"model_type": "clip", "architectures": ["CLIPModel"]},
                         "PickScore_v1": {"model_type": "clip"},
                         "reward-gpt2": {"model_type": "gpt2", "architectures": ["GPT2ForSequenceClassification"]},
                         "my-policy": {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    (tmp_path / "no-config").mkdir()
    monkeypatch.setenv("PROMPTIST_MODELS_DIR", str(tmp_path))
    names = v1_node(ModelLoader).INPUT_TYPES()["required"]["model_name"][0]
    assert names == ["microsoft/Promptist", "promptist-mini", "my-policy", "tiny-promptist"]


def test_v1_schema_declares_types_names_and_tooltips():
    node = v1_node(OptimizePrompt)
    assert node.RETURN_TYPES == ("STRING", "STRING")
    assert node.RETURN_NAMES == ("prompt", "candidates")
    assert node.FUNCTION == "run" and node.CATEGORY == "promptist"
    required = node.INPUT_TYPES()["required"]
    assert required["promptist_model"] == ("PROMPTIST_MODEL", {"tooltip": "From Promptist Model Loader."})
    assert required["mode"][0] == ["beam", "diverse", "sample"]
    assert required["candidates"][1]["min"] == 1 and required["candidates"][1]["max"] == 16
    assert all("tooltip" in spec[1] for spec in required.values())


def test_the_seed_stays_fixed_between_runs():
    # The frontend adds a control that re-randomises an input named seed after every run unless the input
    # says control_after_generate False; that would re-run the node even in beam mode, which ignores it.
    seed = v1_node(OptimizePrompt).INPUT_TYPES()["required"]["seed"][1]
    assert seed["control_after_generate"] is False
    assert "sample mode only" in seed["tooltip"]


def test_loader_then_optimize_node_rewrites_the_prompt(comfy_models_dir, tiny_optimizer):
    (model,) = v1_node(ModelLoader)().run(model_name="tiny-promptist", device="cpu")
    assert model.optimizer is tiny_optimizer  # the module-level cache is shared with the core
    best, everything = v1_node(OptimizePrompt)().run(promptist_model=model, text="a cat riding a bike",
                                                     mode="beam", candidates=3, seed=0, max_new_tokens=75)
    expected = tiny_optimizer("a cat riding a bike", candidates=3)[0]
    assert best == expected.prompt
    assert everything.splitlines() == expected.candidates


def test_optimize_node_rewrites_each_line(comfy_models_dir):
    (model,) = ModelLoader.run(model_name="tiny-promptist", device="cpu")
    best, everything = OptimizePrompt.run(promptist_model=model, text="a cat\n\na ship\n", candidates=2)
    assert len(best.splitlines()) == 2 and len(everything.splitlines()) == 4


def test_optimize_node_sample_mode_is_reproducible_with_the_seed(comfy_models_dir):
    (model,) = ModelLoader.run(model_name="tiny-promptist", device="cpu")
    a = OptimizePrompt.run(promptist_model=model, text="a fox", mode="sample", candidates=3, seed=11)
    b = OptimizePrompt.run(promptist_model=model, text="a fox", mode="sample", candidates=3, seed=11)
    assert a == b


def test_loader_with_a_missing_model_says_where_to_put_it(comfy_models_dir):
    from promptist_core.weights import WeightsNotFoundError

    with pytest.raises(WeightsNotFoundError, match=str(comfy_models_dir / "nope")):
        ModelLoader.run(model_name="nope", device="cpu")


def test_a_validator_that_names_several_inputs_is_refused():
    # ComfyUI would skip its own checks on each of them and repeat the validator's error per input.
    class Node:
        NODE_ID, DISPLAY_NAME, DESCRIPTION, OUTPUTS = "N", "N", "", []
        INPUTS = [("a", "INT", {"min": 0}), ("b", "INT", {"min": 0})]

        @staticmethod
        def run(a, b):
            return ()

        @staticmethod
        def validate(**inputs):
            return True

    with pytest.raises(TypeError, match="exactly one input"):
        v1_node(Node)
    with pytest.raises(TypeError, match="exactly one input"):
        v3_validate_inputs(Node)


def test_comfys_log_names_the_policy_it_loads(comfy_models_dir, monkeypatch):
    # ComfyUI logs "Requested to load <class of the model handed to ModelPatcher>" on every run.
    from nodes import comfy_host

    handed = []
    patcher = types.ModuleType("comfy.model_patcher")
    patcher.ModelPatcher = lambda model, load_device, offload_device: handed.append(model)
    comfy = types.ModuleType("comfy")
    comfy.model_patcher = patcher
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.model_patcher", patcher)
    monkeypatch.setattr(comfy_host, "model_management", types.SimpleNamespace(text_encoder_offload_device=lambda: "cpu"))
    monkeypatch.setattr(comfy_host, "_MANAGED", {})
    (model,) = ModelLoader.run(model_name="tiny-promptist", device="cpu")
    assert [type(h).__name__ for h in handed] == ["PromptistPolicy"]
    assert handed[0].module is model.optimizer.model


class ScheduledCLIP:
    """comfy.sd.CLIP as far as DF-Prompt Encode uses it: one conditioning entry per call, its text and range."""

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, tokens, add_dict=None):
        return [[None, {"text": tokens, **(add_dict or {})}]]


def test_a_dfprompt_policy_writes_the_dfprompts_that_dfprompt_encode_schedules(tiny_dfprompt_dir, monkeypatch):
    from nodes.dfprompt import DFPromptEncode
    from promptist_core import dfprompt
    from promptist_core.optimizer import load_optimizer

    monkeypatch.setenv("PROMPTIST_MODELS_DIR", str(tiny_dfprompt_dir))
    assert "tiny-dfprompt" in v1_node(ModelLoader).INPUT_TYPES()["required"]["model_name"][0]
    (model,) = ModelLoader.run(model_name="tiny-dfprompt", device="cpu")
    assert model.optimizer.is_dfprompt
    source = "a cat riding a bike"
    run = dict(promptist_model=model, text=source, mode="diverse", max_new_tokens=30)  # the tiny beam's best: no modifier
    best, everything = OptimizePrompt.run(**run, candidates=2)
    expected = load_optimizer(str(tiny_dfprompt_dir / "tiny-dfprompt"), device="cpu")(
        source, mode="diverse", candidates=2, num_beams=8, max_new_tokens=30)[0]
    assert best == expected.prompt and everything.splitlines() == expected.candidates
    assert best.startswith(source + ", ") and dfprompt.parse(best).modifiers, best

    # output plain: the same modifiers without DF syntax, for CLIP Text Encode; a plain policy ignores it
    plain, _ = OptimizePrompt.run(**run, candidates=2, output="plain")
    assert plain == dfprompt.to_plain(best) and not dfprompt.has_dfprompt(plain)
    # head_choice sample: drawn from the heads with the seed, reproducibly
    drawn = [OptimizePrompt.run(**run, head_choice="sample", seed=s)[0] for s in (1, 1, 2, 3, 4)]
    assert drawn[0] == drawn[1] and len(set(drawn)) > 1 and all(dfprompt.to_plain(d) == dfprompt.to_plain(drawn[0])
                                                                for d in drawn)

    # the graph: Optimize Prompt's string into DF-Prompt Encode -> one conditioning entry per segment
    (conditioning,) = DFPromptEncode.run(ScheduledCLIP(), best, timing="steps", steps=20)
    segments = dfprompt.schedule(best, 20)
    assert [c[1]["text"] for c in conditioning] == [s.weighted_text("comfy") for s in segments]
    assert v1_node(DFPromptEncode).VALIDATE_INPUTS(text=best) is True
    with pytest.raises(ValueError, match="output must be one of"):
        OptimizePrompt.run(**run, output="a1111")


class CachingExecutor:
    """What ComfyUI's executor does with a node between queues: ask `IS_CHANGED` (V1) or `fingerprint_inputs` (V3)
    with the node's inputs, run the node when the inputs or that answer differ from the last run's, else serve
    the cached output (NaN, never equal to itself, always runs)."""

    def __init__(self, node: type, ask: str = "IS_CHANGED"):
        self.node, self.ask = node, ask
        self.last_key, self.output, self.runs = None, None, 0

    def queue(self, **inputs):
        answer = getattr(self.node, self.ask)(**inputs) if hasattr(self.node, self.ask) else None
        key = (tuple(sorted(inputs.items())), answer)
        if self.last_key is None or key != self.last_key:
            self.output = self.node.SPEC.run(**inputs)
            self.runs += 1
        self.last_key = key
        return self.output


@pytest.fixture
def retrainable_models_dir(tiny_promptist_dir, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(tiny_promptist_dir / "tiny-promptist", tmp_path / "my-policy")
    monkeypatch.setenv("PROMPTIST_MODELS_DIR", str(tmp_path))
    return tmp_path


def retrain(folder, seed: int) -> None:
    """New weights saved over the folder, as the PPO node or `python -m trainer ppo` does."""
    from transformers import AutoModelForCausalLM

    from promptist_core.policy_folder import save_policy_folder
    from promptist_core.weights import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    save_policy_folder(model, load_tokenizer(folder), folder)


def wte(loaded) -> torch.Tensor:
    return loaded.optimizer.model.state_dict()["transformer.wte.weight"]


@pytest.mark.parametrize("api", ["v1", "v3"])
def test_the_loader_reloads_a_retrained_folder_and_serves_an_unchanged_one_from_comfys_cache(
        retrainable_models_dir, monkeypatch, api):
    from safetensors.torch import load_file

    from nodes import comfy_schema

    if api == "v1":
        executor = CachingExecutor(v1_node(ModelLoader), "IS_CHANGED")
    else:  # V3's ComfyNode base class is all `_v3_class` needs before ComfyUI asks for the schema
        monkeypatch.setattr(comfy_schema, "comfy_io", types.SimpleNamespace(ComfyNode=object))
        executor = CachingExecutor(comfy_schema._v3_class(ModelLoader), "fingerprint_inputs")
    folder = retrainable_models_dir / "my-policy"
    (first,) = executor.queue(model_name="my-policy", device="cpu")
    (again,) = executor.queue(model_name="my-policy", device="cpu")
    assert again is first and executor.runs == 1  # unchanged folder: ComfyUI's cached output

    retrain(folder, seed=3)
    (second,) = executor.queue(model_name="my-policy", device="cpu")
    assert executor.runs == 2 and second.optimizer is not first.optimizer
    assert torch.equal(wte(second), load_file(folder / "model.safetensors")["transformer.wte.weight"])
    executor.queue(model_name="my-policy", device="cpu")
    assert executor.runs == 2
