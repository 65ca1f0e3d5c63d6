"""`python -m trainer pairs|sft|ppo|tpo`: the headless trainers.

Exit codes: 0 done, 2 bad input (flags, config, corpus: one line on stderr), 3 missing or broken
weights, 130 stopped by Ctrl-C after saving a checkpoint (`--resume` continues it).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import add_config_arguments, build_config, format_config, overrides_from_args, read_config_file

EXIT_STOPPED = 130  # 2 (bad input) and 3 (weights) as in promptist_core.cli


def _add_pairs(sub) -> None:
    p = sub.add_parser("pairs", help="build (plain, engineered) prompt pairs from a prompt corpus",
                       description="Split each engineered prompt into main content and modifiers and write "
                                   "SFT pairs (mc, mcm, and rmc/rtp with --rewrite) as JSONL.")
    p.add_argument("--corpus", required=True, help=".txt, .csv, .tsv, .jsonl, .parquet, or hf-dataset:OWNER/NAME/FILE")
    p.add_argument("--out", required=True, help="pairs file to write (JSONL)")
    p.add_argument("--column", default="prompt", help="csv/tsv column, jsonl field or parquet column (default: prompt)")
    p.add_argument("--min-words", type=int, default=1, help="drop prompts with fewer words (default: 1)")
    p.add_argument("--max-words", type=int, help="drop prompts with more words")
    p.add_argument("--blocklist", help="text file of terms (one per line); prompts containing one are dropped")
    p.add_argument("--limit", type=int, help="use at most this many prompts")
    p.add_argument("--seed", type=int, default=0, help="seed of the modifier subsets and the split (default: 0)")
    p.add_argument("--mcm-per-target", type=int, default=1, help="main content + modifiers sources per target")
    p.add_argument("--valid-fraction", type=float, default=0.02, help="targets held out for validation (default: 0.02)")
    p.add_argument("--rewrite", help="paraphrase hook: llm:<local causal LM folder> or command:<program> "
                                     "(stdin: one text per line; stdout: one rewrite per line)")
    p.add_argument("--rewrite-instruction", help="instruction for --rewrite llm:...")
    p.add_argument("--offline", action="store_true", help="never download (hf-dataset files must be cached)")
    p.set_defaults(run=_run_pairs)


def _run_pairs(args) -> int:
    from .corpus import read_corpus
    from .pairs import make_pairs, rewriter_from_spec, write_pairs

    corpus = read_corpus(args.corpus, column=args.column, min_words=args.min_words, max_words=args.max_words,
                         blocklist=args.blocklist, limit=args.limit, allow_download=False if args.offline else None)
    rewrite = rewriter_from_spec(args.rewrite, instruction=args.rewrite_instruction) if args.rewrite else None
    pairs, stats = make_pairs(corpus.prompts, seed=args.seed, mcm_per_target=args.mcm_per_target,
                              valid_fraction=args.valid_fraction, rewrite=rewrite)
    if not pairs:
        raise ValueError(f"{args.corpus}: no prompt has modifiers to make pairs from ({stats['skipped']})")
    write_pairs(args.out, pairs)
    print(json.dumps({"out": args.out, **corpus.stats(), **stats}))
    return 0


def _add_sft(sub) -> None:
    from .sft import SFTConfig

    p = sub.add_parser("sft", help="supervised fine-tuning of a prompt policy on pairs (Promptist stage 1)",
                       description="Fine-tune a causal LM on 'source Rephrase: target' pairs. Every setting below "
                                   "can also come from --config FILE (TOML, YAML or JSON); flags win.")
    p.add_argument("--config", help="settings file (.toml, .yaml, .json); see --print-config")
    p.add_argument("--resume", action="store_true", help="continue the newest checkpoint in --out exactly")
    p.add_argument("--print-config", action="store_true", help="print every setting with its doc and exit")
    p.add_argument("--models-dir", help="folder of model folders for --base names (default: $PROMPTIST_MODELS_DIR "
                                        "or ./models/promptist)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    add_config_arguments(p, SFTConfig)
    p.set_defaults(run=_run_sft)


def _run_sft(args) -> int:
    from .checkpoint import latest_checkpoint
    from .progress import ConsoleProgress, StopTraining
    from .runtime import runtime_from_env
    from .sft import SFTConfig, train_sft

    config = _settings(SFTConfig, args)
    if args.print_config:
        print(format_config(config), end="")
        return 0
    runtime = runtime_from_env(config.device, config.precision)
    start = latest_checkpoint(Path(config.out)).step if (args.resume and config.out and
                                                         latest_checkpoint(Path(config.out))) else 0
    progress = ConsoleProgress(config.max_steps, initial=start, desc="sft",
                               enabled=runtime.is_main and not args.no_progress)
    try:
        with progress:
            result = train_sft(config, resume=args.resume, callback=progress, runtime=runtime,
                               models_dir=args.models_dir)
    except StopTraining as e:
        print(str(e), file=sys.stderr)
        return EXIT_STOPPED
    if runtime.is_main:
        print(json.dumps({"out": str(result.out), "steps": result.steps, "train_loss": result.train_loss,
                          "valid_loss": result.valid_loss, "best_step": result.best_step, "selected": result.selected}))
    return 0


def _add_ppo(sub) -> None:
    from .ppo import PPOConfig

    p = sub.add_parser("ppo", help="PPO against image (or text) rewards (Promptist stage 2)",
                       description="Improve an SFT policy by PPO: rewrites are rendered by Stable Diffusion (--sd) "
                                   "and scored (aesthetics + relevance), or scored by a Python function "
                                   "(--text-reward module:function). Settings also come from --config FILE.")
    p.add_argument("--config", help="settings file (.toml, .yaml, .json); see --print-config")
    p.add_argument("--resume", action="store_true", help="continue the newest checkpoint in --out exactly")
    p.add_argument("--print-config", action="store_true", help="print every setting with its doc and exit")
    p.add_argument("--models-dir", help="folder of model folders (policy names, CLIP, aesthetic heads)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    add_config_arguments(p, PPOConfig)
    p.set_defaults(run=_run_ppo)


def _settings(cls, args, run_dir_of=None) -> object:
    """Defaults, then the resumed run's settings, then --config, then flags. `run_dir_of(config)`: where a
    trainer keeps its checkpoints when that is not `out` itself (TPO: `out` is the LoRA file)."""
    from .checkpoint import latest_checkpoint

    layers = []
    flags = overrides_from_args(args)
    if run_dir_of is not None and args.resume:
        probe = build_config(cls, *([(args.config, read_config_file(args.config))] if args.config else []),
                             ("command line", flags))
        run_dir = run_dir_of(probe) if (probe.out or probe.run_dir) else None
    else:
        run_dir = Path(flags["out"]) if flags.get("out") else None
    checkpoint = latest_checkpoint(run_dir) if (args.resume and run_dir) else None
    if checkpoint is not None:
        layers.append((f"{checkpoint.folder}/trainer_state.json", checkpoint.state["config"]))
    if args.config:
        layers.append((args.config, read_config_file(args.config)))
    layers.append(("command line", overrides_from_args(args)))
    return build_config(cls, *layers)


def image_reward_from_config(config, *, models_dir=None, device: str = "auto"):
    """The headless image reward: the diffusers generator and the scorer named in a PPO config."""
    from promptist_core.generators import load_diffusers_generator
    from promptist_core.rewards import load_scorer

    from .ppo import reward_preset
    from .rewards import ImageReward

    generator = load_diffusers_generator(config.sd, device=device, config_folder=config.sd_config)
    scorer = load_scorer(config.clip_model, config.aesthetic_head, pick_model=config.pick_model,
                         preset=reward_preset(config), models_dir=models_dir, device=device)
    return ImageReward(generator, scorer, preset=reward_preset(config), images_per_prompt=config.images_per_prompt,
                       steps=config.image_steps, guidance=config.guidance, size=(config.width, config.height),
                       seed=config.seed, cosine_floor=config.cosine_floor)


def _run_ppo(args) -> int:
    from .checkpoint import latest_checkpoint
    from .ppo import PPOConfig, train_ppo
    from .progress import ConsoleProgress, StopTraining
    from .rewards import TextReward
    from .runtime import runtime_from_env

    config = _settings(PPOConfig, args)
    if args.print_config:
        print(format_config(config), end="")
        return 0
    if bool(config.sd) == bool(config.text_reward):
        raise ValueError("give exactly one reward: --sd MODEL (images) or --text-reward module:function")
    runtime = runtime_from_env(config.device, config.precision)
    cache = None
    if config.text_reward:
        reward = TextReward.from_spec(config.text_reward)
    else:
        reward = image_reward_from_config(config, models_dir=args.models_dir, device=str(runtime.device))
        cache = reward.cache
    checkpoint = latest_checkpoint(Path(config.out)) if (args.resume and config.out) else None
    progress = ConsoleProgress(config.iterations, initial=checkpoint.step if checkpoint else 0, desc="ppo",
                               enabled=runtime.is_main and not args.no_progress)
    try:
        with progress:
            result = train_ppo(config, reward, resume=args.resume, callback=progress, runtime=runtime,
                               models_dir=args.models_dir, baseline_cache=cache)
    except StopTraining as e:
        print(str(e), file=sys.stderr)
        return EXIT_STOPPED
    if runtime.is_main:
        print(json.dumps({"out": str(result.out), "iterations": result.iterations, "reward": result.reward,
                          "kl": result.kl}))
    return 0


def _add_tpo(sub) -> None:
    from .tpo import TPOConfig

    p = sub.add_parser("tpo", help="TPO (TDPO/TKTO): a LoRA for a Stable Diffusion model from caption pairs",
                       description="Train a LoRA on (image, caption, edited caption) triples so the model follows "
                                   "captions more closely: --data from `python -m trainer tpo-data`, --sd the base "
                                   "model, --out the LoRA file (kohya format). Settings also come from --config FILE.")
    p.add_argument("--config", help="settings file (.toml, .yaml, .json); see --print-config")
    p.add_argument("--resume", action="store_true", help="continue the newest checkpoint in the run folder exactly")
    p.add_argument("--print-config", action="store_true", help="print every setting with its doc and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    add_config_arguments(p, TPOConfig)
    p.set_defaults(run=_run_tpo)


def _run_tpo(args) -> int:
    from .checkpoint import latest_checkpoint
    from .denoiser import load_diffusers_denoiser
    from .progress import ConsoleProgress, StopTraining
    from .runtime import local_runtime
    from .tpo import TPOConfig, run_dir_for, train_tpo

    config = _settings(TPOConfig, args, run_dir_of=run_dir_for)
    if args.print_config:
        print(format_config(config), end="")
        return 0
    missing = [name for name in ("data", "sd", "out") if not getattr(config, name)]
    if missing:
        raise ValueError(f"tpo needs {', '.join('--' + m for m in missing)} (the data folder, the base model, "
                         "the LoRA file to write)")
    if not Path(config.data).expanduser().exists():
        raise ValueError(f"data folder {config.data} does not exist; build one with: python -m trainer tpo-data")
    runtime = local_runtime(config.device, config.precision)
    denoiser = load_diffusers_denoiser(
        config.sd, device=runtime.device, dtype=None if config.precision == "auto" else config.precision,
        config_folder=config.sd_config, rank=config.rank, alpha=config.alpha,
        targets=[t.strip() for t in config.targets.split(",") if t.strip()],
        gradient_checkpointing=config.gradient_checkpointing)
    checkpoint = latest_checkpoint(run_dir_for(config)) if args.resume else None
    progress = ConsoleProgress(config.max_steps, initial=checkpoint.step if checkpoint else 0, desc="tpo",
                               enabled=not args.no_progress, shown=("loss", "accuracy", "valid_accuracy"))
    try:
        with progress:
            result = train_tpo(config, denoiser, callback=progress, resume=args.resume, runtime=runtime)
    except StopTraining as e:
        print(str(e), file=sys.stderr)
        return EXIT_STOPPED
    print(json.dumps({"out": str(result.lora), "run_dir": str(result.run_dir), "steps": result.steps,
                      "loss": result.loss, "accuracy": result.accuracy, "valid_accuracy": result.valid_accuracy}))
    return 0


COMMANDS = (_add_pairs, _add_sft, _add_ppo, _add_tpo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="Train prompt policies (promptist).")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from promptist_core.cli import run_command

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run_command(build_parser().parse_args(argv))
