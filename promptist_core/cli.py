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
    from .optimizer import MODES
    from .weights import DEFAULT_OPTIMIZER_MODEL

    p = sub.add_parser("optimize", help="rewrite prompts with the Promptist policy",
                       description="Rewrite plain prompts into Stable-Diffusion-friendly ones.")
    p.add_argument("prompts", nargs="*", help="prompts to optimize ('-' or none: read stdin, one per line)")
    p.add_argument("--file", help="read prompts from this file, one per line")
    p.add_argument("--model", default=DEFAULT_OPTIMIZER_MODEL,
                   help="Hugging Face id, folder name under --models-dir, or a path (default: %(default)s)")
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
    p.add_argument("--device", default="auto", help="auto, gpu, cpu or a torch device (default: auto)")
    p.add_argument("--offline", action="store_true", help="never download weights")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.set_defaults(run=_run_optimize)


def _run_optimize(args) -> int:
    from .optimizer import check_prompts, load_optimizer

    prompts = check_prompts(read_prompts(args.prompts, args.file))  # fail before loading the model
    optimizer = load_optimizer(args.model, models_dir=args.models_dir, device=args.device,
                               allow_download=False if args.offline else None)
    results = optimizer(
        prompts, mode=args.mode, candidates=args.candidates, num_beams=args.num_beams,
        num_beam_groups=args.num_beam_groups, diversity_penalty=args.diversity_penalty,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed, batch_size=args.batch_size, trim_to_clip_window=args.trim,
    )
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


COMMANDS = (_add_optimize, _add_dfprompt)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m promptist_core",
                                     description="Automatic prompt optimization for text-to-image models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .weights import WeightsNotFoundError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except WeightsNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_MISSING_WEIGHTS
    except (ValueError, OSError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return EXIT_BAD_INPUT
