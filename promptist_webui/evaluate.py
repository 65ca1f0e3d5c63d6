"""The Evaluate section of the Promptist tab: `trainer.evaluate` (plain vs policies, the same seeds for every
variant) through the webui's own txt2img, scored with the models of Settings → Promptist → Score.

Plain functions over webui objects passed in (`state` is `shared.state`, the generator a `WebuiGenerator`),
so that tests run them on the fake webui; `tab` binds them to the real ones. Every variant is loaded and
checked before any image (a broken one is one PromptistError naming it); the webui's progress bar counts
images; Interrupt stops between images (the batch being sampled is dropped), and the prompts whose images
were all drawn are still scored, shown and written.
"""

from __future__ import annotations

import html
import time
from collections import Counter, defaultdict, deque
from pathlib import Path

import torch

from .errors import PromptistError, as_user_error

METRICS = ("total_promptist", "aesthetic", "clip_cosine", "relevance", "pick", "total_pae")
NEEDS_PICK = ("pick", "total_pae")
PROMPT_SETS = ("typed", "coco", "diffusiondb")  # "typed": the prompts box; else a shipped held-out set


def default_out(data_path: str | Path | None) -> Path:
    """`<webui data>/outputs/promptist-eval/<time>`: beside txt2img-images."""
    return Path(data_path or ".") / "outputs" / "promptist-eval" / time.strftime("%Y%m%d-%H%M%S")


def eval_prompts(prompts: str, prompt_set: str = "typed", count: int = 16) -> list[str]:
    """The typed prompts (one per line), or the first `count` of a shipped set."""
    from trainer.evaluate import read_prompts

    if prompt_set and prompt_set != "typed":
        if prompt_set not in PROMPT_SETS:
            raise PromptistError(f"Prompt set must be one of {', '.join(PROMPT_SETS)}; got {prompt_set!r}", 422)
        if int(count) < 1:
            raise PromptistError(f"Prompts from the set must be at least 1; got {count}", 422)
        return read_prompts(prompt_set, limit=int(count))
    lines = [line.strip() for line in (prompts or "").splitlines() if line.strip()]
    if not lines:
        raise PromptistError("Prompts is empty: give plain prompts, one per line (or choose a prompt set)", 422)
    return lines


def eval_variants(policies: str) -> list:
    """One variant per line (`parse_variant`'s specs; `#` lines are comments); plain comes first anyway."""
    from trainer.evaluate import PLAIN, Variant, VariantError, parse_variant

    variants = [Variant(PLAIN)]
    for line in (policies or "").splitlines():
        if not line.strip() or line.strip().startswith("#"):
            continue
        try:
            variant = parse_variant(line.strip())
        except VariantError as e:
            raise PromptistError(str(e), 422) from e
        if variant.lora is not None:
            raise PromptistError(f"variant {variant.name!r}: a LoRA variant needs the model's UNet; evaluate a "
                                 "LoRA headless (python -m trainer evaluate --lora) or in ComfyUI", 422)
        if variant.name != PLAIN:
            variants.append(variant)
    return variants


def _progress(state, total: int):
    """evaluate's (done, total) callback: the webui's bar by images, and Interrupt between generator calls."""
    from trainer.progress import StopTraining

    def callback(done: int, _total: int) -> None:
        state.job_count, state.job_no = total, done
        state.textinfo = f"Promptist Evaluate: {done}/{total} images"
        if state.interrupted or getattr(state, "stopping_generation", False):
            raise StopTraining(f"interrupted after {done}/{total} images")

    return callback


class _Replay:
    """An image generator that gives back images already drawn (same rewrite and seed, in drawing order)."""

    def __init__(self, images: dict, fingerprint: str):
        self.images, self.fingerprint = images, fingerprint

    def generate(self, prompts, seeds, **_):
        return torch.stack([self.images[(p, int(s))].popleft() for p, s in zip(prompts, seeds, strict=True)])


def _completed(prompts, variants, seeds, drawn, scorer, generator, **settings):
    """The evaluation of the prompts whose images were all drawn before the Interrupt (None: none was)."""
    from trainer.evaluate import PLAIN, Variant, evaluate

    records = [r for batch, _ in drawn for r in batch]
    per_prompt = Counter(r.prompt_index for r in records)
    done = sorted(p for p, n in per_prompt.items() if n == seeds * len(variants))
    if not done:
        return None
    images, rewrites, complete = defaultdict(deque), {}, set(done)
    for batch, pixels in drawn:
        for r, image in zip(batch, pixels, strict=True):
            if r.prompt_index in complete:
                images[(r.rewrite, r.seed)].append(image)
                rewrites[(r.variant, r.prompt_index)] = r.rewrite

    def fixed(name):  # the rewrites already drawn, in place of the policy
        return lambda texts: [rewrites[(name, done[i])] for i in range(len(texts))]

    replay = [Variant(PLAIN) if v.name == PLAIN else Variant(v.name, v.policy, dict(v.options), optimizer=fixed(v.name))
              for v in variants]
    result = evaluate([prompts[p] for p in done], replay, _Replay(images, getattr(generator, "fingerprint", "")),
                      scorer, seeds, **settings)
    result.settings["generator"] = type(generator).__name__
    return result


def evaluate_in_webui(state, generator, scorer, out: Path, *, prompts: str = "", prompt_set: str = "typed",
                      count: int = 16, policies: str = "promptist-mini", seeds: int = 2, seed: int = 0,
                      steps: int = 20, cfg: float = 7.0, width: int = 512, height: int = 512,
                      metric: str = "total_promptist", baseline: str = "", models_dir=None,
                      device: str | torch.device = "cpu") -> tuple:
    """The Evaluate button: draw every prompt plain and as each policy rewrites it, the same seeds for all,
    score, write results.csv / summary.json / grid.png / report.html into `out`. Returns (grid, table, HTML)."""
    from trainer.evaluate import evaluate, format_table, make_grid, write_outputs
    from trainer.progress import StopTraining

    # 1. inputs that need no model; the variants are loaded and checked inside evaluate before any image
    lines = eval_prompts(prompts, prompt_set, count)
    variants = eval_variants(policies)
    seeds = int(seeds)
    if seeds < 1:
        raise PromptistError(f"Seeds per prompt must be at least 1; got {seeds}", 422)
    if metric in NEEDS_PICK and getattr(scorer, "pick", None) is None:
        raise PromptistError(f"Metric {metric} needs PickScore: choose a PickScore model in Settings → Promptist "
                             "→ Score, or another metric", 422)
    total = len(lines) * seeds * len(variants)
    settings = dict(seed=int(seed), steps=int(steps), guidance=float(cfg), size=(int(width), int(height)),
                    metric=metric, baseline=(baseline or "").strip() or None, models_dir=models_dir,
                    device=str(device))
    drawn = []  # (records, images) of every generator call, for what is shown after an Interrupt
    state.job, state.job_count, state.textinfo = "Promptist Evaluate", total, "Promptist Evaluate: loading the policies"
    # 2. evaluate (no gradients); Interrupt: the prompts that were complete
    stopped = False
    try:
        with torch.no_grad():
            try:
                result = evaluate(lines, variants, generator, scorer, seeds, progress=_progress(state, total),
                                  image_sink=lambda records, images: drawn.append((records, images)), **settings)
            except StopTraining:
                stopped = True
                result = _completed(lines, variants, seeds, drawn, scorer, generator, **settings)
    except PromptistError:
        raise
    except (ValueError, OSError, RuntimeError) as e:
        raise as_user_error(e, "evaluating") from e
    # 3. what the section shows, and the files
    drawn_images = sum(len(batch) for batch, _ in drawn)
    if result is None:
        return None, "", (f"<p>Evaluate interrupted after {drawn_images} of {total} images, before every image of "
                          "one prompt was drawn: nothing to compare or save.</p>")
    paths = write_outputs(result, out)
    table = format_table(result)
    where = html.escape(str(paths["report.html"]))
    if stopped:
        text = (f"Evaluate interrupted after {drawn_images} of {total} images: the table and the grid are over the "
                f"{len(result.prompts)} of {len(lines)} prompts whose images were all drawn. Saved in {out}.")
    else:
        text = f"Evaluate finished: {total} images ({len(lines)} prompts x {seeds} seeds x {len(variants)} variants). Saved in {out}."
    return make_grid(result), table, f"<p>{html.escape(text)} Report: {where}</p>"
