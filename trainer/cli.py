"""`python -m trainer pairs|sft|ppo|tpo|tpo-data|tpo-eval|evaluate`: the headless trainers, their data, and
the evaluation of what they made.

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

from promptist_core.dfprompt import MAX_STEPS
from promptist_core.generators import MAX_BATCH_SIZE, MAX_GUIDANCE, MAX_IMAGE_SIDE

from .config import (
    add_config_arguments,
    bounded,
    build_config,
    format_config,
    overrides_from_args,
    read_config_file,
)

EXIT_STOPPED = 130  # 2 (bad input) and 3 (weights) as in promptist_core.cli
# The bounds of the numbers the commands without a config type take (the trainers' are their config fields'):
# the image generators' own limits, and counts and seeds as the trainers bound them.
MAX_COUNT = 1_000_000_000  # prompts, words, items
SEED_MAX = 2**32 - 1
COUNT = bounded(int, 1, MAX_COUNT)
SEED = bounded(int, 0, SEED_MAX)
FRACTION = bounded(float, 0, 0.99)
STEPS = bounded(int, 1, MAX_STEPS)
GUIDANCE = bounded(float, 0, MAX_GUIDANCE)
SIDE = bounded(int, 8, MAX_IMAGE_SIDE, multiple_of=8)
BATCH = bounded(int, 1, MAX_BATCH_SIZE)


def _add_pairs(sub) -> None:
    p = sub.add_parser("pairs", help="build (plain, engineered) prompt pairs from a prompt corpus",
                       description="Split each engineered prompt into main content and modifiers and write "
                                   "SFT pairs (mc, mcm, and rmc/rtp with --rewrite) as JSONL.")
    p.add_argument("--corpus", required=True, help=".txt, .csv, .tsv, .jsonl, .parquet, or hf-dataset:OWNER/NAME/FILE")
    p.add_argument("--out", required=True, help="pairs file to write (JSONL)")
    p.add_argument("--column", default="prompt", help="csv/tsv column, jsonl field or parquet column (default: prompt)")
    p.add_argument("--min-words", type=bounded(int, 0, MAX_COUNT), default=1,
                   help="drop prompts with fewer words (default: 1)")
    p.add_argument("--max-words", type=COUNT, help="drop prompts with more words")
    p.add_argument("--blocklist", help="text file of terms (one per line); prompts containing one are dropped")
    p.add_argument("--limit", type=COUNT, help="use at most this many prompts")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the modifier subsets and the split (default: 0)")
    p.add_argument("--mcm-per-target", type=bounded(int, 1, 100), default=1,
                   help="main content + modifiers sources per target")
    p.add_argument("--valid-fraction", type=FRACTION, default=0.02,
                   help="targets held out for validation (default: 0.02)")
    p.add_argument("--rewrite", help="paraphrase hook: llm:<local causal LM folder> or command:<program> "
                                     "(stdin: one text per line; stdout: one rewrite per line)")
    p.add_argument("--rewrite-instruction", help="instruction for --rewrite llm:...")
    p.add_argument("--offline", action="store_true", help="never download (hf-dataset files must be cached)")
    p.set_defaults(run=_run_pairs)


def _run_pairs(args) -> int:
    from .policy.corpus import read_corpus
    from .policy.pairs import make_pairs, rewriter_from_spec, write_pairs

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


def _add_tpo_data(sub) -> None:
    p = sub.add_parser("tpo-data", help="build TPO data: images, their captions and edited (negative) captions",
                       description="Gather (image, caption) items from an image folder with same-name .txt captions, "
                                   "a JSONL of {image, caption}, or prompts drawn once by your model (--prompts "
                                   "with --sd); write DATA/tpo_pairs.jsonl with negative captions and "
                                   "DATA/tpo_data.json (counts, skipped items and why).")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder of images (png/jpg/jpeg/webp) with same-name .txt captions "
                                         "(kohya / ComfyUI layout; subfolders one level down too)")
    source.add_argument("--jsonl", help="JSONL of {\"image\", \"caption\"} (image paths relative to the file)")
    source.add_argument("--prompts", help="prompt file (.txt/.csv/.tsv/.jsonl/.parquet); images drawn by --sd")
    p.add_argument("--out", required=True, help="data folder to write (tpo_pairs.jsonl, tpo_data.json, images/)")
    p.add_argument("--editor", default="rules", help="rules (default, offline), llm:<local causal LM folder> or "
                                                      "command:<program> (stdin: captions; stdout: negatives)")
    p.add_argument("--editor-instruction", help="instruction for --editor llm:... (default names the four edit types)")
    p.add_argument("--negatives-per-caption", type=bounded(int, 1, 16), default=2,
                   help="negatives per caption, one edit type each where possible (default: 2)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the edits, the split and drawn images (default: 0)")
    p.add_argument("--valid-fraction", type=FRACTION, default=0.05, help="captions held out for validation, by "
                                                                      "caption hash (default: 0.05)")
    p.add_argument("--clip-filter", metavar="MODEL", help="keep only negatives this CLIP ranks below the caption "
                                                          "for the image (e.g. ViT-L-14/openai)")
    p.add_argument("--models-dir", help="folder of model folders (CLIP, editor LM)")
    p.add_argument("--column", default="prompt", help="--prompts: csv/tsv column, jsonl field or parquet column")
    p.add_argument("--limit", type=COUNT, help="--prompts: use at most this many prompts")
    p.add_argument("--sd", help="--prompts: Stable Diffusion model (diffusers folder, Hub id or .safetensors file)")
    p.add_argument("--sd-config", help="--prompts: diffusers folder of the architecture, for a single-file --sd offline")
    p.add_argument("--steps", type=STEPS, default=25, help="--prompts: sampling steps (default: 25)")
    p.add_argument("--guidance", type=GUIDANCE, default=7.5, help="--prompts: guidance scale (default: 7.5)")
    p.add_argument("--width", type=SIDE, default=512, help="--prompts: image width (default: 512)")
    p.add_argument("--height", type=SIDE, default=512, help="--prompts: image height (default: 512)")
    p.add_argument("--batch-size", type=BATCH, default=4, help="--prompts: images per generator call (default: 4)")
    p.add_argument("--device", default="auto", help="device for --sd, --clip-filter and llm: editors (default: auto)")
    p.set_defaults(run=_run_tpo_data)


def _run_tpo_data(args) -> int:
    from .tpo.caption_edits import editor_from_spec
    from .tpo.data import (
        build_tpo_items,
        clip_ranked,
        data_summary,
        gather_folder,
        gather_jsonl,
        gather_prompts,
        write_tpo_data,
    )

    out = Path(args.out).expanduser()
    editor = editor_from_spec(args.editor, seed=args.seed, instruction=args.editor_instruction)
    if args.prompts and not args.sd:
        raise ValueError("--prompts needs --sd MODEL to draw the images from")
    if args.sd and not args.prompts:
        raise ValueError("--sd draws images for --prompts; --images and --jsonl bring their own images")
    # 1. gather (image, caption) items
    if args.images:
        gathered = gather_folder(args.images)
    elif args.jsonl:
        gathered = gather_jsonl(args.jsonl)
    else:
        from promptist_core.generators import load_diffusers_generator

        from .policy.corpus import read_corpus

        corpus = read_corpus(args.prompts, column=args.column, limit=args.limit)
        generator = load_diffusers_generator(args.sd, device=args.device, config_folder=args.sd_config,
                                             batch_size=args.batch_size)
        gathered = gather_prompts(corpus.prompts, generator, out / "images", seed=args.seed, steps=args.steps,
                                  guidance=args.guidance, size=(args.width, args.height), batch_size=args.batch_size,
                                  source={"kind": "prompts", "path": args.prompts, "sd": args.sd})
    if not gathered.items:
        reasons = ", ".join(f"{n} {r}" for r, n in data_summary(
            gathered, [], editor=args.editor, seed=args.seed, negatives_per_caption=args.negatives_per_caption,
            valid_fraction=args.valid_fraction, dropped_negatives={})["skipped"]["reasons"].items())
        raise ValueError(f"{gathered.source['path']}: no usable image with a caption ({gathered.read} read; "
                         f"skipped: {reasons})")
    # 2. negatives, split, and the optional CLIP check
    items = build_tpo_items(gathered, editor, negatives_per_caption=args.negatives_per_caption, seed=args.seed,
                            valid_fraction=args.valid_fraction)
    dropped = dict(editor.dropped)
    if args.clip_filter and items:
        from promptist_core.clip_models import load_clip

        clip = load_clip(args.clip_filter, models_dir=args.models_dir, device=args.device)
        before = {i.id for i in items}
        items, dropped["ranked wrong by CLIP"] = clip_ranked(items, clip)
        for item_id in sorted(before - {i.id for i in items}):
            gathered.skip(item_id, "no negative", "CLIP ranked every negative at or above the caption")
    if not items:
        raise ValueError(f"{gathered.source['path']}: no item has a usable negative caption "
                         f"(editor {args.editor}; dropped: {dropped or 'none'})")
    # 3. write
    summary = data_summary(gathered, items, editor=args.editor, seed=args.seed,
                           negatives_per_caption=args.negatives_per_caption, valid_fraction=args.valid_fraction,
                           dropped_negatives=dropped, clip_filter=args.clip_filter)
    write_tpo_data(out, items, summary)
    print(json.dumps({"out": str(out), **summary["counts"], "skipped_reasons": summary["skipped"]["reasons"]}))
    return 0


def _add_tpo_eval(sub) -> None:
    p = sub.add_parser("tpo-eval", help="win rates of a TPO LoRA against its base model on held-out prompts",
                       description="Draw images from the base model and from base + LoRA with shared seeds and "
                                   "score them (PickScore and aesthetic win rate of the LoRA, mean CLIP relevance "
                                   "of each). Prints one JSON object (and writes it to --out).")
    p.add_argument("--sd", required=True, help="base Stable Diffusion model (diffusers folder, Hub id or .safetensors)")
    p.add_argument("--sd-config", help="diffusers folder of the architecture, for a single-file --sd offline")
    p.add_argument("--lora", required=True, help="kohya-format LoRA file (.safetensors) trained on --sd")
    p.add_argument("--prompts", required=True, help="held-out prompt file, or a TPO data folder (its valid captions)")
    p.add_argument("--column", default="prompt", help="csv/tsv column, jsonl field or parquet column (default: prompt)")
    p.add_argument("--n", type=bounded(int, 1, MAX_COUNT), help="evaluate on the first N prompts (default: all)")
    p.add_argument("--images-per-prompt", type=bounded(int, 1, 64), default=1, help="seeds per prompt (default: 1)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the image seeds (default: 0)")
    p.add_argument("--steps", type=STEPS, default=25, help="sampling steps (default: 25)")
    p.add_argument("--guidance", type=GUIDANCE, default=7.5, help="guidance scale (default: 7.5)")
    p.add_argument("--size", default="512", help="WIDTH or WIDTHxHEIGHT (default: 512)")
    p.add_argument("--clip-model", default="ViT-L-14/openai", help="CLIP for relevance and aesthetics")
    p.add_argument("--aesthetic-head", default="improved", help="LAION aesthetic head: improved, laion-v1, or a file")
    p.add_argument("--pick-model", default="yuvalkirstain/PickScore_v1", help="PickScore model, or 'none'")
    p.add_argument("--models-dir", help="folder of model folders (CLIP, aesthetic heads, PickScore)")
    p.add_argument("--device", default="auto", help="device (default: auto)")
    p.add_argument("--out", help="also write the JSON report to this file")
    p.add_argument("--save-images", help="folder for the image pairs (NNNN_base.png, NNNN_lora.png)")
    p.set_defaults(run=_run_tpo_eval)


def _run_tpo_eval(args) -> int:
    from promptist_core.generators import load_diffusers_generator
    from promptist_core.rewards import load_scorer

    from .tpo.evaluate import compare_lora, held_out_prompts, parse_size
    from .tpo.lora import load_kohya_lora

    size = parse_size(args.size)
    if not Path(args.lora).expanduser().is_file():
        raise ValueError(f"{args.lora}: no such LoRA file (give a kohya-format .safetensors LoRA)")
    if args.n is not None and args.n < 1:
        raise ValueError(f"--n must be at least 1; got {args.n}")
    prompts = held_out_prompts(args.prompts, column=args.column, limit=args.n)
    pick = None if args.pick_model.lower() in ("", "none") else args.pick_model
    scorer = load_scorer(args.clip_model, args.aesthetic_head, pick_model=pick, models_dir=args.models_dir,
                         device=args.device)
    generator = load_diffusers_generator(args.sd, device=args.device, config_folder=args.sd_config)
    loras = load_kohya_lora(generator.pipe.unet, args.lora)
    report = compare_lora(generator, loras, scorer, prompts, images_per_prompt=args.images_per_prompt,
                          seed=args.seed, steps=args.steps, guidance=args.guidance, size=size,
                          save_images=Path(args.save_images) if args.save_images else None)
    report = {"sd": args.sd, "lora": args.lora, "prompts_file": args.prompts, **report}
    text = json.dumps(report, indent=None)
    if args.out:
        out = Path(args.out).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(text)
    return 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="does it help on my model? plain vs policies (vs a LoRA), paired seeds",
                       description="Draw every prompt with every variant under the same seeds on your Stable "
                                   "Diffusion model, score each image (aesthetic, CLIP relevance, PickScore, each "
                                   "preset's total) and compare: mean with 95%% interval, paired win rate vs plain "
                                   "(and vs --baseline) with its 95%% Wilson interval over prompts. Writes "
                                   "OUT/results.csv, summary.json, grid.png, report.html; prints the table.")
    p.add_argument("--sd", required=True, help="Stable Diffusion model (diffusers folder, Hub id or .safetensors)")
    p.add_argument("--sd-config", help="diffusers folder of the architecture, for a single-file --sd offline")
    p.add_argument("--prompts", default="coco", help="coco (held-out COCO val captions, default), diffusiondb, or a "
                                                     "prompt file (.txt/.csv/.jsonl/.parquet)")
    p.add_argument("--column", default="prompt", help="csv/tsv column, jsonl field or parquet column (default: prompt)")
    p.add_argument("--n", type=bounded(int, 1, MAX_COUNT), default=16,
                   help="evaluate on the first N prompts (default: 16)")
    p.add_argument("--variant", action="append", default=[], metavar="SPEC",
                   help="a column, repeatable: plain, a policy name or folder (promptist-mini, runs/sft), with "
                        "options after commas: mode=diverse|sample, seed=, keep_prompt=true, no_repeat_ngram_size=, "
                        "num_beams=, max_new_tokens=, head_choice=, name=COLUMN, lora=FILE (e.g. "
                        "'plain,lora=tpo.safetensors,name=tpo'). plain is always included.")
    p.add_argument("--lora", help="shorthand for --variant plain,lora=FILE,name=lora")
    p.add_argument("--baseline", help="also compare every variant with this one (its name)")
    p.add_argument("--metric", default="total_promptist",
                   help="headline score: aesthetic, clip_cosine, relevance, pick, total_promptist (default), total_pae")
    p.add_argument("--seeds", type=bounded(int, 1, 1000), default=2,
                   help="seeds per prompt, shared by every variant (default: 2)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the image seeds (default: 0)")
    p.add_argument("--steps", type=STEPS, default=25, help="sampling steps (default: 25)")
    p.add_argument("--guidance", type=GUIDANCE, default=7.5, help="guidance scale (default: 7.5)")
    p.add_argument("--size", default="512", help="WIDTH or WIDTHxHEIGHT (default: 512)")
    p.add_argument("--negative", help="negative prompt for every image")
    p.add_argument("--batch-size", type=BATCH, help="images per generator call (default: the variants of one prompt "
                                                  "and seed together)")
    p.add_argument("--grid-prompts", type=bounded(int, 1, 1000), default=8,
                   help="prompts shown in grid.png and report.html (default: 8)")
    p.add_argument("--clip-model", default="ViT-L-14/openai", help="CLIP for relevance and aesthetics")
    p.add_argument("--aesthetic-head", default="improved", help="LAION aesthetic head: improved, laion-v1, or a file")
    p.add_argument("--pick-model", default="none", help="PickScore model (e.g. yuvalkirstain/PickScore_v1), or none")
    p.add_argument("--models-dir", action="append", help="folder of model folders (policies, CLIP, heads); repeatable")
    p.add_argument("--device", default="auto", help="device (default: auto)")
    p.add_argument("--out", required=True, help="folder for results.csv, summary.json, grid.png, report.html")
    p.add_argument("--save-images", action="store_true", help="also write every image to OUT/images/")
    p.add_argument("--offline", action="store_true", help="never download")
    p.set_defaults(run=_run_evaluate)


def _run_evaluate(args) -> int:
    from tqdm.auto import tqdm

    from promptist_core.generators import load_diffusers_generator
    from promptist_core.rewards import load_scorer

    from .evaluate import evaluate, format_table, parse_variant, read_prompts, save_images_to, write_outputs
    from .tpo.evaluate import parse_size

    # 1. everything that can be checked without a model
    size = parse_size(args.size)
    if args.n < 1 or args.seeds < 1:
        raise ValueError(f"--n and --seeds must be at least 1; got {args.n} and {args.seeds}")
    specs = list(args.variant) + ([f"plain,lora={args.lora},name=lora"] if args.lora else [])
    variants = [parse_variant(s) for s in specs]
    prompts = read_prompts(args.prompts, limit=args.n, column=args.column)
    allow = False if args.offline else None
    # 2. models; every variant is loaded and checked inside evaluate before any image
    pick = None if args.pick_model.lower() in ("", "none") else args.pick_model
    scorer = load_scorer(args.clip_model, args.aesthetic_head, pick_model=pick, models_dir=args.models_dir,
                         device=args.device, allow_download=allow)
    generator = load_diffusers_generator(args.sd, device=args.device, config_folder=args.sd_config,
                                         negative_prompt=args.negative, allow_download=allow,
                                         **({"batch_size": args.batch_size} if args.batch_size else {}))
    out = Path(args.out).expanduser()
    total = len(prompts) * args.seeds * (len(variants) + (0 if any(v.name == "plain" for v in variants) else 1))
    with tqdm(total=total, desc="evaluate", unit="image", disable=not sys.stderr.isatty()) as bar:
        result = evaluate(prompts, variants, generator, scorer, args.seeds, seed=args.seed, steps=args.steps,
                          guidance=args.guidance, size=size, metric=args.metric, baseline=args.baseline,
                          batch_size=args.batch_size, grid_prompts=args.grid_prompts, models_dir=args.models_dir,
                          device=str(generator.pipe.device), allow_download=allow,
                          progress=lambda done, _total: bar.update(done - bar.n),
                          image_sink=save_images_to(out / "images") if args.save_images else None)
    paths = write_outputs(result, out)
    print(format_table(result))
    print(json.dumps({name: str(path) for name, path in paths.items()}))
    return 0


def _add_run_options(p: argparse.ArgumentParser, checkpoints_in: str) -> None:
    """The options every trainer has besides its config fields."""
    p.add_argument("--config", help="settings file (.toml, .yaml, .json); see --print-config")
    p.add_argument("--resume", action="store_true", help=f"continue the newest checkpoint in {checkpoints_in} exactly")
    p.add_argument("--print-config", action="store_true", help="print every setting with its doc and exit")


def _add_sft(sub) -> None:
    from .policy.sft import SFTConfig

    p = sub.add_parser("sft", help="supervised fine-tuning of a prompt policy on pairs (Promptist stage 1)",
                       description="Fine-tune a causal LM on 'source Rephrase: target' pairs. Every setting below "
                                   "can also come from --config FILE (TOML, YAML or JSON); flags win.")
    _add_run_options(p, "--out")
    p.add_argument("--models-dir", help="folder of model folders for --base names (default: $PROMPTIST_MODELS_DIR "
                                        "or ./models/promptist)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    add_config_arguments(p, SFTConfig)
    p.set_defaults(run=_run_sft)


def _run_sft(args) -> int:
    from .checkpoint import latest_checkpoint
    from .policy.sft import SFTConfig, train_sft
    from .progress import ConsoleProgress, StopTraining
    from .runtime import runtime_from_env

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
    from .policy.ppo import PPOConfig

    p = sub.add_parser("ppo", help="PPO against image (or text) rewards (Promptist stage 2)",
                       description="Improve an SFT policy by PPO: rewrites are rendered by Stable Diffusion (--sd) "
                                   "and scored (aesthetics + relevance), or scored by a Python function "
                                   "(--text-reward module:function). Settings also come from --config FILE.")
    _add_run_options(p, "--out")
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

    from .policy.ppo import reward_preset
    from .policy.rewards import ImageReward

    generator = load_diffusers_generator(config.sd, device=device, config_folder=config.sd_config)
    scorer = load_scorer(config.clip_model, config.aesthetic_head, pick_model=config.pick_model,
                         preset=reward_preset(config), models_dir=models_dir, device=device)
    return ImageReward(generator, scorer, preset=reward_preset(config), images_per_prompt=config.images_per_prompt,
                       steps=config.image_steps, guidance=config.guidance, size=(config.width, config.height),
                       seed=config.seed, cosine_floor=config.cosine_floor)


def _run_ppo(args) -> int:
    from .checkpoint import latest_checkpoint
    from .policy.ppo import PPOConfig, check_config, check_prompts, load_prompts, train_ppo
    from .policy.rewards import TextReward
    from .progress import ConsoleProgress, StopTraining
    from .runtime import runtime_from_env

    config = _settings(PPOConfig, args)
    if args.print_config:
        print(format_config(config), end="")
        return 0
    if bool(config.sd) == bool(config.text_reward):
        raise ValueError("give exactly one reward: --sd MODEL (images) or --text-reward module:function")
    runtime = runtime_from_env(config.device, config.precision)
    check_config(config)  # every setting and the prompts before the reward's models load
    check_prompts(load_prompts(config), config, runtime.world_size)
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
    from .tpo.train import TPOConfig

    p = sub.add_parser("tpo", help="TPO (TDPO/TKTO): a LoRA for a Stable Diffusion model from caption pairs",
                       description="Train a LoRA on (image, caption, edited caption) triples so the model follows "
                                   "captions more closely: --data from `python -m trainer tpo-data`, --sd the base "
                                   "model, --out the LoRA file (kohya format). Settings also come from --config FILE.")
    _add_run_options(p, "the run folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    add_config_arguments(p, TPOConfig)
    p.set_defaults(run=_run_tpo)


def _run_tpo(args) -> int:
    from .checkpoint import latest_checkpoint, seeded
    from .progress import ConsoleProgress, StopTraining
    from .runtime import local_runtime
    from .tpo.data import read_tpo_data
    from .tpo.denoiser import load_diffusers_denoiser
    from .tpo.train import TPOConfig, check_config, check_tpo_data, run_dir_for, short_run_notes, train_tpo

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
    check_config(config)  # every setting, then the data file, before the model loads
    check_tpo_data(read_tpo_data(config.data))
    for note in short_run_notes(config):  # what a short run can show
        logging.getLogger("trainer.tpo").warning(note)
    runtime = local_runtime(config.device, config.precision)
    with seeded(config.seed):  # the new LoRA's init: the same seed gives the same run in any process
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


COMMANDS = (_add_pairs, _add_sft, _add_ppo, _add_tpo, _add_tpo_data, _add_tpo_eval, _add_evaluate)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr, as every other bad input (the usage is what --help is for)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m trainer", description="Train prompt policies (promptist).")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from promptist_core.cli import run_command

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run_command(build_parser().parse_args(argv))
