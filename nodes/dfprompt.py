"""DF-Prompt in ComfyUI: one conditioning entry per schedule segment, switched by KSampler itself.

Each segment is encoded with the host's CLIP (its own `(text:w)` weights) and gets the
`start_percent`/`end_percent` of ConditioningSetTimestepRange, so no custom sampler is needed.
"""

from __future__ import annotations

from promptist_core.dfprompt import (
    TARGETS,
    comfy_percent,
    comfy_switch_percent,
    parse,
    percent_schedule,
    schedule,
    to_text,
)

from .comfy_schema import comfy_node

TIMINGS = ("percent", "steps")
TIMING_TOOLTIP = (
    "percent (no step count needed): a range a-b is active over sampling percents 1-b to 1-a, as "
    "ConditioningSetTimestepRange does, whatever the KSampler's steps (percents are in timestep space: close "
    "to the fraction of steps with the normal and simple schedulers, not with karras). steps: PAE's exact step "
    "rule for the steps below, which must then equal the KSampler's."
)
STEPS_TOOLTIP = (
    "steps timing only: set this to the KSampler's steps N. Segment boundaries map to step i/N: a segment "
    "starting at step i gets start_percent = i/N (up to half a step less, so that it falls strictly between "
    "steps i-1 and i). ComfyUI's percents are in timestep space (sigma at (1-p)*999), not steps: with the "
    "normal, simple and sgm_uniform schedulers every switch lands on the intended step; with karras or "
    "exponential the steps crowd at low noise, so switches land earlier or later than intended."
)


def _parse_error(text: str | None) -> str | None:
    if text is None:  # linked input: its value is not known before the graph runs
        return None
    try:
        parse(text)
    except ValueError as e:
        return str(e)
    return None


class DFPromptEncode:
    """Encode a DF-Prompt into conditioning that changes over the denoising steps."""

    NODE_ID = "PromptistDFPromptEncode"
    DISPLAY_NAME = "Promptist DF-Prompt Encode"
    DESCRIPTION = ("Encodes a DF-Prompt such as 'a horse, [anime:0-1:1.5], [detailed:0.5-1:1.25]': each "
                   "[text:a-b:w] acts with weight w while the noise level is in a..b (1 = first step, 0 = last). "
                   "Outputs one conditioning entry per segment with its sampling range; KSampler switches them.")
    INPUTS = [
        ("clip", "CLIP", {"tooltip": "The CLIP model used for encoding the text."}),
        ("text", "STRING", {"multiline": True,
                            "default": "a red horse on the grass, [anime:0-1:1.5], [detailed:0.85-1:1]",
                            "tooltip": "Prompt with DF blocks [text:a-b:w]; a-b in 0..1 (1 = first step), w > 0. "
                                       "(word:1.2) outside blocks works as usual; \\[ \\] are literal brackets."}),
        ("timing", list(TIMINGS), {"default": "percent", "tooltip": TIMING_TOOLTIP}),
        ("steps", "INT", {"default": 20, "min": 1, "max": 10000, "step": 1, "tooltip": STEPS_TOOLTIP}),
    ]
    OUTPUTS = [("CONDITIONING", "conditioning",
                "One entry per segment with its start_percent/end_percent (see timing).")]

    @staticmethod
    def run(clip, text: str, timing: str = "percent", steps: int = 20):
        if clip is None:
            raise RuntimeError("clip input is invalid: None (the checkpoint has no text encoder?)")
        prompt = parse(text)
        if timing == "percent":
            ranges = [(seg, comfy_switch_percent(seg.start_percent), comfy_switch_percent(seg.end_percent))
                      for seg in percent_schedule(prompt)]
        else:
            ranges = [(seg, comfy_percent(seg.first_step, steps), comfy_percent(seg.last_step + 1, steps))
                      for seg in schedule(prompt, steps)]
        conditioning = []
        for seg, start, end in ranges:
            tokens = clip.tokenize(seg.weighted_text("comfy"))
            # Whole-range entries carry no range, so a plain prompt equals CLIPTextEncode's output.
            add = {} if (start, end) == (0.0, 1.0) else {"start_percent": start, "end_percent": end}
            conditioning += clip.encode_from_tokens_scheduled(tokens, add_dict=add)
        return (conditioning,)

    @staticmethod
    def validate(text: str | None = None):
        return _parse_error(text) or True


class DFPromptToText:
    """Render a DF-Prompt as text for hosts or nodes that do not know DF blocks."""

    NODE_ID = "PromptistDFPromptToText"
    DISPLAY_NAME = "Promptist DF-Prompt to Text"
    DESCRIPTION = ("a1111: the webui's prompt editing syntax ([(x:1.25)::9]), exact when steps is given; "
                   "plain: every modifier's text without weights or ranges.")
    INPUTS = [
        ("text", "STRING", {"multiline": True, "default": "a red horse on the grass, [anime:0-1:1.5]",
                            "tooltip": "Prompt with DF blocks [text:a-b:w]."}),
        ("target", list(TARGETS), {"default": "a1111", "tooltip": "a1111: prompt editing + attention syntax. "
                                                                  "plain: no DF syntax at all."}),
        ("steps", "INT", {"default": 0, "min": 0, "max": 10000, "step": 1, "optional": True,
                          "tooltip": "a1111 only: the webui's sampling steps, for exact integer switch steps. "
                                     "0: unknown, write fractions (the webui rounds them one step off)."}),
    ]
    OUTPUTS = [("STRING", "text", "The rendered prompt.")]

    @staticmethod
    def run(text: str, target: str = "a1111", steps: int | None = 0):
        return (to_text(text, target, steps or None),)

    @staticmethod
    def validate(text: str | None = None):
        return _parse_error(text) or True


NODES = [comfy_node(DFPromptEncode), comfy_node(DFPromptToText)]
