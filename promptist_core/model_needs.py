"""What a job needs on disk, checked before it starts: every missing model named in one message.

A job loads its models one after another (the policy, then the scoring CLIP, the aesthetic head, PickScore), so
a user offline would meet one missing model per attempt. Each host lists the job's needs (`policy_needs`,
`scorer_needs`) and calls `check_needs` once before anything runs. Finding goes through the loaders' own
finders (weights.resolve / resolve_file underneath): no second resolver, and nothing is loaded here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .weights import KNOWN_HUB_MODELS, TOKENIZER_FILES, UnreadableWeightsError, WeightsNotFoundError, resolve


@dataclass(frozen=True)
class ModelNeed:
    """One model a job loads: what it is for (`role`, as the user knows it), its name, and how to find it."""

    role: str
    name: str
    find: Callable[[], object]  # raises WeightsNotFoundError when the files are not there


class MissingModelsError(WeightsNotFoundError):
    """Some models a job needs are missing: one line per model (which, which files, where they go)."""

    def __init__(self, missing: Sequence[tuple[ModelNeed, WeightsNotFoundError]]):
        self.missing = list(missing)
        reasons = list(dict.fromkeys(e.reason for _, e in self.missing if e.reason))
        count = len(self.missing)
        head = (f"{count} model{'s' if count > 1 else ''} this job needs {'are' if count > 1 else 'is'} not here"
                + (f" ({'; '.join(reasons)})" if reasons else "") + ":")
        lines = [f"- {need.role} '{need.name}': {error.where_to_put()}" for need, error in self.missing]
        super().__init__("\n".join([head, *lines]), reasons[0] if len(reasons) == 1 else None)


def policy_needs(name: str | None, *, models_dir=None, allow_download: bool | None = None) -> list[ModelNeed]:
    """The policy folder and its tokenizer (load_optimizer's finding). No name: the default policy, which falls
    back to the bundled one, so it is never missing."""
    if not name:
        return []
    from .weights import resolve_tokenizer

    def find() -> Path:
        folder = resolve(name, models_dir=models_dir, allow_download=allow_download)
        return resolve_tokenizer(folder, name, models_dir=models_dir, allow_download=allow_download)

    return [ModelNeed("the optimizer policy", name, find)]


def scorer_needs(clip_model: str, aesthetic: str, *, pick_model: str | None = None, preset="promptist",
                 clip_architecture: str | None = None, models_dir=None,
                 allow_download: bool | None = None) -> list[ModelNeed]:
    """What load_scorer loads for `preset`: the CLIP, the aesthetic head, and PickScore where the preset
    weighs it (or `pick_model` is set)."""
    from .aesthetic import find_aesthetic_head
    from .clip_models import DEFAULT_PICKSCORE_MODEL, find_clip
    from .rewards import get_preset

    if get_preset(preset).pick_weight and not pick_model:
        pick_model = DEFAULT_PICKSCORE_MODEL
    common = dict(models_dir=models_dir, allow_download=allow_download)
    needs = [
        ModelNeed("the scoring CLIP", clip_model,
                  lambda: find_clip(clip_model, architecture=clip_architecture, with_tokenizer=True, **common)),
        ModelNeed("the aesthetic head", aesthetic, lambda: find_aesthetic_head(aesthetic, **common)),
    ]
    if pick_model:
        tokenizer = KNOWN_HUB_MODELS[pick_model].tokenizer_repo_id if pick_model in KNOWN_HUB_MODELS else None
        needs.append(ModelNeed("PickScore", pick_model,
                               lambda: find_clip(pick_model, with_tokenizer=not tokenizer, **common)))
        if tokenizer:  # a separate download (PickScore's repo has none): named even while PickScore is missing
            needs.append(ModelNeed("PickScore's tokenizer", tokenizer,
                                   lambda: _tokenizer_of(pick_model, models_dir, allow_download)))
    return needs


def _tokenizer_of(name: str, models_dir, allow_download) -> Path:
    """The tokenizer load_clip would use for a known transformers CLIP: the model folder's own, where the folder
    is there and has one, else its known tokenizer repo."""
    from .clip_models import _tokenizer_folder

    try:
        folder = resolve(name, models_dir=models_dir, allow_download=allow_download,
                         required=KNOWN_HUB_MODELS[name].required)
    except WeightsNotFoundError:
        tokenizer = KNOWN_HUB_MODELS[name].tokenizer_repo_id
        return resolve(tokenizer, models_dir=models_dir, allow_download=allow_download,
                       required=KNOWN_HUB_MODELS[tokenizer].required if tokenizer in KNOWN_HUB_MODELS
                       else TOKENIZER_FILES)
    return _tokenizer_folder(folder, name, None, models_dir, allow_download)


def check_needs(needs: Sequence[ModelNeed]) -> None:
    """Find every need (each once); raise MissingModelsError naming all the missing ones. A file that is there
    but broken (UnreadableWeightsError) is raised as it is: it needs its own fix."""
    missing, seen = [], set()
    for need in needs:
        if (need.role, need.name) in seen:
            continue
        seen.add((need.role, need.name))
        try:
            need.find()
        except UnreadableWeightsError:
            raise
        except WeightsNotFoundError as e:
            missing.append((need, e))
    if missing:
        raise MissingModelsError(missing)
