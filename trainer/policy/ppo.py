"""PPO with image (or text) rewards: Promptist stage 2, one compact loop that reads top to bottom.

    rollout (diverse beam search, one candidate at random per prompt)
    -> reward (images of the rewrite vs the plain prompt, or a text function)
    -> token rewards (-beta * KL to the frozen SFT reference, the reward at the last token)
    -> GAE -> PPO epochs (clipped policy and value losses) -> log / checkpoint / callback

The recipe is LMOps' run (see ../shared/TRAINERS.md §3): 16 groups x 1 beam, diversity penalty 1.0,
`max_new_tokens` drawn from [15, 75] per batch, beta 0.2 fixed (what the reference effectively ran),
gamma 1, lambda 0.95, clip 0.2, value clip 0.2, vf_coef 2.3, 4 epochs, AdamW 5e-5 betas (0.9, 0.95), the
top 2 blocks trained. Fixed here: the embeddings are frozen with the lower blocks (the reference's drifted),
dropout is off, advantages are whitened over real tokens of all ranks, the adaptive KL controller (an
option) is fed the KL to the reference, and every random choice comes from (seed, iteration, rank).

    python -m trainer ppo --prompts prompts.txt --policy my-sft --text-reward my_rewards:score --out my-ppo
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from promptist_core.dfprompt import MAX_STEPS
from promptist_core.generators import MAX_GUIDANCE, MAX_IMAGE_SIDE
from promptist_core.optimizer import REPHRASE_SUFFIX

from ..checkpoint import (
    check_resume_settings,
    counter_generator,
    list_checkpoints,
    load_extra,
    publish_model_files,
    restore_training_state,
    resume_checkpoint,
    save_checkpoint,
)
from ..config import ConfigError, check_bounds, config_to_dict, option
from ..progress import StepCallback, StopTraining, stop_requested
from ..runtime import PRECISIONS, Runtime, adamw, local_runtime
from ..training_log import CURVES_FILE, TrainingLog
from .rewards import BaselineCache, RewardFunction
from .sft import context_length, load_trainable_policy, micro_batches

logger = logging.getLogger(__name__)

ROLLOUTS = ("beam", "sample")
ADVANTAGES = ("gae", "rloo")
KL_CONTROLLERS = ("fixed", "adaptive")
LOG_COLUMNS = ("reward", "reward_aes", "reward_rel", "reward_pick", "kl", "beta", "approx_kl", "clip_frac",
               "entropy", "policy_loss", "value_loss", "explained_var", "response_len", "baseline_hits",
               "valid_reward", "valid_win")
DF_COLUMNS = ("kl_weight", "kl_range", "modifiers", "mean_weight")
RESUME_FIXED = ("prompts", "policy", "seed", "batch_size", "column", "dfprompt", "keep_prompt", "no_repeat_ngram_size")
PRESETS = ("auto", "promptist", "pae")


@dataclass
class PPOConfig:
    """PPO against image (or text) rewards (Promptist stage 2). Defaults are the reference run's."""

    prompts: str | None = option(None, "Plain prompts to train on (.txt one per line, .csv/.jsonl/.parquet).")
    column: str = option("prompt", "The csv/tsv column, jsonl field or parquet column of `prompts`.")
    policy: str | None = option(None, "The SFT policy to start from and to stay near (folder, name or Hub id).")
    out: str | None = option(None, "Output folder: ends as the trained policy's model folder, with checkpoints/, "
                             "train_log.csv, samples.jsonl and curves.png.")
    iterations: int = option(1000, "PPO iterations (rollout batch + 4 epochs each).", low=1, high=10_000_000)
    batch_size: int = option(8, "Prompts per rollout batch on each device (reference: 8 x 32 GPUs = 256).",
                             low=1, high=1024)
    minibatch_size: int = option(0, "Prompts per PPO minibatch; 0 = the whole rollout batch (the reference).",
                                 low=0, high=1024)
    ppo_epochs: int = option(4, "Passes over each rollout batch.", low=1, high=100)
    lr: float = option(5e-5, "AdamW learning rate (constant, as in the reference).",
                       low=0, high=1, above=True)
    adam_beta1: float = option(0.9, "AdamW beta1.", low=0, high=0.9999)
    adam_beta2: float = option(0.95, "AdamW beta2 (reference: 0.95).", low=0, high=0.999999)
    weight_decay: float = option(0.0, "AdamW weight decay (the reference meant 1e-6 and ran torch's 0.01 by mistake).",
                                 low=0, high=1)
    grad_clip: float = option(0.0, "Clip the gradient norm to this; 0 = off, as in the reference (1.0 is safer).",
                              low=0, high=1e6)
    trainable_top_blocks: int = option(2, "Train only the top N transformer blocks and the final norm, embeddings "
                                       "frozen (reference: 2); 0 = train everything.", low=0, high=1000)
    beta: float = option(0.2, "KL penalty coefficient toward the SFT reference (reference: 0.2, effectively fixed).",
                         low=0, high=1000)
    kl_controller: str = option("fixed", "fixed beta, or adaptive (Ziegler et al.) toward `kl_target`.",
                                choices=KL_CONTROLLERS)
    kl_target: float = option(6.0, "Adaptive controller: target KL to the reference, in nats per rewrite.",
                              low=0, high=1e6, above=True)
    kl_horizon: int = option(10000, "Adaptive controller: horizon in rewrites.", low=1, high=1_000_000_000)
    advantage: str = option("gae", "gae: a value model and GAE (the reference); rloo: no value model, each "
                            "rewrite's reward minus the mean of its prompt's other rewrites (less memory).",
                            choices=ADVANTAGES)
    rloo_samples: int = option(4, "rloo: rewrites per prompt (at least 2; distinct beam candidates or samples).",
                               low=2, high=64)
    gamma: float = option(1.0, "GAE discount.", low=0, high=1)
    lam: float = option(0.95, "GAE lambda.", low=0, high=1)
    clip_range: float = option(0.2, "PPO ratio clip.", low=0, high=10, above=True)
    value_clip_range: float = option(0.2, "Value prediction clip around the rollout's values.",
                                     low=0, high=1e6, above=True)
    vf_coef: float = option(2.3, "Value loss weight (reference: 2.3).", low=0, high=1e6)
    rollout: str = option("beam", "beam: diverse beam search, one candidate at random (the reference); "
                          "sample: top-k/top-p sampling (on-policy).", choices=ROLLOUTS)
    num_beam_groups: int = option(16, "Beam rollouts: groups of one beam each (reference: 16).",
                                  low=1, high=64)
    diversity_penalty: float = option(1.0, "Beam rollouts: penalty on tokens earlier groups chose (reference: 1.0).",
                                      low=0, high=1e6)
    top_k: int = option(0, "Sample rollouts: top-k (0 = off).", low=0, high=1_000_000)
    top_p: float = option(1.0, "Sample rollouts: nucleus probability.", low=0, high=1, above=True)
    min_new_tokens: int = option(15, "Rewrite length limit is drawn per batch from [min_new_tokens, max_new_tokens].",
                                 low=1, high=512)
    max_new_tokens: int = option(75, "Upper end of the per-batch length limit (reference: 75).",
                                 low=1, high=512)
    keep_prompt: bool | None = option(None, "Rollouts start with the plain prompt verbatim and the policy writes only "
                                      "what follows (trained and KL-penalised on those tokens alone); empty: the "
                                      "policy's own setting (on for the bundled policy, off for microsoft/Promptist).")
    no_repeat_ngram_size: int | None = option(None, "Rollouts never repeat an n-gram of the written tokens (0 = off); "
                                              "empty: the policy's own setting (3 for the bundled policy).",
                                              low=0, high=64)
    reference_device: str = option("same", "Where the frozen reference runs: same (as the policy) or cpu (saves VRAM).",
                                   choices=("same", "cpu"))
    save_every: int = option(50, "Checkpoint every this many iterations (and at the end and on stop).",
                             low=0, high=10_000_000)
    keep_checkpoints: int = option(2, "Newest checkpoints kept.", low=1, high=1000)
    sample_every: int = option(10, "Write the batch's (plain, rewrite, reward) rows to samples.jsonl this often.",
                               low=0, high=10_000_000)
    seed: int = option(0, "Seed of prompt order, rollout lengths, candidate picks and image seeds.",
                       low=0, high=2**32 - 1)
    device: str = option("auto", "auto, gpu, cpu or a torch device.")
    precision: str = option("auto", "auto (bf16/fp16 autocast on GPU, fp32 on CPU), fp32, bf16, fp16.",
                            choices=PRECISIONS)
    tensorboard: bool = option(True, "Also write TensorBoard events (when tensorboard is installed).")
    # image reward (ignored with a text reward)
    sd: str | None = option(None, "Stable Diffusion for image rewards: a diffusers folder, a Hub id, or a single "
                            ".safetensors checkpoint.")
    sd_config: str | None = option(None, "A local diffusers folder of the same architecture as a single-file `sd` "
                                   "checkpoint, so it loads offline.")
    text_reward: str | None = option(None, "Instead of images: module:function, f(plains, rewrites) -> rewards.")
    preset: str = option("auto", "Reward preset: promptist (aesthetic delta + relevance), pae (aesthetic + "
                         "relevance + PickScore), or auto: pae with `dfprompt`, else promptist.", choices=PRESETS)
    cosine_floor: float | None = option(0.0, "Clamp the CLIP cosine at this before the relevance term (LMOps' code "
                                        "clamps at 0; the paper's formula has no clamp: empty).",
                                        low=-1, high=1)
    images_per_prompt: int = option(2, "Images per prompt, the plain prompt's with the same seeds (code: 2, paper: 3).",
                                    low=1, high=64)
    image_steps: int = option(20, "Sampling steps per image (DPM-Solver++).", low=1, high=MAX_STEPS)
    guidance: float = option(7.5, "Classifier-free guidance scale.", low=0, high=MAX_GUIDANCE)
    width: int = option(512, "Image width.", low=8, high=MAX_IMAGE_SIDE)
    height: int = option(512, "Image height.", low=8, high=MAX_IMAGE_SIDE)
    clip_model: str = option("ViT-L-14/openai", "CLIP for relevance and aesthetics.")
    aesthetic_head: str = option("improved", "LAION aesthetic head: improved, laion-v1, or a file.")
    pick_model: str | None = option(None, "PickScore model (the pae preset loads the default when empty).")
    # validation (image rewards only): plain vs the current policy on fixed prompts and seeds
    valid_every: int = option(50, "Validate at iteration 0, every this many iterations and at the end: plain vs the "
                              "current policy on `valid_prompts`, the same seeds each time, by `trainer evaluate`'s "
                              "evaluation; grids in samples/iter-NNNNNN/, valid_reward in the log. 0 = off. Text "
                              "rewards have no images: no validation.", low=0, high=10_000_000)
    valid_prompts: str = option("coco", "Validation prompts: coco (the shipped held-out COCO val2017 captions), "
                                "diffusiondb, or a prompt file; the first `valid_count` are used.")
    valid_count: int = option(8, "Validation prompts used.", low=1, high=10_000)
    valid_seeds: int = option(1, "Validation images per prompt (seeds derived from `seed`, shared by both variants).",
                              low=1, high=64)
    keep_best_valid: bool = option(False, "Also keep the policy with the best held-out reward in best/ (the "
                                   "iteration-0 SFT policy included), with best/valid.json.")
    # DF-Prompt policy (PAE stage 2)
    dfprompt: bool = option(False, "Train a DF-Prompt policy: at each modifier's end the weight and range heads "
                            "sample a class too (one joint action, each part's ratio clipped); the reward sees "
                            "the DF-Prompt. Start from `sft --dfprompt-heads true` (new heads otherwise).")
    beta_weight: float = option(0.02, "DF-Prompt: KL coefficient of the weight head toward the reference's "
                                "(exact categorical KL; PAE: 0.02).", low=0, high=1000)
    beta_range: float = option(0.02, "DF-Prompt: KL coefficient of the range head (PAE: 0.02).",
                               low=0, high=1000)
    head_entropy: float = option(0.05, "DF-Prompt: bonus on the heads' entropy per decision (PAE: none). Their "
                                 "advantages are whitened, so it means the same for any reward scale; without it "
                                 "a head can settle on 1.25 before it ever draws 1.5 (the prior gives it 0.1%).",
                                 low=0, high=1000)
    head_lr: float | None = option(None, "DF-Prompt: AdamW learning rate of the two heads (empty: `lr`); tiny "
                                   "linear maps may take a larger one than the LM.",
                                   low=0, high=1, above=True)


@dataclass
class PPOResult:
    out: Path
    iterations: int
    reward: float | None
    kl: float | None
    model: object = None
    tokenizer: object = None


# --- models --------------------------------------------------------------------------------------

def freeze_below_top(trunk: nn.Module, top: int) -> None:
    """Train the top `top` blocks of a transformer trunk and its final norm only; embeddings and lower
    blocks are frozen (0: train everything)."""
    if top <= 0:
        return
    blocks = next((getattr(trunk, n) for n in ("h", "layers", "blocks") if isinstance(getattr(trunk, n, None),
                                                                                   nn.ModuleList)), None)
    if blocks is None:
        raise ConfigError(f"cannot find the transformer blocks of {type(trunk).__name__}; set trainable_top_blocks = 0")
    if top > len(blocks):
        raise ConfigError(f"trainable_top_blocks ({top}) exceeds the model's {len(blocks)} blocks")
    trunk.requires_grad_(False)
    blocks[-top:].requires_grad_(True)
    for name in ("ln_f", "norm", "final_layer_norm"):
        if isinstance(getattr(trunk, name, None), nn.Module):
            getattr(trunk, name).requires_grad_(True)


class ValueModel(nn.Module):
    """Its own trunk (a copy of the SFT trunk) and LMOps' head: Linear(d, 2d) -> ReLU -> Linear(2d, 1)."""

    def __init__(self, lm: nn.Module, seed: int):
        super().__init__()
        self.trunk = copy.deepcopy(lm.base_model)
        width = lm.get_output_embeddings().in_features
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.head = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, 1))
        torch.random.set_rng_state(generator_state)

    def forward(self, batch: dict, start: int, length: int) -> torch.Tensor:
        hidden = self.trunk(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            position_ids=batch["position_ids"], use_cache=False)[0]
        return self.head(hidden[:, start - 1:start - 1 + length]).squeeze(-1).float()


def response_hidden(lm: nn.Module, batch: dict, start: int, length: int) -> torch.Tensor:
    """The final hidden states that emit each response token, [B, R, d]."""
    hidden = lm.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"], use_cache=False)[0]
    return hidden[:, start - 1:start - 1 + length]


def response_logprobs(lm: nn.Module, batch: dict, start: int, length: int,
                      hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each response token and the entropy there, [B, R]: the LM head runs on the response
    positions only (`hidden`: their hidden states, when already computed)."""
    hidden = response_hidden(lm, batch, start, length) if hidden is None else hidden
    logits = lm.get_output_embeddings()(hidden).float()
    logp = F.log_softmax(logits, dim=-1)
    tokens = batch["input_ids"][:, start:start + length]
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def head_logprobs(logits: torch.Tensor, classes: torch.Tensor, decisions: torch.Tensor) -> torch.Tensor:
    """log_softmax(head)[sampled class] at the decision positions, 0 elsewhere, [B, R]. (PAE's code took the
    log-prob of fixed classes 2 and 1 here, whatever was sampled.)"""
    return F.log_softmax(logits.float(), -1).gather(-1, classes.unsqueeze(-1)).squeeze(-1) * decisions


def categorical_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Exact KL(policy || reference) of a head's distribution at every position, [B, R]."""
    logp, logq = F.log_softmax(logits.float(), -1), F.log_softmax(ref_logits.float(), -1)
    return (logp.exp() * (logp - logq)).sum(-1)


class Learner(nn.Module):
    """Policy, value model and (DF-Prompt) heads in one module, so data parallel wraps (and all-reduces)
    them at once. Returns token log-probs, entropy, values, and the heads' logits [B, R, C] or None."""

    def __init__(self, policy: nn.Module, value: ValueModel | None, heads: nn.Module | None = None):
        super().__init__()
        self.policy, self.value, self.heads = policy, value, heads

    def forward(self, batch: dict, start: int, length: int):
        hidden = response_hidden(self.policy, batch, start, length)
        logprobs, entropy = response_logprobs(self.policy, batch, start, length, hidden)
        values = self.value(batch, start, length) if self.value is not None else torch.zeros_like(logprobs)
        return logprobs, entropy, values, self.heads(hidden) if self.heads is not None else None


# --- rollouts ------------------------------------------------------------------------------------

@dataclass
class Rollout:
    prompt_ids: list[list[int]]
    responses: list[list[int]]  # generated tokens, ending with eos
    rewrites: list[str]
    max_new_tokens: int


def rollout(lm: nn.Module, tokenizer, prompts: Sequence[str], config: PPOConfig, *, iteration: int,
            rank: int, per_prompt: int = 1) -> Rollout:
    """`per_prompt` rewrites of each prompt (consecutive), drawn the reference's way (distinct diverse-beam
    candidates at random) or sampled, with their token ids."""
    from transformers import LogitsProcessorList

    from promptist_core.decoding_constraints import ConstraintProcessor, WrittenTokenConstraint
    from promptist_core.diverse_beam import diverse_beam_search
    from promptist_core.optimizer import forced_start, join_kept

    g = counter_generator(config.seed, iteration, rank)
    max_new = int(torch.randint(config.min_new_tokens, config.max_new_tokens + 1, (1,), generator=g))
    eos = tokenizer.eos_token_id
    room = context_length(lm) - max_new
    prompt_ids = [tokenizer(p + REPHRASE_SUFFIX, add_special_tokens=False)["input_ids"] for p in prompts]
    if config.keep_prompt:  # the policy's tokens start after the kept prompt: only they are trained and scored
        prompt_ids = [q + tokenizer(forced_start(p), add_special_tokens=False)["input_ids"]
                      for q, p in zip(prompt_ids, prompts, strict=True)]
    prompt_ids = [q[-room:] for q in prompt_ids]
    constraint = WrittenTokenConstraint(config.no_repeat_ngram_size or 0)
    width = max(map(len, prompt_ids))
    ids = torch.tensor([[eos] * (width - len(p)) + p for p in prompt_ids], device=next(lm.parameters()).device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=ids.device)
    with torch.inference_mode():
        if config.rollout == "beam":
            groups = config.num_beam_groups
            out = diverse_beam_search(lm, ids, mask, num_beams=groups, num_beam_groups=groups,
                                      diversity_penalty=config.diversity_penalty, num_return_sequences=groups,
                                      max_new_tokens=max_new, eos_token_id=eos, pad_token_id=eos,
                                      constraint=constraint).sequences
            picks = torch.stack([torch.randperm(groups, generator=g)[:per_prompt] for _ in prompts])
            chosen = out.view(len(prompts), groups, -1)[torch.arange(len(prompts))[:, None], picks].flatten(0, 1)
        else:
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
            devices = [ids.device] if ids.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                processors = [ConstraintProcessor(constraint, width)] if constraint.active else []
                chosen = lm.generate(ids, attention_mask=mask, do_sample=True, top_k=config.top_k,
                                     top_p=config.top_p, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=eos,
                                     num_return_sequences=per_prompt, logits_processor=LogitsProcessorList(processors))
    responses = []
    for row in chosen[:, width:].tolist():  # plain lists: nothing of inference mode reaches training
        responses.append(row[:row.index(eos) + 1] if eos in row else row + [eos])
    rewrites = [tokenizer.decode(r[:-1], skip_special_tokens=True).strip() for r in responses]
    if config.keep_prompt:
        rewrites = [join_kept(p, w) for p, w in zip(
            [p for p in prompts for _ in range(per_prompt)], rewrites, strict=True)]
    return Rollout([p for p in prompt_ids for _ in range(per_prompt)], responses, rewrites, max_new)


def rollout_batch(prompt_ids: list[list[int]], responses: list[list[int]], pad_id: int,
                  device: torch.device) -> tuple[dict, int, int, torch.Tensor]:
    """Prompts left-padded to one width, responses right-padded after them, so every response starts at
    the same column. Returns the batch, that column, the longest response and its mask [B, R]."""
    start, length = max(map(len, prompt_ids)), max(map(len, responses))
    rows, masks, response_mask = [], [], []
    for p, r in zip(prompt_ids, responses, strict=True):
        rows.append([pad_id] * (start - len(p)) + p + r + [pad_id] * (length - len(r)))
        masks.append([0] * (start - len(p)) + [1] * (len(p) + len(r)) + [0] * (length - len(r)))
        response_mask.append([1] * len(r) + [0] * (length - len(r)))
    ids, mask = torch.tensor(rows), torch.tensor(masks)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device)}
    return batch, start, length, torch.tensor(response_mask, dtype=torch.float32, device=device)


@dataclass
class ModifierActions:
    """The heads' part of a DF-Prompt rollout: where each modifier closes and the classes drawn there."""

    decisions: torch.Tensor  # [B, R] 1.0 at a modifier's closing token
    weights: torch.Tensor  # [B, R] long: weight class (0 where no decision)
    ranges: torch.Tensor  # [B, R] long: range class
    dfprompts: list[str]  # the plain prompt verbatim, then the modifiers with their weights and ranges


def sample_modifiers(plains: Sequence[str], responses: Sequence[Sequence[int]], tokenizer, heads,
                     w_logits: torch.Tensor, r_logits: torch.Tensor, generator: torch.Generator) -> ModifierActions:
    """Draw each modifier's weight and range from the heads at its closing token (their probabilities are
    the policy) and write the DF-Prompt the reward sees."""
    from promptist_core.dfprompt_policy import choose, compose, split_response

    decisions = torch.zeros(w_logits.shape[:2], device=w_logits.device)
    weights = torch.zeros(w_logits.shape[:2], dtype=torch.long, device=w_logits.device)
    ranges = torch.zeros_like(weights)
    texts = []
    for row, (plain, response) in enumerate(zip(plains, responses, strict=True)):
        pieces = split_response(plain, response, tokenizer)
        ends = [p.end for p in pieces if p.end is not None]
        choices = {}
        if ends:
            w, r = choose(w_logits[row, ends], r_logits[row, ends], "sample", generator)
            decisions[row, ends], weights[row, ends], ranges[row, ends] = 1.0, w, r
            choices = dict(zip(ends, zip(w.tolist(), r.tolist(), strict=True), strict=True))
        texts.append(compose(plain, pieces, choices, heads.weights, heads.ranges))
    return ModifierActions(decisions, weights, ranges, texts)


def reward_preset(config: PPOConfig) -> str:
    """The preset a config means: `auto` is PAE's for a DF-Prompt policy, Promptist's otherwise."""
    if config.preset != "auto":
        return config.preset
    return "pae" if config.dfprompt else "promptist"


# --- the maths (pure functions, tested against hand-computed values) ----------------------------

def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Advantages and returns [B, R]; positions where mask is 0 (after the response) contribute nothing."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, runtime: Runtime | None = None) -> torch.Tensor:
    """(x - mean) / std over the real tokens only (of every rank when data parallel)."""
    stats = torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).double()
    if runtime is not None:
        runtime.all_reduce_sum(stats)
    mean = stats[0] / stats[2]
    var = (stats[1] / stats[2] - mean * mean).clamp(min=0) * stats[2] / (stats[2] - 1).clamp(min=1)
    return ((x - mean) * torch.rsqrt(var + 1e-8)).float() * mask


def clipped_surrogate(logprobs, old_logprobs, advantages, mask, *, clip_range: float, normalizer: float):
    """PPO's clipped surrogate summed over `mask` and divided by `normalizer`, and the clipped count."""
    ratio = torch.exp(logprobs - old_logprobs)
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = (torch.maximum(pg_unclipped, pg_clipped) * mask).sum() / normalizer
    return loss, ((pg_clipped > pg_unclipped).float() * mask).sum().item()


def ppo_losses(logprobs, old_logprobs, advantages, values, old_values, returns, mask, *, clip_range: float,
               value_clip_range: float, normalizer: float):
    """Clipped surrogate and clipped value loss, summed over real tokens and divided by `normalizer`."""
    policy_loss, clipped = clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip_range=clip_range,
                                             normalizer=normalizer)
    values_clipped = old_values + (values - old_values).clamp(-value_clip_range, value_clip_range)
    value_loss = 0.5 * (torch.maximum((values - returns) ** 2, (values_clipped - returns) ** 2) * mask).sum() / normalizer
    stats = {"clip_frac": clipped,
             "approx_kl": ((old_logprobs - logprobs) * mask).sum().item()}
    return policy_loss, value_loss, stats


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """Each reward minus the mean of the other k - 1 rewards of the same prompt (consecutive groups of k)."""
    grouped = rewards.view(-1, k)
    return (grouped - (grouped.sum(1, keepdim=True) - grouped) / (k - 1)).reshape(-1)


def head_advantages(scores: torch.Tensor, k: int, runtime: Runtime | None = None) -> torch.Tensor:
    """Each rewrite's advantage for its weight and range choices [B]: the score alone, minus the mean score
    of the prompt's other k - 1 rewrites (rloo) or of the whole batch of every rank (k = 1), then whitened
    over the batch. A head's choice changes the DF-Prompt the reward sees and nothing else: no later token
    or state depends on it, so the token KL penalties (often far larger than the score's spread) are no
    part of its credit and would only add noise (that noise drowned the weight head's signal)."""
    if k > 1:
        centred = rloo_advantages(scores, k)
    else:
        stats = torch.stack([scores.sum(), torch.tensor(float(len(scores)), device=scores.device)]).double()
        if runtime is not None:
            runtime.all_reduce_sum(stats)
        centred = scores - (stats[0] / stats[1]).float()
    return masked_whiten(centred, torch.ones_like(centred), runtime)


def adaptive_beta(beta: float, kl_per_rewrite: float, rewrites: int, target: float, horizon: int) -> float:
    """Ziegler et al.'s proportional controller, fed the KL to the reference (not the drift from the
    rollout policy, which LMOps' code passed)."""
    error = max(-0.2, min(0.2, kl_per_rewrite / target - 1.0))
    return beta * (1.0 + error * rewrites / horizon)


# --- the loop ------------------------------------------------------------------------------------

def check_config(config: PPOConfig, runtime: Runtime | None = None) -> None:
    """Every setting, before any model loads (the command line calls it before the reward's models)."""
    if not config.out or not config.prompts or not config.policy:
        raise ConfigError("`prompts`, `policy` and `out` are required")
    check_bounds(config)  # every number finite and in its range (the fields' bounds)
    if config.max_new_tokens < config.min_new_tokens:
        raise ConfigError(f"need min_new_tokens <= max_new_tokens; got {config.min_new_tokens} and "
                          f"{config.max_new_tokens}")
    if config.minibatch_size and config.batch_size % config.minibatch_size:
        raise ConfigError(f"minibatch_size ({config.minibatch_size}) must divide batch_size ({config.batch_size})")
    if config.advantage == "rloo" and config.rollout == "beam" and config.rloo_samples > config.num_beam_groups:
        raise ConfigError(f"rloo_samples ({config.rloo_samples}) cannot exceed num_beam_groups ({config.num_beam_groups})")
    for name in ("width", "height"):
        if getattr(config, name) % 8:
            raise ConfigError(f"'{name}' must be a multiple of 8 between 8 and {MAX_IMAGE_SIDE}; "
                              f"got {getattr(config, name)}")


def policy_decoding(config: PPOConfig, models_dir=None):
    """The decoding the trained policy keeps (its folder's promptist.json): the base policy's, with this run's
    keep_prompt / no_repeat_ngram_size where set. Fills those two settings of `config` in."""
    from dataclasses import replace

    from promptist_core.policy_folder import read_decoding_defaults
    from promptist_core.weights import resolve

    decoding = read_decoding_defaults(resolve(config.policy, models_dir=models_dir))
    if config.keep_prompt is not None:
        decoding = replace(decoding, keep_prompt=config.keep_prompt)
    if config.no_repeat_ngram_size is not None:
        decoding = replace(decoding, no_repeat_ngram_size=config.no_repeat_ngram_size)
    config.keep_prompt, config.no_repeat_ngram_size = decoding.keep_prompt, decoding.no_repeat_ngram_size
    return decoding


def load_prompts(config: PPOConfig) -> list[str]:
    from .corpus import read_corpus

    return read_corpus(config.prompts, column=config.column).prompts


def check_prompts(prompts: Sequence[str], config: PPOConfig, world_size: int = 1) -> None:
    """Refuse prompts fewer than one rollout batch: every batch is rolled out whole (a smaller one would change
    the run's statistics and its resume), so the message says both ways out instead of shrinking the batch."""
    per_step = config.batch_size * world_size
    if len(prompts) < per_step:
        devices = f"{world_size} device{'s' if world_size > 1 else ''}"
        raise ConfigError(f"{config.prompts}: {len(prompts)} prompt{'s are' if len(prompts) != 1 else ' is'} fewer "
                          f"than one batch (batch_size {config.batch_size} x {devices}; a rollout batch is used whole): "
                          f"give at least {per_step} prompts, or set batch_size to "
                          f"{max(1, len(prompts) // world_size)}")


VALID_DIR = "samples"
BEST_DIR = "best"


class Validation:
    """Plain vs the current policy on fixed prompts and seeds, by `trainer.evaluate.evaluate` with the run's
    own image generator and scorer: `samples/iter-NNNNNN/` (grid.png, summary.json, results.csv,
    report.html) and the held-out reward (the run's preset total as the evaluation computes it: Promptist's
    aesthetic delta vs plain + relevance) with the policy's paired win rate over plain.

    It leaves the training as it found it: the policy's and heads' train/eval mode, the tokenizer (the
    evaluation rewrites with its own copy, left-padded), and every random generator (image seeds come from
    (seed, prompt, index), beam search draws nothing, and the global RNGs are forked around it), so a run
    with validation trains to the same weights as one without, and resumes bit-exactly."""

    def __init__(self, config: PPOConfig, reward, tokenizer, decoding, out: Path):
        from ..evaluate import read_prompts

        self.generator, self.scorer = reward.generator, reward.scorer
        self.steps, self.guidance, self.size = reward.steps, reward.guidance, tuple(reward.size)
        self.config, self.decoding, self.out = config, decoding, out
        self.prompts = read_prompts(config.valid_prompts, limit=config.valid_count)
        self.tokenizer = copy.deepcopy(tokenizer)
        preset = reward_preset(config)
        self.metric = f"total_{preset}"

    @staticmethod
    def applies(config: PPOConfig, reward) -> bool:
        return bool(config.valid_every) and all(hasattr(reward, a) for a in ("generator", "scorer", "steps", "size"))

    @staticmethod
    def due(config: PPOConfig, iteration: int) -> bool:
        return iteration == 0 or iteration % config.valid_every == 0 or iteration == config.iterations

    def __call__(self, iteration: int, policy: nn.Module, heads) -> dict:
        from promptist_core.optimizer import PromptOptimizer

        from ..evaluate import PLAIN, Variant, evaluate, write_outputs

        modes = [(m, m.training) for m in (policy, heads) if m is not None]
        device = next(policy.parameters()).device
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                optimizer = PromptOptimizer(policy, self.tokenizer, "policy", heads, decoding=self.decoding)
                variants = [Variant(PLAIN), Variant("policy", optimizer=optimizer,
                                                    options={"max_new_tokens": self.config.max_new_tokens})]
                result = evaluate(self.prompts, variants, self.generator, self.scorer, self.config.valid_seeds,
                                  seed=self.config.seed, steps=self.steps, guidance=self.guidance, size=self.size,
                                  metric="total_promptist", grid_prompts=len(self.prompts), device=str(device))
        finally:
            for module, training in modes:
                module.train(training)
        if self.metric in result.metrics:
            result.metric = self.metric
        result.settings["iteration"] = iteration
        write_outputs(result, self.out / VALID_DIR / f"iter-{iteration:06d}")
        summary = result.summary("policy")
        return {"valid_reward": summary.means[result.metric].mean,
                "valid_win": summary.win_vs_plain[result.metric].win_rate}


def train_ppo(
    config: PPOConfig,
    reward: RewardFunction,
    *,
    resume: bool = False,
    callback: StepCallback | None = None,
    runtime: Runtime | None = None,
    models_dir=None,
    baseline_cache: BaselineCache | None = None,
) -> PPOResult:
    """Run PPO iterations against `reward`; checkpoints and the output folder as the SFT trainer's.
    `baseline_cache` is the ImageReward's cache, saved with (and restored from) every checkpoint."""
    runtime = runtime or local_runtime(config.device, config.precision)
    check_config(config, runtime)
    out = Path(config.out).expanduser()
    checkpoints = list_checkpoints(out)
    if checkpoints and not resume:
        raise ConfigError(f"{out} already holds a run (checkpoint at iteration {checkpoints[-1].step}); pass --resume "
                          "to continue it, or choose another output folder")
    checkpoint = resume_checkpoint(out) if resume else None
    # 1. prompts (before the policy is looked for)
    prompts = load_prompts(config)
    check_prompts(prompts, config, runtime.world_size)
    decoding = policy_decoding(config, models_dir)  # before the resume check: it fills two settings in
    if checkpoint is not None:
        check_resume_settings(config, checkpoint, RESUME_FIXED)

    # 2. models: policy (from the checkpoint when resuming), value model, frozen SFT reference; dropout off
    torch.manual_seed(config.seed)
    reference, tokenizer = load_trainable_policy(config.policy, models_dir=models_dir)
    # DF-Prompt: the reference's heads (new, seeded ones when the policy has none) and the trained copy
    ref_heads = heads = None
    if config.dfprompt:
        from .sft import load_trainable_heads

        ref_heads = load_trainable_heads(config.policy, reference.get_output_embeddings().in_features,
                                         models_dir=models_dir)
        heads = load_trainable_heads(str(checkpoint.folder), 0, models_dir=models_dir, create=False) if checkpoint \
            else copy.deepcopy(ref_heads)
        if heads is None:
            raise ConfigError(f"{checkpoint.folder} holds no DF-Prompt heads: it is not a --dfprompt run")
        ref_heads.requires_grad_(False).eval()
    policy = load_trainable_policy(str(checkpoint.folder), models_dir=models_dir)[0] if checkpoint else \
        copy.deepcopy(reference)
    value = ValueModel(reference, config.seed) if config.advantage == "gae" else None
    if checkpoint is not None and value is not None:
        value.load_state_dict(load_extra(checkpoint, "value"))
    policy.requires_grad_(True)
    freeze_below_top(policy.base_model, config.trainable_top_blocks)  # the tied LM head freezes with the embeddings
    if value is not None:
        freeze_below_top(value.trunk, config.trainable_top_blocks)
        value.to(runtime.device).eval()
    reference.requires_grad_(False).eval()
    reference.to(torch.device("cpu") if config.reference_device == "cpu" else runtime.device)
    policy.to(runtime.device).eval()
    if heads is not None:
        heads.to(runtime.device).eval()
        ref_heads.to(next(reference.parameters()).device)
    learner = Learner(policy, value, heads)
    params = [p for p in learner.parameters() if p.requires_grad]
    groups = params
    if heads is not None:  # the heads in their own group (their own learning rate)
        head_ids = {id(p) for p in heads.parameters()}
        groups = [{"params": [p for p in params if id(p) not in head_ids]},
                  {"params": list(heads.parameters()), "lr": config.head_lr or config.lr}]
    optimizer = adamw(groups, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.weight_decay)

    # 3. state (restored when resuming)
    cache = baseline_cache if baseline_cache is not None else BaselineCache()
    state = {"trainer": "ppo", "step": 0, "cursor": {"epoch": 0, "index": 0}, "beta": config.beta,
             "best_valid": None}
    if checkpoint is not None:
        restore_training_state(checkpoint, optimizer)
        state.update({k: v for k, v in checkpoint.state.items() if k in state})
        cache.entries.update(checkpoint.state.get("baseline_cache", {}))
    wrapped = runtime.wrap(learner)
    log = TrainingLog(out, LOG_COLUMNS + (DF_COLUMNS if heads is not None else ()), tensorboard=config.tensorboard,
                      enabled=runtime.is_main,
                      resume_step=state["step"] if checkpoint else None)
    if runtime.is_main:
        _trim_samples(out, state["step"])
    per_step = config.batch_size * runtime.world_size
    stream = micro_batches([1] * len(prompts), per_step, config.seed, 1, state["cursor"], drop_last=True)
    pad_id = tokenizer.eos_token_id

    def save(iteration: int) -> None:
        if runtime.is_main:
            full = {**state, "config": config_to_dict(config), "baseline_cache": cache.entries}
            save_checkpoint(out, model=policy, tokenizer=tokenizer, optimizer=optimizer, state=full,
                            keep=config.keep_checkpoints, extra={"value": value.state_dict()} if value else None,
                            dfprompt_heads=heads, decoding=decoding)
            panels = {"reward": ("reward", "reward_aes", "reward_rel", "reward_pick", "valid_reward"),
                      "KL": ("kl", "approx_kl"),
                      "value loss": ("value_loss",)}
            if heads is not None:
                panels.update({"mean weight": ("mean_weight",), "head KL": ("kl_weight", "kl_range")})
            log.draw(panels, "PPO").save(out / CURVES_FILE)
        runtime.barrier()

    validation = Validation(config, reward, tokenizer, decoding, out) \
        if runtime.is_main and Validation.applies(config, reward) else None

    def validate(iteration: int) -> dict:
        """The held-out numbers at `iteration` (main rank; the others wait), and best/ when they are the best."""
        found = {}
        if not (Validation.applies(config, reward) and Validation.due(config, iteration)):
            return found
        if validation is not None:
            found = validation(iteration, policy, heads)
            best = state["best_valid"]
            if config.keep_best_valid and (best is None or found["valid_reward"] > best["valid_reward"]):
                from promptist_core.policy_folder import save_policy_folder

                save_policy_folder(policy, tokenizer, out / BEST_DIR, dfprompt_heads=heads, decoding=decoding)
                state["best_valid"] = {"iteration": iteration, **found}
                (out / BEST_DIR / "valid.json").write_text(json.dumps(state["best_valid"], indent=1) + "\n",
                                                           encoding="utf-8")
        runtime.barrier()
        return found

    if state["step"] == 0 and Validation.applies(config, reward):  # the SFT policy's baseline
        log.log(0, validate(0))

    saved_at, metrics = state["step"], {}
    while state["step"] < config.iterations:
        iteration = state["step"]
        # 4. rollout: this rank's share of the batch
        clock = time.perf_counter()
        indices = next(stream)[runtime.rank::runtime.world_size]
        plains = [prompts[i] for i in indices]
        k = config.rloo_samples if config.advantage == "rloo" else 1
        batch_rollout = rollout(policy, tokenizer, plains, config, iteration=iteration, rank=runtime.rank, per_prompt=k)
        plains = [p for p in plains for _ in range(k)]

        # 5. log-probs, reference log-probs and values of the rollout (no grad); a DF-Prompt policy's heads
        #    draw each modifier's weight and range here, and the DF-Prompt is what the reward sees
        batch, start, length, mask = rollout_batch(batch_rollout.prompt_ids, batch_rollout.responses, pad_id,
                                                   runtime.device)
        rewrites = batch_rollout.rewrites
        with torch.no_grad(), runtime.autocast():
            old_logprobs, _, old_values, head_logits = learner(batch, start, length)
            ref_batch = {k: v.to(next(reference.parameters()).device) for k, v in batch.items()}
            ref_hidden = response_hidden(reference, ref_batch, start, length)
            ref_logprobs = response_logprobs(reference, ref_batch, start, length, ref_hidden)[0].to(runtime.device)
            if heads is not None:
                ref_w_logits, ref_r_logits = (x.to(runtime.device) for x in ref_heads(ref_hidden))
        if heads is not None:
            acts = sample_modifiers(plains, batch_rollout.responses, tokenizer, heads, *head_logits,
                                    counter_generator(config.seed, iteration, runtime.rank, 1))
            rewrites = acts.dfprompts
            old_w = head_logprobs(head_logits[0], acts.weights, acts.decisions)
            old_r = head_logprobs(head_logits[1], acts.ranges, acts.decisions)
            kl_weight = categorical_kl(head_logits[0], ref_w_logits) * acts.decisions
            kl_range = categorical_kl(head_logits[1], ref_r_logits) * acts.decisions

        # 6. reward of each rewrite
        seconds = {"seconds_rollout": time.perf_counter() - clock}
        clock = time.perf_counter()
        scored = reward(plains, rewrites)
        seconds["seconds_reward"] = time.perf_counter() - clock
        clock = time.perf_counter()
        scores = torch.tensor(scored.total, dtype=torch.float32, device=runtime.device)

        # 7. token rewards: -beta * KL to the reference; the score at the last token (the eos). GAE on them,
        #    or (rloo) each rewrite's whole reward minus the mean of its prompt's other rewrites. The heads'
        #    choices get the score's advantage only (`head_advantages`); their KLs are exact, in the loss
        kl_tokens = (old_logprobs - ref_logprobs) * mask
        kl_penalty = state["beta"] * kl_tokens
        if heads is not None:
            head_adv = head_advantages(scores, k, runtime)[:, None] * acts.decisions
        if config.advantage == "gae":
            token_rewards = -kl_penalty
            last = mask.sum(1).long() - 1
            token_rewards[torch.arange(len(plains)), last] += scores
            advantages, returns = gae(token_rewards, old_values, mask, config.gamma, config.lam)
            advantages = masked_whiten(advantages, mask, runtime)
        else:
            advantages = rloo_advantages(scores - kl_penalty.sum(1), k)[:, None] * mask
            returns = torch.zeros_like(mask)

        # 8. PPO epochs over minibatches
        size = (config.minibatch_size or config.batch_size) * k
        totals = {"policy_loss": 0.0, "value_loss": 0.0, "clip_frac": 0.0, "approx_kl": 0.0, "entropy": 0.0}
        updates, token_count = 0, 0.0
        for epoch in range(config.ppo_epochs):
            order = torch.randperm(len(plains), generator=counter_generator(config.seed, iteration, epoch)).tolist()
            for first in range(0, len(order), size):
                rows = torch.tensor(order[first:first + size], device=runtime.device)
                sub = {k: v[rows] for k, v in batch.items()}
                sub_mask = mask[rows]
                normalizer = runtime.all_reduce_sum(sub_mask.sum().detach().clone()).item() / runtime.world_size
                with runtime.autocast():
                    logprobs, entropy, values, logits = wrapped(sub, start, length)
                policy_loss, value_loss, stats = ppo_losses(
                    logprobs, old_logprobs[rows], advantages[rows], values, old_values[rows], returns[rows], sub_mask,
                    clip_range=config.clip_range, value_clip_range=config.value_clip_range, normalizer=normalizer)
                if heads is not None:  # the joint action's other two parts: each ratio clipped on its own, and
                    # each head's exact KL to the reference's at the same decisions (its gradient is exact; as a
                    # reward term it would not depend on the class drawn and would not hold the head back)
                    decisions = acts.decisions[rows]
                    per_decision = max(runtime.all_reduce_sum(decisions.sum().detach().clone()).item()
                                       / runtime.world_size, 1.0)
                    for head, classes, old, ref, beta in (
                            (logits[0], acts.weights, old_w, ref_w_logits, config.beta_weight),
                            (logits[1], acts.ranges, old_r, ref_r_logits, config.beta_range)):
                        head_loss, _ = clipped_surrogate(
                            head_logprobs(head, classes[rows], decisions), old[rows], head_adv[rows], decisions,
                            clip_range=config.clip_range, normalizer=per_decision)
                        kl_loss = (categorical_kl(head, ref[rows]) * decisions).sum() / per_decision
                        logp = F.log_softmax(head.float(), -1)
                        entropy_ = (-(logp.exp() * logp).sum(-1) * decisions).sum() / per_decision
                        policy_loss = policy_loss + head_loss + beta * kl_loss - config.head_entropy * entropy_
                (policy_loss + config.vf_coef * value_loss).backward()
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                totals["policy_loss"] += policy_loss.item()
                totals["value_loss"] += value_loss.item()
                totals["clip_frac"] += stats["clip_frac"]
                totals["approx_kl"] += stats["approx_kl"]
                totals["entropy"] += (entropy.detach() * sub_mask).sum().item()
                token_count += sub_mask.sum().item()
                updates += 1

        seconds["seconds_learner"] = time.perf_counter() - clock

        # 9. statistics over all ranks, the KL controller, log, checkpoint, callback
        n_local = float(len(plains))
        sums = torch.tensor([scores.sum().item(), kl_tokens.sum().item(), mask.sum().item(), n_local,
                             ((returns - old_values) * mask).pow(2).sum().item(),
                             ((returns - (returns * mask).sum() / mask.sum()) * mask).pow(2).sum().item()],
                            dtype=torch.float64, device=runtime.device)
        runtime.all_reduce_sum(sums)
        n_rewrites = sums[3].item()
        metrics = {"reward": sums[0].item() / n_rewrites, "kl": sums[1].item() / n_rewrites, "beta": state["beta"],
                   "response_len": sums[2].item() / n_rewrites,
                   "policy_loss": totals["policy_loss"] / updates, "value_loss": totals["value_loss"] / updates,
                   "clip_frac": totals["clip_frac"] / token_count, "approx_kl": totals["approx_kl"] / token_count,
                   "entropy": totals["entropy"] / token_count,
                   "baseline_hits": cache.hits, **seconds}
        if config.advantage == "gae":
            metrics["explained_var"] = 1.0 - sums[4].item() / max(sums[5].item(), 1e-8)
        if heads is not None:
            chosen = torch.tensor(heads.weights, device=runtime.device)[acts.weights]
            df = torch.tensor([kl_weight.sum().item(), kl_range.sum().item(), acts.decisions.sum().item(),
                               (chosen * acts.decisions).sum().item()], dtype=torch.float64, device=runtime.device)
            runtime.all_reduce_sum(df)
            metrics.update({"kl_weight": df[0].item() / n_rewrites, "kl_range": df[1].item() / n_rewrites,
                            "modifiers": df[2].item() / n_rewrites,
                            "mean_weight": df[3].item() / max(df[2].item(), 1.0)})
        for name, values_ in scored.terms.items():
            metrics[f"reward_{name}"] = sum(values_) / len(values_)
        if config.kl_controller == "adaptive":
            state["beta"] = adaptive_beta(state["beta"], metrics["kl"], int(n_rewrites), config.kl_target,
                                          config.kl_horizon)
        state["step"] = iteration = iteration + 1
        metrics.update(validate(iteration))
        log.log(iteration, metrics)
        if runtime.is_main and config.sample_every and iteration % config.sample_every == 0:
            _write_samples(out, iteration, plains, rewrites, scored)
        if config.save_every and iteration % config.save_every == 0:
            save(iteration)
            saved_at = iteration

        if stop_requested(callback, iteration, config.iterations, metrics, runtime):
            if saved_at != iteration:
                save(iteration)
            log.close()
            raise StopTraining.saved(f"iteration {iteration}", out / "checkpoints")

    # 10. the output folder: the last policy
    if saved_at != state["step"]:
        save(state["step"])
    if runtime.is_main:
        publish_model_files(list_checkpoints(out)[-1].folder, out)
    runtime.barrier()
    log.close()
    return PPOResult(out, state["step"], metrics.get("reward"), metrics.get("kl"), policy, tokenizer)


def _trim_samples(out: Path, step: int) -> None:
    """Drop the samples.jsonl rows of iterations after `step` (the checkpoint resumed, 0 for a run that starts
    over): a process killed after writing them would otherwise leave them twice in the file."""
    path = out / "samples.jsonl"
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            if json.loads(line)["iteration"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):  # a row cut short by the kill
            continue
    if kept != lines:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)


def _write_samples(out: Path, iteration: int, plains, rewrites, scored) -> None:
    with open(out / "samples.jsonl", "a", encoding="utf-8") as f:
        for i, (plain, rewrite) in enumerate(zip(plains, rewrites, strict=True)):
            row = {"iteration": iteration, "plain": plain, "rewrite": rewrite, "reward": scored.total[i],
                   **{name: values[i] for name, values in scored.terms.items()}}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
