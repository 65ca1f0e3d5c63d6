"""Supervised fine-tuning of a prompt policy on (plain, engineered) pairs: Promptist stage 1.

Each pair is one sequence `source + " Rephrase:"` then `" " + target + eos`, exactly what
`PromptOptimizer` feeds and expects at inference; the loss is on the target tokens and the eos only.
The loop reads top to bottom: data -> model -> optimizer (resumed if asked) -> steps (gradient
accumulation, clipping, validation, checkpoints, the step callback) -> the output folder.

    python -m trainer sft --pairs pairs.jsonl --base gpt2 --out models/promptist/my-policy
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from promptist_core.optimizer import REPHRASE_SUFFIX
from promptist_core.policy_folder import read_decoding_defaults, save_policy_folder
from promptist_core.weights import resolve

from ..checkpoint import (
    check_resume_settings,
    list_checkpoints,
    publish_model_files,
    restore_training_state,
    resume_checkpoint,
    save_checkpoint,
)
from ..config import ConfigError, check_bounds, config_to_dict, option
from ..progress import StepCallback, StopTraining, stop_requested
from ..runtime import PRECISIONS, Runtime, adamw, local_runtime, optimizer_step, step_plan
from ..training_log import CURVES_FILE, TrainingLog
from .pairs import Pair, make_pairs, read_pairs

logger = logging.getLogger(__name__)

IGNORE = -100
LR_SCHEDULES = ("constant", "linear", "cosine")
SELECTIONS = ("best", "last", "step")
# Settings a resumed run must share with the run it continues, or it would not continue it exactly.
RESUME_FIXED = ("pairs", "corpus", "column", "base", "seed", "batch_size", "effective_batch_size", "max_length",
                "length_buckets", "valid_fraction", "mcm_per_target", "dfprompt_heads")


@dataclass
class SFTConfig:
    """Supervised fine-tuning (Promptist stage 1). Defaults follow the paper where it says."""

    pairs: str | None = option(None, "JSONL pairs from `python -m trainer pairs` (or give `corpus`).")
    corpus: str | None = option(None, "A prompt corpus to build mc + mcm pairs from on the fly, instead of `pairs`.")
    column: str = option("prompt", "The csv/tsv column, jsonl field or parquet column holding prompts in `corpus`.")
    base: str = option("openai-community/gpt2", "Model to start from: a folder, a name in models/promptist, or a "
                       "Hugging Face id (openai-community/gpt2, microsoft/Promptist).")
    out: str | None = option(None, "Output folder: ends as a model folder PromptOptimizer loads; also holds "
                             "checkpoints/, best/, last/, train_log.csv and curves.png.")
    max_steps: int = option(15000, "Optimizer steps (paper: 15k).", low=1, high=10_000_000)
    batch_size: int = option(16, "Pairs per forward pass on each device.", low=1, high=4096)
    effective_batch_size: int = option(256, "Pairs per optimizer step, by accumulation over micro-batches and "
                                       "devices (paper: 256); a multiple of batch_size x devices.",
                                       low=1, high=1 << 20)
    lr: float = option(5e-5, "Peak learning rate of AdamW (paper: 5e-5).", low=0, high=1, above=True)
    lr_schedule: str = option("linear", "After warmup: constant, linear decay to 0, or cosine decay to 0.",
                              choices=LR_SCHEDULES)
    warmup_steps: int = option(100, "Linear warmup steps from 0 to `lr`.", low=0, high=10_000_000)
    weight_decay: float = option(0.0, "AdamW weight decay on matrices (never on biases and norms).",
                                 low=0, high=1)
    adam_beta1: float = option(0.9, "AdamW beta1.", low=0, high=0.9999)
    adam_beta2: float = option(0.999, "AdamW beta2.", low=0, high=0.999999)
    adam_eps: float = option(1e-8, "AdamW epsilon.", low=0, high=1, above=True)
    grad_clip: float = option(1.0, "Clip the gradient norm to this after fp16 unscaling; 0 turns clipping off.",
                              low=0, high=1e6)
    max_length: int | None = option(None, "Longest pair in tokens (source, ' Rephrase:', target, eos); longer "
                                    "pairs are skipped and counted. Empty: the model's context.",
                                    low=2, high=1_000_000)
    length_buckets: int = option(32, "Batches drawn from one pool sorted by length, so pairs of similar length "
                                 "share a batch (less padding); 1 = plain random batches.",
                                 low=1, high=100_000)
    valid_fraction: float = option(0.02, "Share of targets held out for validation when the pairs carry no split.",
                                   low=0, high=0.99)
    mcm_per_target: int = option(1, "With `corpus`: main-content-plus-modifiers sources per target.",
                                 low=1, high=100)
    eval_every: int = option(500, "Validation loss every this many steps (and at the end); 0 = only at the end.",
                             low=0, high=10_000_000)
    save_every: int = option(500, "Checkpoint every this many steps (and at the end and on stop).",
                             low=0, high=10_000_000)
    keep_checkpoints: int = option(2, "Newest checkpoints kept in checkpoints/ (best/ and last/ are separate).",
                                   low=1, high=1000)
    select: str = option("best", "Weights the output folder holds at the end: best (lowest validation loss; the "
                         "paper keeps a slightly under-fitted one), last, or step (`select_step`).", choices=SELECTIONS)
    select_step: int = option(0, "With select = step: the checkpoint step to publish (kept from deletion).",
                              low=0, high=10_000_000)
    seed: int = option(0, "Seed of data order and dropout; the same seed gives the same run.",
                       low=0, high=2**32 - 1)
    device: str = option("auto", "auto, gpu, cpu or a torch device (data parallel runs use their rank's GPU).")
    precision: str = option("auto", "auto (bf16 or fp16 autocast on GPU, fp32 on CPU), fp32, bf16, fp16.",
                            choices=PRECISIONS)
    log_every: int = option(10, "Write the training loss to the log every this many steps.",
                            low=1, high=10_000_000)
    tensorboard: bool = option(True, "Also write TensorBoard events (when tensorboard is installed).")
    dfprompt_heads: bool = option(False, "Also train a DF-Prompt policy's weight and range heads (PAE stage 1): "
                                  "cross-entropy toward PAE's prior (68% weight 1.0 / range 0-1, 16% each "
                                  "neighbour) where each target modifier closes; the output is a DF-Prompt policy.")


@dataclass
class SFTResult:
    out: Path
    steps: int
    train_loss: float | None
    valid_loss: float | None
    best_step: int | None
    selected: str
    model: object = None  # the trained model (last weights), for hosts that hand it on
    tokenizer: object = None
    dfprompt_heads: object = None  # with `dfprompt_heads`: the weight and range heads (last weights)


# --- data ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Example:
    ids: tuple[int, ...]
    prompt_len: int  # tokens of `source Rephrase:`; the rest (target, eos) carries the loss
    decisions: tuple[int, ...] = ()  # DF-Prompt heads: indices in `ids` of the tokens closing a modifier

    @property
    def target_tokens(self) -> int:
        return len(self.ids) - self.prompt_len


def load_pairs(config: SFTConfig) -> tuple[list[Pair], list[Pair]]:
    """(train, valid) from `pairs`, or built from `corpus`."""
    if bool(config.pairs) == bool(config.corpus):
        raise ConfigError("give exactly one of `pairs` (a JSONL file) or `corpus` (a prompt file)")
    if config.pairs:
        pairs = read_pairs(config.pairs, seed=config.seed, valid_fraction=config.valid_fraction)
    else:
        from .corpus import read_corpus

        corpus = read_corpus(config.corpus, column=config.column)
        pairs, stats = make_pairs(corpus.prompts, seed=config.seed, mcm_per_target=config.mcm_per_target,
                                  valid_fraction=config.valid_fraction)
        logger.info("pairs from %s: %s", config.corpus, stats)
        if not pairs:
            raise ConfigError(f"{config.corpus}: no prompt has modifiers to learn from ({stats['skipped']})")
    return [p for p in pairs if p.split == "train"], [p for p in pairs if p.split == "valid"]


def encode_pairs(tokenizer, pairs: Sequence[Pair], max_length: int, *,
                 decisions: bool = False) -> tuple[list[Example], int]:
    """Token ids of each pair as the optimizer sees it; pairs longer than `max_length` are skipped.
    `decisions`: also where each target modifier closes (a DF-Prompt policy's decision points)."""
    eos = tokenizer.eos_token_id
    examples, skipped = [], 0
    prompts = tokenizer([p.source + REPHRASE_SUFFIX for p in pairs], add_special_tokens=False)["input_ids"] if pairs else []
    targets = tokenizer([" " + p.target for p in pairs], add_special_tokens=False)["input_ids"] if pairs else []
    for pair, prompt, target in zip(pairs, prompts, targets, strict=True):
        target = target + [eos]
        if len(prompt) + len(target) > max_length:
            skipped += 1
            continue
        ends = ()
        if decisions:
            from promptist_core.dfprompt_policy import split_response

            ends = tuple(len(prompt) + p.end for p in split_response(pair.source, target, tokenizer) if p.end is not None)
        examples.append(Example(tuple(prompt + target), len(prompt), ends))
    return examples, skipped


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, buckets: int,
                  drop_last: bool = False) -> list[list[int]]:
    """Batches of example indices for one epoch, a pure function of (seed, epoch): shuffle, sort each
    pool of `buckets` batches by length, cut into batches, shuffle the batches. `drop_last` leaves out
    the epoch's last, smaller batch (PPO wants every rollout batch full)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    pool = batch_size * max(buckets, 1)
    batches = []
    for start in range(0, len(order), pool):
        chunk = order[start:start + pool]
        if buckets > 1:
            chunk.sort(key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    if drop_last and len(batches) > 1 and len(batches[-1]) < batch_size:
        batches = [b for b in batches if len(b) == batch_size]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def micro_batches(lengths: Sequence[int], batch_size: int, seed: int, buckets: int,
                  cursor: dict, drop_last: bool = False) -> Iterator[list[int]]:
    """Endless micro-batches from `cursor` ({epoch, index}); the cursor is updated as they are taken."""
    while True:
        batches = epoch_batches(lengths, batch_size, seed, cursor["epoch"], buckets, drop_last)
        while cursor["index"] < len(batches):
            batch = batches[cursor["index"]]
            cursor["index"] += 1
            yield batch
        cursor["epoch"], cursor["index"] = cursor["epoch"] + 1, 0


def collate(examples: Sequence[Example], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Left-padded ids, mask, explicit position ids (GPT-2 in transformers 4.30 does not derive them
    from the mask) and labels that are IGNORE outside the target; with DF-Prompt decisions, `decisions`
    marks the hidden states that emit a modifier's closing token."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    mask = torch.zeros_like(ids)
    decisions = torch.zeros_like(ids, dtype=torch.bool)
    for row, e in enumerate(examples):
        start = width - len(e.ids)
        ids[row, start:] = torch.tensor(e.ids)
        mask[row, start:] = 1
        labels[row, start + e.prompt_len:] = torch.tensor(e.ids[e.prompt_len:])
        decisions[row, [start + d - 1 for d in e.decisions]] = True
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "labels": labels}
    if any(e.decisions for e in examples):
        batch["decisions"] = decisions
    return {k: v.to(device) for k, v in batch.items()}


# --- model ---------------------------------------------------------------------------------------

class TargetLoss(nn.Module):
    """Summed cross-entropy of the target tokens. The LM head runs only where a label is, not on every
    position (the prompt and the padding need no logits): less memory and time than the full logits.

    With DF-Prompt `heads`, it returns (token loss, head loss): the heads' summed cross-entropy toward
    PAE's prior at the decision positions. The prior is a constant, so it teaches the LM nothing: the
    heads read a detached hidden state."""

    def __init__(self, lm: nn.Module, heads: nn.Module | None = None):
        super().__init__()
        self.lm, self.heads = lm, heads
        if heads is not None:
            from promptist_core.dfprompt_policy import DEFAULT_RANGE, DEFAULT_WEIGHT, pae_prior

            self.register_buffer("weight_prior", torch.tensor(pae_prior(len(heads.weights), DEFAULT_WEIGHT)),
                                 persistent=False)
            self.register_buffer("range_prior", torch.tensor(pae_prior(len(heads.ranges), DEFAULT_RANGE)),
                                 persistent=False)

    def forward(self, input_ids, attention_mask, position_ids, labels, decisions=None):
        hidden = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    use_cache=False)[0]
        targets = labels[:, 1:]
        keep = targets != IGNORE
        logits = self.lm.get_output_embeddings()(hidden[:, :-1][keep])
        token_loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
        if self.heads is None:
            return token_loss
        if decisions is None:
            return token_loss, token_loss.new_zeros(())
        w_logits, r_logits = self.heads(hidden[decisions].detach())
        head_loss = -(F.log_softmax(w_logits, -1) * self.weight_prior).sum() - \
            (F.log_softmax(r_logits, -1) * self.range_prior).sum()
        return token_loss, head_loss


def load_trainable_policy(name: str, *, models_dir=None):
    """A fresh, trainable fp32 copy of a causal LM and its tokenizer (never the optimizer's shared cache)."""
    from transformers import AutoModelForCausalLM

    from promptist_core.weights import load_tokenizer, resolve, resolve_tokenizer

    folder = resolve(name, models_dir=models_dir)
    tokenizer = load_tokenizer(resolve_tokenizer(folder, name, models_dir=models_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(folder)).float()
    return model, tokenizer


def load_trainable_heads(name: str, width: int, *, models_dir=None, create: bool = True):
    """A DF-Prompt policy's heads from a model folder, trainable and fp32; new ones (seeded by the global
    generator) when the folder has none and `create`, else None."""
    from promptist_core.dfprompt_policy import DFHeads, load_heads
    from promptist_core.weights import resolve

    heads = load_heads(resolve(name, models_dir=models_dir))
    if heads is None and create:
        heads = DFHeads(width)
    return heads.float().requires_grad_(True) if heads is not None else None


def context_length(model) -> int:
    config = model.config
    return int(getattr(config, "n_positions", None) or config.max_position_embeddings)


def optimizer_for(model: nn.Module, config: SFTConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return adamw(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
    )


def lr_at(step: int, config: SFTConfig) -> float:
    """Learning rate of the update made at `step` (0-based)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return config.lr
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    if config.lr_schedule == "linear":
        return config.lr * max(0.0, 1.0 - progress)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


# --- the loop ------------------------------------------------------------------------------------

def check_config(config: SFTConfig, runtime: Runtime) -> int:
    """Validate sizes; returns micro-batches per device per step."""
    if not config.out:
        raise ConfigError("`out` is required: the folder the trained model goes to")
    check_bounds(config)  # every number finite and in its range (the fields' bounds)
    per_step = config.batch_size * runtime.world_size
    if config.effective_batch_size % per_step:
        raise ConfigError(f"effective_batch_size ({config.effective_batch_size}) must be a multiple of batch_size x "
                          f"devices ({config.batch_size} x {runtime.world_size} = {per_step})")
    if config.select == "step" and config.select_step < 1:
        raise ConfigError("select = step needs select_step, the checkpoint step to publish")
    return config.effective_batch_size // per_step


def train_sft(
    config: SFTConfig,
    *,
    resume: bool = False,
    callback: StepCallback | None = None,
    runtime: Runtime | None = None,
    models_dir=None,
) -> SFTResult:
    """Train, checkpoint, and leave a model folder in `config.out`. A callback raising StopTraining
    stops after a checkpoint (the exception is re-raised); `resume` continues the newest checkpoint."""
    runtime = runtime or local_runtime(config.device, config.precision)
    accumulation = check_config(config, runtime)
    out = Path(config.out).expanduser()
    checkpoints = list_checkpoints(out)
    if checkpoints and not resume:
        raise ConfigError(f"{out} already holds a run (checkpoint step {checkpoints[-1].step}); pass --resume to "
                          "continue it, or choose another output folder")
    checkpoint = resume_checkpoint(out) if resume else None
    if checkpoint is not None:
        check_resume_settings(config, checkpoint, RESUME_FIXED)
        logger.info("resuming %s from step %d", out, checkpoint.step)

    # 1. data
    train_pairs, valid_pairs = load_pairs(config)
    if not train_pairs:
        raise ConfigError("every pair went to validation: lower valid_fraction or add pairs")
    plan, small = step_plan(len(train_pairs), config.batch_size, accumulation, runtime.world_size, what="pairs",
                            setting="effective_batch_size",
                            suggestion=f"{config.batch_size * runtime.world_size} (batch_size x devices)")
    logger.info(plan)
    if small:
        logger.warning(small)

    # 2. model (from the checkpoint when resuming) and tokens
    torch.manual_seed(config.seed)
    model, tokenizer = load_trainable_policy(str(checkpoint.folder) if checkpoint else config.base,
                                             models_dir=models_dir)
    max_length = config.max_length or context_length(model)
    if max_length > context_length(model):
        raise ConfigError(f"max_length ({max_length}) exceeds the model's context ({context_length(model)})")
    heads = load_trainable_heads(str(checkpoint.folder) if checkpoint else config.base,
                                 model.get_output_embeddings().in_features,
                                 models_dir=models_dir) if config.dfprompt_heads else None
    model.to(runtime.device).train()
    if heads is not None:
        heads.to(runtime.device).train()
    decoding = read_decoding_defaults(resolve(config.base, models_dir=models_dir))  # the base's, kept
    train, skipped = encode_pairs(tokenizer, train_pairs, max_length, decisions=heads is not None)
    valid, _ = encode_pairs(tokenizer, valid_pairs, max_length, decisions=heads is not None)
    if not train:
        raise ConfigError(f"all {skipped} training pairs are longer than max_length ({max_length}) tokens")
    lengths = [len(e.ids) for e in train]

    # 3. optimizer and training state (restored when resuming); the heads' parameters come after the LM's
    core = TargetLoss(model, heads)
    optimizer = optimizer_for(core, config)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    scaler = runtime.grad_scaler()
    state = {"trainer": "sft", "step": 0, "cursor": {"epoch": 0, "index": 0}, "best_valid_loss": None,
             "best_step": None, "train_pairs": len(train), "valid_pairs": len(valid), "skipped_long": skipped}
    if checkpoint is not None:
        restore_training_state(checkpoint, optimizer)
        state.update({k: v for k, v in checkpoint.state.items() if k in state})
        if scaler is not None and checkpoint.state.get("scaler"):
            scaler.load_state_dict(checkpoint.state["scaler"])
    loss_module = runtime.wrap(core)
    columns = ["loss", "valid_loss", "lr", "grad_norm", "tokens"] + (["head_loss"] if heads is not None else [])
    log = TrainingLog(out, columns, tensorboard=config.tensorboard,
                      resume_step=state["step"] if checkpoint else None, enabled=runtime.is_main)
    stream = micro_batches(lengths, config.batch_size, config.seed, config.length_buckets, state["cursor"])
    pad_id = tokenizer.pad_token_id

    def save(step: int) -> None:
        if runtime.is_main:
            full = {**state, "config": config_to_dict(config), "scaler": scaler.state_dict() if scaler else None}
            save_checkpoint(out, model=model, tokenizer=tokenizer, optimizer=optimizer, state=full,
                            keep=config.keep_checkpoints, protect=(config.select_step,), dfprompt_heads=heads,
                            decoding=decoding)
            log.draw({"loss": ("loss", "valid_loss")}, "SFT").save(out / CURVES_FILE)
        runtime.barrier()

    def validate() -> float | None:
        if not valid:
            return None
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=runtime.device)
        with torch.no_grad():
            for start in range(runtime.rank * config.batch_size, len(valid), config.batch_size * runtime.world_size):
                chunk = valid[start:start + config.batch_size]
                with runtime.autocast():
                    loss = loss_module(**collate(chunk, pad_id, runtime.device))
                total[0] += (loss[0] if heads is not None else loss).double()
                total[1] += sum(e.target_tokens for e in chunk)
        model.train()
        runtime.all_reduce_sum(total)
        return (total[0] / total[1]).item()

    # 4. steps
    saved_at = state["step"]
    train_loss = None
    while state["step"] < config.max_steps:
        step = state["step"]
        group = [next(stream) for _ in range(accumulation * runtime.world_size)]
        n_tokens = sum(train[i].target_tokens for batch in group for i in batch)
        n_decisions = max(1, sum(len(train[i].decisions) for batch in group for i in batch))
        mine = group[runtime.rank::runtime.world_size]
        loss_sum = torch.zeros((), dtype=torch.float64, device=runtime.device)
        head_sum = torch.zeros((), dtype=torch.float64, device=runtime.device)
        for k, batch in enumerate(mine):
            last = k == len(mine) - 1
            with (contextlib.nullcontext() if last else runtime.no_sync(loss_module)), runtime.autocast():
                summed = loss_module(**collate([train[i] for i in batch], pad_id, runtime.device))
            if heads is not None:  # token loss per target token plus head loss per decision
                summed, head_summed = summed
                loss = summed * (runtime.world_size / n_tokens) + head_summed * (runtime.world_size / n_decisions)
                head_sum += head_summed.detach().double()
            else:
                loss = summed * (runtime.world_size / n_tokens)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            loss_sum += summed.detach().double()
        grad_norm = optimizer_step(optimizer, params, scaler, lr_at(step, config), config.grad_clip)
        state["step"] = step = step + 1
        train_loss = (runtime.all_reduce_sum(loss_sum) / n_tokens).item()

        metrics = {"loss": train_loss, "lr": lr_at(step - 1, config), "grad_norm": grad_norm, "tokens": n_tokens}
        if heads is not None:
            metrics["head_loss"] = (runtime.all_reduce_sum(head_sum) / n_decisions).item()
        if (config.eval_every and step % config.eval_every == 0) or step == config.max_steps:
            metrics["valid_loss"] = validate()
            best = state["best_valid_loss"]
            if metrics["valid_loss"] is not None and (best is None or metrics["valid_loss"] < best):
                state["best_valid_loss"], state["best_step"] = metrics["valid_loss"], step
                if runtime.is_main:
                    save_policy_folder(model, tokenizer, out / "best", dfprompt_heads=heads, decoding=decoding)
        if step % config.log_every == 0 or "valid_loss" in metrics or step == config.max_steps:
            log.log(step, metrics)
        if (config.save_every and step % config.save_every == 0) or step == config.select_step:
            save(step)
            saved_at = step

        if stop_requested(callback, step, config.max_steps, metrics, runtime):
            if saved_at != step:
                save(step)
            log.close()
            raise StopTraining.saved(f"step {step}", out / "checkpoints")

    # 5. the output folder: last/, then the selected weights at the top level
    if saved_at != state["step"]:
        save(state["step"])
    selected = config.select
    if runtime.is_main:
        save_policy_folder(model, tokenizer, out / "last", dfprompt_heads=heads, decoding=decoding)
        source = out / "last"
        if config.select == "best":
            if (out / "best").is_dir():
                source = out / "best"
            else:
                selected = "last"
                logger.warning("no validation pairs, so no best checkpoint: the output holds the last weights")
        elif config.select == "step":
            match = [c for c in list_checkpoints(out) if c.step == config.select_step]
            if not match:
                raise ConfigError(f"select_step {config.select_step} was never checkpointed (save_every "
                                  f"{config.save_every}, max_steps {config.max_steps})")
            source = match[0].folder
        publish_model_files(source, out)
    runtime.barrier()
    log.close()
    return SFTResult(out, state["step"], train_loss, state["best_valid_loss"], state["best_step"], selected,
                     model.eval(), tokenizer, heads.eval() if heads is not None else None)
