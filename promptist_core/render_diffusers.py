"""Run a diffusers Stable Diffusion (1.x/2.x or XL) pipeline with DF-Prompts.

Each distinct segment of a DF-Prompt's schedule is encoded once; at the end of step i the
`callback_on_step_end` hook hands the pipeline the embeddings of step i+1 (the same tensor object
for every step of a segment, so switching costs nothing). With classifier-free guidance the
pipeline's `prompt_embeds` is `[negative; positive]`, so the callback returns that concatenation;
SDXL also switches its pooled `add_text_embeds`. Weights are applied as:

- `a1111` (PAE's choice): multiply each token's embedding by its weight, then rescale the whole
  embedding to its original mean;
- `comfy` (ComfyUI/compel): `empty + (z - empty) * w`, with `empty` the encoding of "".

Steps whose weights are all 1 go through the pipeline's own `encode_prompt`, so a prompt without DF
blocks gives the very same images as calling the pipeline with `prompt=`. Example (tiny SD in tests):

    >>> from diffusers import StableDiffusionPipeline
    >>> from promptist_core.render_diffusers import generate_dfprompt
    >>> pipe = StableDiffusionPipeline.from_pretrained("path/to/sd15", safety_checker=None)
    >>> images = generate_dfprompt(pipe, "a red horse, [anime:0-1:1.5], [detailed:0.85-1:1]",
    ...                            num_inference_steps=20).images
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .dfprompt import DFPrompt, Segment, parse, schedule, unescape

WEIGHT_MODES = ("a1111", "comfy")


@dataclass
class _Encoded:
    """One encoded text: hidden states [1, 77, D] and, for SDXL, the pooled embedding [1, D2]."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None


def _is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None or getattr(pipe, "tokenizer_2", None) is not None


def _encode_plain(pipe, text: str, device, clip_skip: int | None) -> _Encoded:
    """The pipeline's own encoding of `text` (no weights): bit-identical to `pipe(prompt=text)`."""
    if _is_sdxl(pipe):
        embeds, _, pooled, _ = pipe.encode_prompt(text, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False, clip_skip=clip_skip)
        return _Encoded(embeds, pooled)
    embeds, _ = pipe.encode_prompt(text, device, 1, False, clip_skip=clip_skip)
    return _Encoded(embeds)


def _token_ids(tokenizer, chunks: Sequence[tuple[str, float]]) -> tuple[list[int], list[float]]:
    """Tokenize each chunk on its own (as A1111 does) and pad to the window: ids and per-token weights."""
    ids, weights = [], []
    for text, weight in chunks:
        chunk_ids = tokenizer(unescape(text), add_special_tokens=False).input_ids
        ids += chunk_ids
        weights += [weight] * len(chunk_ids)
    window = tokenizer.model_max_length
    ids, weights = ids[:window - 2], weights[:window - 2]  # as the pipeline does, the tail is cut
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    n_pad = window - 2 - len(ids)
    ids = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [pad] * n_pad
    weights = [1.0, *weights, 1.0] + [1.0] * n_pad
    return ids, weights


def _encode_ids(pipe, ids_per_encoder: list[list[int]], device, clip_skip: int | None) -> _Encoded:
    """Hidden states the way the pipeline's `encode_prompt` computes them, from given token ids."""
    if not _is_sdxl(pipe):
        ids = torch.tensor([ids_per_encoder[0]], device=device)
        if clip_skip is None:
            embeds = pipe.text_encoder(ids)[0]
        else:
            hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
            # transformers 5 flattened CLIPTextModel (no `.text_model`)
            embeds = getattr(pipe.text_encoder, "text_model", pipe.text_encoder).final_layer_norm(hidden)
        return _Encoded(embeds.to(pipe.text_encoder.dtype))
    encoders = [e for e in (pipe.text_encoder, pipe.text_encoder_2) if e is not None]
    hidden_states, pooled = [], None
    for encoder, ids in zip(encoders, ids_per_encoder, strict=True):
        out = encoder(torch.tensor([ids], device=device), output_hidden_states=True)
        if out[0].ndim == 2:  # text_encoder_2 (with projection) gives the pooled embedding, as in encode_prompt
            pooled = out[0]
        hidden_states.append(out.hidden_states[-2 if clip_skip is None else -(clip_skip + 2)])
    return _Encoded(torch.cat(hidden_states, dim=-1).to(encoders[-1].dtype), pooled)


def _tokenizers(pipe) -> list:
    return [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]


@torch.no_grad()
def encode_segment(pipe, segment: Segment, *, weight_mode: str = "a1111", device=None,
                   clip_skip: int | None = None, _empty: dict | None = None) -> _Encoded:
    """Encode one segment's text with its per-token weights.

    Args:
        pipe: a diffusers SD or SDXL pipeline.
        segment: from `dfprompt.schedule`.
        weight_mode: `a1111` (multiply, rescale to the original mean) or `comfy` (`empty + (z-empty)*w`).
        device: where to encode (default: the pipeline's execution device).
        clip_skip: as the pipeline's `clip_skip`.
    """
    if weight_mode not in WEIGHT_MODES:
        raise ValueError(f"weight_mode must be one of {', '.join(WEIGHT_MODES)}, got {weight_mode!r}")
    device = device or pipe._execution_device
    if not segment.weighted:
        return _encode_plain(pipe, segment.text, device, clip_skip)
    token_ids = [_token_ids(tok, segment.chunks) for tok in _tokenizers(pipe)]
    encoded = _encode_ids(pipe, [ids for ids, _ in token_ids], device, clip_skip)
    z = encoded.embeds
    if _is_sdxl(pipe):  # both encoders see the same chunks; their hidden states are concatenated per token
        weights = torch.tensor(token_ids[-1][1], device=z.device, dtype=z.dtype)
    else:
        weights = torch.tensor(token_ids[0][1], device=z.device, dtype=z.dtype)
    weights = weights.reshape(1, -1, 1)
    if weight_mode == "a1111":
        original_mean = z.mean()
        z = z * weights
        new_mean = z.mean()
        if new_mean != 0:  # A1111 divides unguarded; a zero mean (untrained encoders) would give inf
            z = z * (original_mean / new_mean)
    else:
        key = ("empty", clip_skip)
        if _empty is None or key not in _empty:
            empty_ids = [_token_ids(tok, [])[0] for tok in _tokenizers(pipe)]
            empty = _encode_ids(pipe, empty_ids, device, clip_skip).embeds
            if _empty is not None:
                _empty[key] = empty
        else:
            empty = _empty[key]
        z = torch.where(weights != 1.0, empty + (z - empty) * weights, z)  # as ComfyUI: weight-1 tokens untouched
    return _Encoded(z, encoded.pooled)


def _check_inputs(prompt, negative_prompt, num_inference_steps, weight_mode, num_images_per_prompt,
                  pipe_kwargs) -> tuple[list[DFPrompt], list[str] | None]:
    if weight_mode not in WEIGHT_MODES:
        raise ValueError(f"weight_mode must be one of {', '.join(WEIGHT_MODES)}, got {weight_mode!r}")
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
    if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
            or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
    for name in ("prompt_embeds", "negative_prompt_embeds", "callback_on_step_end", "timesteps", "sigmas"):
        if pipe_kwargs.get(name) is not None:
            raise ValueError(f"{name} cannot be combined with DF-Prompts: the renderer sets it")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
    parsed = []
    for k, text in enumerate(prompts):
        try:
            parsed.append(parse(text))
        except ValueError as e:
            raise ValueError(f"prompt {k}: {e}") from e
    negatives = None
    if negative_prompt is not None:
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts")
    return parsed, negatives


@torch.no_grad()
def generate_dfprompt(
    pipe,
    prompt: str | list[str],
    *,
    negative_prompt: str | list[str] | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    weight_mode: str = "a1111",
    num_images_per_prompt: int = 1,
    clip_skip: int | None = None,
    **pipe_kwargs,
):
    """Run `pipe` with DF-Prompts; returns the pipeline's own output (`.images`).

    Args:
        pipe: a diffusers `StableDiffusionPipeline` or `StableDiffusionXLPipeline` (or a sibling whose
            `callback_on_step_end` may replace `prompt_embeds`).
        prompt: one DF-Prompt or a list (a batch). Plain prompts work too.
        negative_prompt: plain text, one for all or one per prompt (DF blocks are not scheduled here).
        num_inference_steps: N, the steps the schedule is computed for.
        guidance_scale: classifier-free guidance scale (<= 1 disables CFG).
        weight_mode: `a1111` (multiply and rescale to the original mean; PAE) or `comfy` (`empty + (z-empty)*w`).
        num_images_per_prompt: images per prompt.
        clip_skip: as the pipeline's `clip_skip`.
        **pipe_kwargs: passed on (`generator`, `height`, `width`, `output_type`, ...).
    """
    # 1. Check inputs (every prompt parses before anything runs)
    prompts, negatives = _check_inputs(prompt, negative_prompt, num_inference_steps, weight_mode,
                                       num_images_per_prompt, pipe_kwargs)
    device = pipe._execution_device
    sdxl = _is_sdxl(pipe)

    # 2. Schedule: the segments of every image's prompt (images of one prompt share them)
    schedules = [schedule(p, num_inference_steps) for p in prompts for _ in range(num_images_per_prompt)]

    # 3. Encode each distinct segment once
    cache: dict[tuple, _Encoded] = {}
    empty: dict = {}
    for segments in schedules:
        for seg in segments:
            if seg.chunks not in cache:
                cache[seg.chunks] = encode_segment(pipe, seg, weight_mode=weight_mode, device=device,
                                                   clip_skip=clip_skip, _empty=empty)

    # 4. Negative embeddings: the pipeline's own encoding, one per image (None: the pipeline's default,
    #    "" for SD, zeros for SDXL with force_zeros_for_empty_prompt)
    neg_texts = [n for n in (negatives or [None] * len(prompts)) for _ in range(num_images_per_prompt)]
    neg_cache: dict[str | None, tuple] = {}
    for text in neg_texts:
        if text not in neg_cache:
            if sdxl:
                _, neg, _, neg_pooled = pipe.encode_prompt(
                    "", device=device, num_images_per_prompt=1, do_classifier_free_guidance=True,
                    negative_prompt=text, clip_skip=clip_skip)
                neg_cache[text] = (neg, neg_pooled)
            else:
                _, neg = pipe.encode_prompt("", device, 1, True, negative_prompt=text, clip_skip=clip_skip)
                neg_cache[text] = (neg, None)
    negative_embeds = torch.cat([neg_cache[t][0] for t in neg_texts])
    negative_pooled = torch.cat([neg_cache[t][1] for t in neg_texts]) if sdxl else None

    # 5. Per-step conditioning: one batch tensor per distinct combination of segments, shared by reference
    def segment_at(segments: list[Segment], i: int) -> Segment:
        return next(s for s in segments if s.first_step <= i <= s.last_step)

    per_step: list[dict[str, torch.Tensor]] = []
    combos: dict[tuple, dict[str, torch.Tensor]] = {}
    for i in range(num_inference_steps):
        key = tuple(segment_at(segments, i).chunks for segments in schedules)
        if key not in combos:
            positive = torch.cat([cache[k].embeds for k in key])
            entry = {"positive": positive, "cfg": torch.cat([negative_embeds, positive])}
            if sdxl:
                pooled = torch.cat([cache[k].pooled for k in key])
                entry.update(pooled=pooled, pooled_cfg=torch.cat([negative_pooled, pooled]))
            combos[key] = entry
        per_step.append(combos[key])

    # 6. Switch at the end of step i to the conditioning of step i+1 (the same object within a segment)
    def switch_conditioning(pipeline, i: int, t, callback_kwargs: dict) -> dict:
        if i + 1 >= len(per_step) or per_step[i + 1] is per_step[i]:
            return {}
        nxt = per_step[i + 1]
        cfg = pipeline.do_classifier_free_guidance
        out = {"prompt_embeds": nxt["cfg"] if cfg else nxt["positive"]}
        if sdxl:
            out["add_text_embeds"] = nxt["pooled_cfg"] if cfg else nxt["pooled"]
        return out

    switches = len(combos) > 1
    tensor_inputs = ["prompt_embeds", "add_text_embeds"] if sdxl else ["prompt_embeds"]
    extra = {"pooled_prompt_embeds": per_step[0]["pooled"],
             "negative_pooled_prompt_embeds": negative_pooled} if sdxl else {}

    # 7. Run the pipeline with the first step's conditioning
    return pipe(
        prompt_embeds=per_step[0]["positive"], negative_prompt_embeds=negative_embeds,
        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, num_images_per_prompt=1,
        callback_on_step_end=switch_conditioning if switches else None,
        callback_on_step_end_tensor_inputs=tensor_inputs if switches else ["latents"],
        **extra, **pipe_kwargs,
    )
