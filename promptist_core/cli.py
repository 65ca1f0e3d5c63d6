"""`python -m promptist_core <command>`: the headless entry point.

Each command is a pair `_add_<command>(subparsers)` / `_run_<command>(args) -> int`. Bad input
exits with code 2 and one line on stderr; missing weights exit with code 3 and say where the
files go.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

EXIT_BAD_INPUT = 2
EXIT_MISSING_WEIGHTS = 3


def read_prompts(args_prompts: Sequence[str], file: str | None) -> list[str]:
    """Prompts from arguments, from a file, or from stdin (`-` or nothing given), one per line."""
    prompts = list(args_prompts)
    if file:
        with open(file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts or prompts == ["-"]:
        if sys.stdin is None or sys.stdin.isatty():
            raise ValueError("no prompt given: pass prompts as arguments, --file FILE, or on stdin")
        prompts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    return prompts


def _add_optimize(sub) -> None:
    from .optimizer import MAX_NGRAM, MODES
    from .weights import BUNDLED_POLICY, DEFAULT_OPTIMIZER_MODEL

    p = sub.add_parser("optimize", help="rewrite prompts with the Promptist policy",
                       description="Rewrite plain prompts into Stable-Diffusion-friendly ones.")
    p.add_argument("prompts", nargs="*", help="prompts to optimize ('-' or none: read stdin, one per line)")
    p.add_argument("--file", help="read prompts from this file, one per line")
    p.add_argument("--model", help=f"Hugging Face id, folder name under --models-dir, or a path (default: "
                                   f"{DEFAULT_OPTIMIZER_MODEL} when it is here or can be downloaded, else "
                                   f"{BUNDLED_POLICY}, the policy bundled with promptist)")
    p.add_argument("--models-dir", help="folder holding model folders (default: $PROMPTIST_MODELS_DIR "
                                        "or ./models/promptist)")
    p.add_argument("--candidates", type=int, default=1, help="rewrites per prompt (default: 1)")
    p.add_argument("--mode", choices=MODES, default="beam", help="decoding (default: beam, the reference)")
    p.add_argument("--seed", type=int, help="seed for --mode sample")
    p.add_argument("--num-beams", type=int, default=8)
    p.add_argument("--num-beam-groups", type=int, help="groups for --mode diverse (default: one per beam)")
    p.add_argument("--diversity-penalty", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=75)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--trim", action="store_true", help="cut results at a comma to fit CLIP's 77 tokens")
    p.add_argument("--head-choice", choices=("argmax", "sample"), default="argmax",
                   help="DF-Prompt policies: each modifier's weight and range, the heads' most likely class or "
                        "a sample (with --seed) (default: %(default)s)")
    p.add_argument("--render", choices=("dfprompt", "a1111", "plain"), default="dfprompt",
                   help="DF-Prompt policies: print the DF-Prompt, its A1111 prompt-editing form (exact with "
                        "--steps), or plain text without weights and ranges (default: %(default)s)")
    p.add_argument("--steps", type=int, help="sampling steps for --render a1111")
    keep = p.add_mutually_exclusive_group()
    keep.add_argument("--keep-prompt", dest="keep_prompt", action="store_true", default=None,
                      help="start every rewrite with the prompt verbatim; the policy writes what follows "
                           "(default: the policy's own setting: on for the bundled policy)")
    keep.add_argument("--no-keep-prompt", dest="keep_prompt", action="store_false",
                      help="let the policy rewrite the prompt itself (microsoft/Promptist's recipe)")
    p.add_argument("--no-repeat-ngram", type=int, metavar="N",
                   help=f"ban repeating any N tokens of the rewrite, 0 = off, at most {MAX_NGRAM} (default: the "
                        "policy's own: 3 for the bundled policy, off for microsoft/Promptist)")
    p.add_argument("--device", default="auto", help="auto, gpu, cpu or a torch device (default: auto)")
    p.add_argument("--offline", action="store_true", help="never download weights")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.set_defaults(run=_run_optimize)


def _run_optimize(args) -> int:
    from .optimizer import PromptOptimizer, check_prompts, load_optimizer

    # Fail before loading the model: bad prompts, and sizes out of range (max_new_tokens against the
    # policy's context is checked once it is loaded).
    prompts = check_prompts(read_prompts(args.prompts, args.file))
    PromptOptimizer._check_options(args.mode, args.candidates, args.num_beams, args.max_new_tokens,
                                   args.num_beam_groups, args.diversity_penalty, args.temperature, args.top_k,
                                   args.top_p, args.batch_size, args.seed, args.no_repeat_ngram)
    allow_download = False if args.offline else None
    name = args.model
    if name is None:
        from .weights import choose_default_policy

        name, note = choose_default_policy(models_dir=args.models_dir, allow_download=allow_download)
        if note:
            print(note, file=sys.stderr)
    optimizer = load_optimizer(name, models_dir=args.models_dir, device=args.device, allow_download=allow_download)
    results = optimizer(
        prompts, mode=args.mode, candidates=args.candidates, num_beams=args.num_beams,
        num_beam_groups=args.num_beam_groups, diversity_penalty=args.diversity_penalty,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed, batch_size=args.batch_size, trim_to_clip_window=args.trim, head_choice=args.head_choice,
        keep_prompt=args.keep_prompt, no_repeat_ngram_size=args.no_repeat_ngram,
    )
    if args.render != "dfprompt" and optimizer.is_dfprompt:
        from .dfprompt import to_text

        for r in results:
            r.candidates = [to_text(c, args.render, args.steps) for c in r.candidates]
            r.prompt = to_text(r.prompt, args.render, args.steps)
    for r in results:
        for note in r.notes:
            print(f"note: {r.source[:40]!r}: {note}", file=sys.stderr)
        if args.json:
            print(json.dumps({"prompt": r.source, "optimized": r.prompt, "candidates": r.candidates,
                              "clip_tokens": r.clip_tokens}, ensure_ascii=False))
        elif args.candidates > 1:
            print("\t".join(r.candidates))
        else:
            print(r.prompt)
    return 0


def _add_dfprompt(sub) -> None:
    p = sub.add_parser("dfprompt", help="show a DF-Prompt's schedule or render it for a host",
                       description="Parse a DF-Prompt such as 'a horse, [anime:0-1:1.5], [detailed:0.5-1:1.25]' "
                                   "and print its per-step schedule, its A1111 rendering, or JSON.")
    p.add_argument("text", help="the DF-Prompt")
    p.add_argument("--steps", type=int, help="sampling steps N (needed for schedule and json; a1111 writes "
                                             "fractions without it, which the webui rounds one step off)")
    p.add_argument("--format", choices=("schedule", "a1111", "plain", "json"), default="schedule",
                   help="schedule: one line per segment; a1111: webui prompt editing syntax; plain: no DF "
                        "syntax; json: parsed blocks and segments (default: %(default)s)")
    p.set_defaults(run=_run_dfprompt)


def _run_dfprompt(args) -> int:
    from . import dfprompt

    if args.steps is not None and not 1 <= args.steps <= dfprompt.MAX_STEPS:
        raise ValueError(f"--steps must be between 1 and {dfprompt.MAX_STEPS}; got {args.steps}")
    prompt = dfprompt.parse(args.text)
    if args.format in ("schedule", "json") and args.steps is None:
        raise ValueError(f"--steps is required for --format {args.format}")
    if args.format == "a1111":
        print(dfprompt.to_a1111(prompt, args.steps))
    elif args.format == "plain":
        print(dfprompt.to_plain(prompt))
    else:
        segments = dfprompt.schedule(prompt, args.steps)
        if args.format == "json":
            print(json.dumps({"prompt": prompt.format(), "steps": args.steps,
                              "modifiers": [{"text": m.text, "start": m.start, "end": m.end, "weight": m.weight,
                                             "steps": [r[0], r[-1]] if (r := m.steps(args.steps)) else None}
                                            for m in prompt.modifiers],
                              "segments": [s.to_dict() for s in segments]}, ensure_ascii=False))
        else:
            for s in segments:
                print(f"steps {s.first_step}-{s.last_step}: {s.weighted_text('a1111')}")
    return 0



def read_images(paths: Sequence[str]) -> list:
    """PIL images (RGB) from files; ValueError naming the file that cannot be read."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except FileNotFoundError:
            raise ValueError(f"image file not found: {path}") from None
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"cannot read image {path}: {str(e).splitlines()[0]}") from None
    return images


def _add_score(sub) -> None:
    from .aesthetic import DEFAULT_AESTHETIC_HEAD
    from .clip_models import DEFAULT_CLIP_MODEL
    from .rewards import PRESET_NAMES

    p = sub.add_parser(
        "score", help="score images (CLIP relevance, LAION aesthetics, PickScore)",
        description="Score images against the user's prompt with a reward preset, or score precomputed CLIP "
                    "embeddings with an aesthetic head (--embeddings).")
    p.add_argument("images", nargs="*", help="image files to score")
    p.add_argument("--prompt", help="the prompt the images were made from")
    p.add_argument("--reference-prompt", help="the user's plain prompt that relevance is measured against "
                                              "(default: --prompt)")
    p.add_argument("--baseline", nargs="+", metavar="IMAGE",
                   help="images of the plain prompt, for the promptist preset's aesthetic delta (one per image "
                        "with the same seeds, or any number: their mean)")
    p.add_argument("--preset", choices=PRESET_NAMES, default="promptist",
                   help="promptist: delta aesthetics + relevance; pae: aesthetics + relevance + PickScore "
                        "(default: %(default)s)")
    p.add_argument("--aesthetic-weight", type=float, help="override the preset's aesthetic weight")
    p.add_argument("--relevance-weight", type=float, help="override the preset's relevance weight")
    p.add_argument("--pick-weight", type=float, help="override the preset's PickScore weight")
    p.add_argument("--embeddings", metavar="FILE.npy",
                   help="score CLIP image embeddings (N, D) from a .npy file with --aesthetic only")
    p.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL,
                   help="CLIP for relevance and aesthetics: ViT-L-14/openai, a folder, a Hub id, or an "
                        "open_clip weights file with --clip-architecture (default: %(default)s)")
    p.add_argument("--clip-architecture", help="open_clip architecture of a --clip-model weights file")
    p.add_argument("--aesthetic", default=DEFAULT_AESTHETIC_HEAD,
                   help="aesthetic head: improved, laion-v1, or a .pth/.safetensors file (default: %(default)s)")
    p.add_argument("--pick-model", help="PickScore CLIP folder or Hub id (the pae preset defaults to "
                                        "yuvalkirstain/PickScore_v1)")
    p.add_argument("--models-dir", help="folder holding model files (default: $PROMPTIST_MODELS_DIR "
                                        "or ./models/promptist)")
    p.add_argument("--batch-size", type=int, default=8, help="images per CLIP pass (default: 8)")
    p.add_argument("--device", default="auto", help="auto, gpu, cpu or a torch device (default: auto)")
    p.add_argument("--offline", action="store_true", help="never download weights")
    p.add_argument("--json", action="store_true", help="print one JSON object per image")
    p.set_defaults(run=_run_score)


def _run_score(args) -> int:
    allow_download = False if args.offline else None
    if args.embeddings:
        return _score_embeddings(args, allow_download)
    from .rewards import check_batch_size, get_preset, load_scorer

    # 1. check inputs before loading any model
    if not args.images:
        raise ValueError("no images given: pass image files, or --embeddings FILE.npy")
    check_batch_size(args.batch_size)
    text = args.reference_prompt or args.prompt
    if not text or not text.strip():
        raise ValueError("no prompt given: pass --prompt (and --reference-prompt for the user's plain prompt)")
    images = read_images(args.images)
    baseline = read_images(args.baseline) if args.baseline else None
    preset = get_preset(args.preset).with_weights(aesthetic=args.aesthetic_weight,
                                                  relevance=args.relevance_weight, pick=args.pick_weight)
    # 2. load and score
    scorer = load_scorer(args.clip_model, args.aesthetic, pick_model=args.pick_model, preset=preset,
                         clip_architecture=args.clip_architecture, models_dir=args.models_dir,
                         device=args.device, allow_download=allow_download, batch_size=args.batch_size)
    scores = scorer(images, text, baseline_images=baseline)
    if preset.aesthetic_delta and baseline is None:
        print("note: no --baseline images: the aesthetic term is the absolute score, not the delta",
              file=sys.stderr)
    # 3. report
    if args.json:
        for path, s in zip(args.images, scores, strict=True):
            print(json.dumps({"image": path, "image_prompt": args.prompt, "preset": preset.name, **s.to_dict()},
                             ensure_ascii=False))
    else:
        from .rewards import format_table

        print(format_table(scores))
        for s, path in zip(scores, args.images, strict=True):
            print(f"{s.index:>3} {path}")
    return 0


def _score_embeddings(args, allow_download) -> int:
    import numpy as np
    import torch

    from .aesthetic import load_aesthetic_head
    from .rewards import aesthetic_from_embeddings

    if args.images:
        raise ValueError("--embeddings scores embeddings only: do not pass image files with it")
    try:
        array = np.load(args.embeddings, allow_pickle=False)
    except FileNotFoundError:
        raise ValueError(f"embeddings file not found: {args.embeddings}") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read embeddings {args.embeddings}: {str(e).splitlines()[0]}") from None
    if array.ndim not in (1, 2) or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"embeddings in {args.embeddings} must be floats shaped (N, D) or (D,); got "
                         f"{array.dtype} {array.shape}")
    head = load_aesthetic_head(args.aesthetic, models_dir=args.models_dir, allow_download=allow_download)
    scores = aesthetic_from_embeddings(head, torch.from_numpy(np.atleast_2d(array).astype(np.float32)))
    for i, value in enumerate(scores.tolist()):
        print(json.dumps({"index": i, "aesthetic": value}) if args.json else f"{i}\t{value:.4f}")
    return 0


COMMANDS = (_add_optimize, _add_dfprompt, _add_score)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m promptist_core",
                                     description="Automatic prompt optimization for text-to-image models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command; our errors become one line on stderr and an exit code (both CLIs)."""
    from .weights import WeightsNotFoundError

    try:
        return args.run(args)
    except WeightsNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_MISSING_WEIGHTS
    except (ValueError, OSError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return EXIT_BAD_INPUT


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv))
