"""ComfyUI side of TPO on flow models, without ComfyUI: the LoRA on SD3's fused qkv weight and the refusal
of model types TPO has no loss for (prediction kinds read from comfy.model_sampling's mixin class names).
The flow path itself (SD3 MODEL, ComfyUI's LoraLoader reproducing the trained LoRA exactly) is tried in the
real ComfyUI (notes: flow-comfy)."""

from __future__ import annotations

import pytest
import torch
from test_tpo_node import FakeBaseModel, FakeModelPatcher
from test_train_nodes import comfy  # noqa: F401 (fixture)

from nodes.comfy_denoiser import RowSlicedLoRA, WeightLoRA, check_supported, prediction_kind
from nodes.train_tpo import TPOTrain


# comfy.model_sampling's prediction mixins, by name, as ComfyUI composes them (sampling schedule first)
class EPS: ...
class V_PREDICTION(EPS): ...  # noqa: E701, N801
class EDM(V_PREDICTION): ...  # noqa: E701
class CONST: ...  # noqa: E701


def sampling_of(*mixins):
    return type("ModelSampling", (torch.nn.Module, *mixins), {})()


class SD3(torch.nn.Module):  # a comfy.model_base class name TPO trains as flow
    def __init__(self, sampling):
        super().__init__()
        self.model_sampling = sampling


class Flux(torch.nn.Module):  # a flow model TPO does not cover
    def __init__(self, sampling):
        super().__init__()
        self.model_sampling = sampling


def test_qkv_row_slices_act_as_separate_q_k_v_loras():
    g = torch.Generator().manual_seed(0)
    qkv = torch.nn.Linear(8, 24, bias=False)
    loras = [WeightLoRA(8, 8, 2, 2.0, torch.device("cpu")) for _ in range(2)]
    for lora in loras:
        torch.nn.init.normal_(lora.up.weight, generator=g)
    sliced = RowSlicedLoRA(24, [(0, loras[0]), (16, loras[1])])  # to_q and to_v; to_k has no LoRA
    x = torch.randn(3, 8, generator=g)
    out = x @ sliced(qkv.weight).T
    q, k, v = (x @ qkv.weight.T).split(8, dim=1)
    assert torch.allclose(out[:, :8], q + x @ (loras[0].up.weight @ loras[0].down.weight).T, atol=1e-6)
    assert torch.equal(out[:, 8:16], k)
    assert torch.allclose(out[:, 16:], v + x @ (loras[1].up.weight @ loras[1].down.weight).T, atol=1e-6)
    loras[0].enabled = loras[1].enabled = False
    assert torch.equal(sliced(qkv.weight), qkv.weight)
    out.sum().backward()
    assert loras[0].up.weight.grad is not None and loras[1].down.weight.grad is not None


def test_prediction_kinds_and_the_models_tpo_covers():
    assert prediction_kind(sampling_of(V_PREDICTION)) == "V_PREDICTION"
    assert prediction_kind(sampling_of(EDM)) == "EDM"
    assert prediction_kind(torch.nn.Module()) is None  # no ComfyUI mixin: the discrete-schedule check decides
    assert check_supported(FakeModelPatcher(SD3(sampling_of(CONST)))) == "CONST"
    assert check_supported(FakeModelPatcher(SD3(sampling_of(EPS)))) == "EPS"
    for base, name in ((SD3(sampling_of(EDM)), "SD3 models (ModelSampling, EDM prediction)"),
                       (Flux(sampling_of(CONST)), "Flux models (ModelSampling, CONST prediction)")):
        with pytest.raises(ValueError) as e:
            check_supported(FakeModelPatcher(base))
        assert name in str(e.value) and "\n" not in str(e.value)


def test_node_refuses_an_uncovered_model_before_drawing_or_training(comfy, tmp_path, monkeypatch):  # noqa: F811
    from builders_sd import build_tiny_unet

    monkeypatch.setenv("PROMPTIST_MODELS_DIR", str(tmp_path / "models" / "promptist"))
    model = FakeModelPatcher(FakeBaseModel(build_tiny_unet()))  # the graph's MODEL, here with EDM sampling
    monkeypatch.setattr(model.model, "model_sampling", sampling_of(EDM))
    drawn = []
    monkeypatch.setattr("nodes.train_tpo.ComfyGenerator", lambda *a, **k: drawn.append(a))
    with pytest.raises(ValueError, match=r"TPO does not train FakeBaseModel models \(ModelSampling, EDM"), \
            torch.inference_mode():
        TPOTrain.run(model, object(), object(), source="prompts", captions="a red square\na blue car", save_name="edm",
                     steps=2, rank=2, beta=0.0, learning_rate=1e-3, batch_size=1, grad_accum=1, resolution=64, seed=0,
                     save_every=1, negatives_per_caption=1, valid_fraction=0.0)
    assert not drawn and not (tmp_path / "models").exists()
