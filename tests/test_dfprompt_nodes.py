"""ComfyUI DF-Prompt nodes: the conditioning entries KSampler receives, and the text renderer node."""

from __future__ import annotations

import re

import pytest
import torch
from comfy_validation import LINK, validate_node

from nodes.comfy_schema import v1_node, v3_validate_inputs
from nodes.dfprompt import DFPromptEncode, DFPromptToText
from promptist_core.dfprompt import comfy_percent, comfy_switch_percent, percent_schedule, schedule

PROMPT = "a red horse, [anime:0-1:1.5], [detailed:0.5-1:1.25], [sharp:0-0.5:0.75]"


class TinyComfyCLIP:
    """Stands in for ComfyUI's `comfy.sd.CLIP`, the host object the node receives.

    Same methods and token format as the host (`tokenize` -> {"l": [[(id, weight), ...]]} with ComfyUI's
    `(text:w)` syntax, `encode_from_tokens`, `encode_from_tokens_scheduled`) and ComfyUI's weighting
    (`empty + (z - empty) * w` on weighted tokens), over a real tiny transformers CLIPTextModel and
    CLIPTokenizer. The node code under test is the real one.
    """

    WEIGHTED = re.compile(r"\(([^()]*):([0-9.]+)\)")

    def __init__(self, tokenizer, text_model):
        self.tokenizer, self.model = tokenizer, text_model
        self.calls = 0

    def tokenize(self, text: str) -> dict:
        pairs, pos = [], 0
        for m in [*self.WEIGHTED.finditer(text), None]:
            plain = text[pos:m.start() if m else len(text)]
            pairs += [(t, 1.0) for t in self.tokenizer(plain, add_special_tokens=False).input_ids]
            if m:
                pairs += [(t, float(m.group(2))) for t in self.tokenizer(m.group(1), add_special_tokens=False).input_ids]
                pos = m.end()
        tok = self.tokenizer
        pairs = [(tok.bos_token_id, 1.0), *pairs[:75], (tok.eos_token_id, 1.0)]
        pairs += [(tok.eos_token_id, 1.0)] * (77 - len(pairs))
        return {"l": [pairs]}

    @torch.no_grad()
    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        self.calls += 1
        pairs = tokens["l"][0]
        out = self.model(torch.tensor([[t for t, _ in pairs]]))
        z, pooled = out.last_hidden_state, out.pooler_output
        empty = self.model(torch.tensor([[t for t, _ in self.tokenize("")["l"][0]]])).last_hidden_state
        for j, (_, w) in enumerate(pairs):
            if w != 1.0:
                z[0, j] = (z[0, j] - empty[0, j]) * w + empty[0, j]
        if return_dict:
            return {"cond": z, "pooled_output": pooled}
        return (z, pooled) if return_pooled else z

    def encode_from_tokens_scheduled(self, tokens, unprojected=False, add_dict=None, show_pbar=True):
        out = self.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
        cond = out.pop("cond")
        out.update(add_dict or {})
        return [[cond, out]]


@pytest.fixture(scope="module")
def clip(tiny_sd_dir):
    from transformers import CLIPTextModel, CLIPTokenizer

    return TinyComfyCLIP(CLIPTokenizer.from_pretrained(tiny_sd_dir / "tokenizer"),
                         CLIPTextModel.from_pretrained(tiny_sd_dir / "text_encoder").eval())


def test_encode_node_gives_one_entry_per_segment_with_its_timestep_range(clip):
    steps = 20
    (conditioning,) = v1_node(DFPromptEncode)().run(clip=clip, text=PROMPT, timing="steps", steps=steps)
    segments = schedule(PROMPT, steps)
    assert len(conditioning) == len(segments) == 2
    for (cond, extras), seg in zip(conditioning, segments, strict=True):
        expected = clip.encode_from_tokens(clip.tokenize(seg.weighted_text("comfy")))
        assert torch.equal(cond, expected)
        assert extras["start_percent"] == comfy_percent(seg.first_step, steps)
        assert extras["end_percent"] == comfy_percent(seg.last_step + 1, steps)
        assert "pooled_output" in extras
    assert conditioning[0][1]["start_percent"] == 0.0 and conditioning[-1][1]["end_percent"] == 1.0
    assert conditioning[0][1]["end_percent"] == conditioning[1][1]["start_percent"]


def test_percent_timing_is_the_default_and_needs_no_step_count(clip):
    node = v1_node(DFPromptEncode)
    timing = node.INPUT_TYPES()["required"]["timing"]
    assert timing[0] == ["percent", "steps"] and timing[1]["default"] == "percent"
    (conditioning,) = node().run(clip=clip, text=PROMPT)
    for steps in (7, 50):
        (other,) = node().run(clip=clip, text=PROMPT, timing="percent", steps=steps)
        assert [extras["start_percent"] for _, extras in other] == [e["start_percent"] for _, e in conditioning]
    # [detailed:0.5-1] acts over the first half of sampling (0 to 0.5), [sharp:0-0.5] over the second.
    segments = percent_schedule(PROMPT)
    assert [(s.start_percent, s.end_percent) for s in segments] == [(0.0, 0.5), (0.5, 1.0)]
    assert [extras["start_percent"] for _, extras in conditioning] == [0.0, comfy_switch_percent(0.5)]
    assert [extras["end_percent"] for _, extras in conditioning] == [comfy_switch_percent(0.5), 1.0]
    for (cond, _), seg in zip(conditioning, segments, strict=True):
        assert torch.equal(cond, clip.encode_from_tokens(clip.tokenize(seg.weighted_text("comfy"))))


def test_encode_node_passes_the_weights_to_the_hosts_clip(clip):
    (conditioning,) = v1_node(DFPromptEncode)().run(clip=clip, text="a red horse, [anime:0-1:1.5]", steps=10)
    assert len(conditioning) == 1
    tokens = clip.tokenize("a red horse, (anime:1.5)")["l"][0]
    anime = [j for j, (_, w) in enumerate(tokens) if w == 1.5]
    assert anime and tokens[anime[0]][0] == clip.tokenizer("anime", add_special_tokens=False).input_ids[0]
    unweighted = clip.encode_from_tokens(clip.tokenize("a red horse, anime"))
    assert not torch.equal(conditioning[0][0][0, anime], unweighted[0, anime])
    keep = [j for j in range(77) if j not in anime]
    assert torch.equal(conditioning[0][0][0, keep], unweighted[0, keep])


def test_plain_prompt_equals_clip_text_encode(clip):
    (conditioning,) = v1_node(DFPromptEncode)().run(clip=clip, text="a (red:1.2) horse", steps=20)
    reference = clip.encode_from_tokens_scheduled(clip.tokenize("a (red:1.2) horse"))  # CLIPTextEncode's path
    assert len(conditioning) == 1 and conditioning[0][1].keys() == reference[0][1].keys()
    assert torch.equal(conditioning[0][0], reference[0][0])


def test_validate_returns_the_parse_error_so_the_graph_fails_before_sampling():
    node = v1_node(DFPromptEncode)
    assert node.VALIDATE_INPUTS(text=PROMPT) is True
    assert node.VALIDATE_INPUTS(text=None) is True  # linked input: known only when the graph runs
    assert node.VALIDATE_INPUTS(text="cat, [x:0.5-2:1]").startswith("column 13: expected a range within 0-1")
    assert v1_node(DFPromptToText).VALIDATE_INPUTS(text="cat, [x") .startswith("column 6: expected a ']'")


@pytest.mark.parametrize("api", ["v1", "v3"])
def test_comfy_checks_every_range_and_shows_each_error_once_on_its_input(api):
    node = v1_node(DFPromptEncode)
    v3 = v3_validate_inputs(DFPromptEncode) if api == "v3" else None
    errors = validate_node(node, {"clip": LINK, "text": "cat, [x:0.5-2:1]", "steps": 0}, v3_validate=v3)
    assert [name for name, _ in errors] == ["steps", "text"]
    assert "smaller than min of 1" in errors[0][1] and "column 13" in errors[1][1]
    assert validate_node(node, {"clip": LINK, "text": LINK, "steps": 20}, v3_validate=v3) == []
    errors = validate_node(v1_node(DFPromptToText), {"text": "cat, [x", "target": "a1111", "steps": -1},
                           v3_validate=v3_validate_inputs(DFPromptToText) if api == "v3" else None)
    assert [name for name, _ in errors] == ["steps", "text"]


def test_schema_declares_inputs_and_says_how_boundaries_map_to_steps():
    node = v1_node(DFPromptEncode)
    required = node.INPUT_TYPES()["required"]
    assert [required[k][0] for k in ("clip", "text", "steps")] == ["CLIP", "STRING", "INT"]
    assert required["steps"][1]["default"] == 20
    assert "i/N" in required["steps"][1]["tooltip"]
    assert node.RETURN_TYPES == ("CONDITIONING",)
    assert v1_node(DFPromptToText).RETURN_TYPES == ("STRING",)


def test_to_text_node_renders_for_a1111_and_plain():
    run = v1_node(DFPromptToText)().run
    assert run(text="cat, [detailed:0.5-1:1.25]", target="a1111", steps=20) == ("cat[, (detailed:1.25)::9]",)
    assert run(text="cat, [detailed:0.5-1:1.25]", target="a1111", steps=0) == ("cat[, (detailed:1.25)::0.5]",)
    assert run(text=r"cat \[x\], [detailed:0.5-1:1.25]", target="plain") == ("cat [x], detailed",)


# Copied from ComfyUI (comfy/model_sampling.py ModelSamplingDiscrete.sigma/percent_to_sigma and the
# normal/simple/sgm_uniform schedulers in comfy/samplers.py), SD 1.x betas, to check where switches land.
def _sd_log_sigmas():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).float().log()


def _sigma(log_sigmas, t: float) -> float:
    t = torch.clamp(torch.tensor(float(t)), 0, 999)
    w = t.frac()
    return ((1 - w) * log_sigmas[t.floor().long()] + w * log_sigmas[t.ceil().long()]).exp().item()


def _percent_to_sigma(log_sigmas, p: float) -> float:
    return 999999999.9 if p <= 0 else 0.0 if p >= 1 else _sigma(log_sigmas, (1 - p) * 999)


@pytest.mark.parametrize("scheduler", ["normal", "simple", "sgm_uniform"])
def test_segment_boundaries_fall_strictly_between_the_intended_steps(scheduler):
    log_sigmas = _sd_log_sigmas()
    for n in (2, 3, 5, 8, 10, 13, 20, 25, 30, 40, 50, 75, 100):
        if scheduler == "normal":
            sigmas = [_sigma(log_sigmas, t.item()) for t in torch.linspace(999, 0, n)]
        elif scheduler == "sgm_uniform":
            sigmas = [_sigma(log_sigmas, t.item()) for t in torch.linspace(999, 0, n + 1)[:-1]]
        else:
            sigmas = [float(log_sigmas.exp()[-(1 + int(x * 1000 / n))]) for x in range(n)]
        for k in range(1, n):
            boundary = _percent_to_sigma(log_sigmas, comfy_percent(k, n))
            # KSampler uses an entry while end_sigma <= sigma <= start_sigma: step k-1 only before, k only after.
            assert sigmas[k - 1] > boundary > sigmas[k], (n, k)
        # percent timing: each step gets exactly one entry, also where a step lands on a switch (0.5 at N=20).
        entries = [(_percent_to_sigma(log_sigmas, comfy_switch_percent(s.start_percent)),
                    _percent_to_sigma(log_sigmas, comfy_switch_percent(s.end_percent)))
                   for s in percent_schedule("a horse, [x:0.5-1:1], [y:0.75-1:1], [z:0-0.2:1]")]
        for sigma in sigmas:
            assert sum(end <= sigma <= start for start, end in entries) == 1, (n, sigma)
