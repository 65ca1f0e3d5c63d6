"""Every model a webui job of ours needs, checked once before the job's first step: all missing ones in one message.

The two scripts each load their own models in their `process` (the policy, then the scoring models), so the
user offline would meet one missing model per try, and the optimizer would run before the scoring CLIP is
found missing. The webui calls every script's `before_process` before any `process` (modules/processing.py
`process_images`, A1111 1.10 and Forge alike): there each script says what it will do (`plan`); the first
`process` of ours checks what the whole job needs (`models_ready`), and stops the job naming every missing one.
"""

from __future__ import annotations

from promptist_core.model_needs import MissingModelsError, ModelNeed, check_needs, policy_needs, scorer_needs

from .errors import PromptistError, guarded

_PLAN = "_promptist_plan"
_READY = "_promptist_models_ready"


def plan(p, **parts) -> None:
    """Record a part of the job (`optimize=True`, `score_preset="pae"`), from a script's before_process."""
    planned = getattr(p, _PLAN, None)
    if planned is None:
        planned = {}
        setattr(p, _PLAN, planned)
    planned.update(parts)


def job_needs(planned: dict, settings: dict, models_dir) -> list[ModelNeed]:
    """The models the planned job loads, with the user's settings (the one list of a webui job's needs)."""
    from .optimize import policy_name
    from .score import scorer_settings

    needs = []
    if planned.get("optimize"):
        needs += policy_needs(policy_name(settings, models_dir), models_dir=models_dir)
    if planned.get("score_preset"):
        clip, aesthetic, pick = scorer_settings(settings)
        needs += scorer_needs(clip, aesthetic, pick_model=pick, preset=planned["score_preset"], models_dir=models_dir)
    return needs


def models_ready(p, settings: dict, models_dir) -> bool:
    """Check the planned job's models once; when some are missing, stop the job with one message naming each
    (and return False, so no script loads or runs anything)."""
    ready = getattr(p, _READY, None)
    if ready is None:
        def check():
            try:
                check_needs(job_needs(getattr(p, _PLAN, None) or {}, settings, models_dir))
            except MissingModelsError as e:
                raise PromptistError(str(e)) from e

        ready = guarded(p, "checking the models this job needs", check)
        setattr(p, _READY, ready)
    return ready
