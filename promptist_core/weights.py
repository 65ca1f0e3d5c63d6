"""Where model files live: the one place that turns a model name into files on disk.

Every loader (optimizer, rewards, trainers) and every host adapter goes through `resolve` /
`resolve_file`, so the search order, the offline switch and the "where do I put the files"
message are the same everywhere. Order: explicit local path -> the host's models folder ->
the Hugging Face cache -> download (only when allowed; pinned sha256 where known).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_OPTIMIZER_MODEL = "microsoft/Promptist"
# The small SFT policy that ships inside the package (recipes/bundled_policy.py rebuilds it): found by this
# name with nothing downloaded or copied, and the optimizer's fallback when Promptist cannot be had.
BUNDLED_POLICY = "promptist-mini"
BUNDLED_POLICY_DIR = Path(__file__).resolve().parent / "policies" / BUNDLED_POLICY

# Environment switches that forbid any download.
OFFLINE_ENV_VARS = ("PROMPTIST_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
# Where headless users keep models when no host supplies a folder.
MODELS_DIR_ENV_VAR = "PROMPTIST_MODELS_DIR"
# Before a download, one request with this timeout checks that the server answers at all: on a machine
# without network, huggingface_hub's retries would otherwise cost about 30 s on every run.
REACHABILITY_TIMEOUT_S = 3.0
# Per socket operation of a single-file download (urllib has no timeout by default).
DOWNLOAD_TIMEOUT_S = 30.0
OFFLINE_HINT = ("To work offline, set PROMPTIST_OFFLINE=1 (or HF_HUB_OFFLINE=1; --offline on the command "
                "line): no download is tried then.")


class WeightsNotFoundError(FileNotFoundError):
    """A model could not be found locally and could not (or may not) be downloaded. `reason`, when set: why
    not, in a few words ("downloads are disabled (...)"), for callers that say it in their own sentence."""

    def __init__(self, message: str, reason: str | None = None, *, put_in: Path | None = None,
                 files: str | None = None, source: str | None = None):
        super().__init__(message)
        self.reason = reason
        # Where the files go, which ones, and where to get them: for a message that names several models.
        self.put_in, self.files, self.source = put_in, files, source

    def where_to_put(self) -> str:
        """'put FILES in FOLDER (from URL)' in one line; the message's first line when that is not known."""
        if self.put_in is None:
            return str(self).strip().splitlines()[0] if str(self).strip() else type(self).__name__
        return f"put {self.files or 'its files'} in {self.put_in}" + (f" (from {self.source})" if self.source else "")

    def carried_over(self, message: str) -> WeightsNotFoundError:
        """A reworded error that keeps where the files go."""
        return WeightsNotFoundError(message, self.reason, put_in=self.put_in, files=self.files, source=self.source)


class UnreadableWeightsError(WeightsNotFoundError):
    """A weights file that is there but cannot be used: truncated or corrupt, or a pickle that
    `torch.load(weights_only=True)` refuses. A WeightsNotFoundError, so every place that reports missing
    weights (the CLI's exit code 3, the hosts) reports this too; the message is one line naming the file."""

    def __init__(self, path: Path | str, problem: str):
        self.path, self.problem = Path(path), problem
        super().__init__(f"cannot load {path}: {problem}")


WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


class UnfinishedRunError(WeightsNotFoundError):
    """A models-folder entry that is a training run stopped before its first finished model: it holds
    checkpoints (`checkpoints/step-N/`, each a complete model folder for the policy trainers) but no model
    at its top level yet. Hosts reword `resume` (how to continue there); `last_checkpoint` loads as it is."""

    def __init__(self, name: str, folder: Path, last_checkpoint: Path, step: int, resume: str | None = None):
        self.name, self.folder, self.last_checkpoint, self.step = name, Path(folder), Path(last_checkpoint), step
        if resume is None:  # the command line's way; hosts pass their own (with_resume)
            trainer = _run_trainer(self.last_checkpoint)
            resume = (f"run `python -m trainer {trainer or '<its trainer>'} --out {folder} --resume` with the "
                      "run's other settings")
        super().__init__(
            f"model '{name}' ({folder}) is an unfinished training run: it has checkpoints (the last at step {step}) "
            f"but no finished model yet. To finish it, {resume}; it continues from step {step}. Or load its "
            f"last checkpoint as it is: {last_checkpoint}",
            reason="it is an unfinished training run")

    def with_resume(self, resume: str) -> UnfinishedRunError:
        """The same error, saying how this host continues a run."""
        return UnfinishedRunError(self.name, self.folder, self.last_checkpoint, self.step, resume)


# A run's checkpoints as the trainers write them (trainer/checkpoint.py: `checkpoints/step-0000007/`, with
# trainer_state.json written last, so a folder holding it is complete).
RUN_CHECKPOINTS_DIR = "checkpoints"
RUN_STEP_PREFIX = "step-"
RUN_STATE_FILE = "trainer_state.json"


def _run_trainer(checkpoint: Path) -> str | None:
    """The trainer that wrote a checkpoint (`sft`, `ppo`, ...), from its trainer_state.json."""
    try:
        trainer = json.loads((checkpoint / RUN_STATE_FILE).read_text(encoding="utf-8")).get("trainer")
    except (OSError, ValueError, AttributeError):
        return None
    return trainer if isinstance(trainer, str) and re.fullmatch(r"[a-z-]+", trainer) else None


def unfinished_run_checkpoint(folder: Path, required: tuple[tuple[str, ...], ...] = (("config.json",),)) -> tuple[Path, int] | None:
    """(last checkpoint, its step) when `folder` is a training run whose top level lacks `required` but whose
    newest complete checkpoint has them; else None."""
    root = Path(folder) / RUN_CHECKPOINTS_DIR
    if _folder_has(Path(folder), required) or not root.is_dir():
        return None
    steps = []
    for step_dir in root.glob(f"{RUN_STEP_PREFIX}*"):
        number = step_dir.name[len(RUN_STEP_PREFIX):]
        if number.isdigit() and (step_dir / RUN_STATE_FILE).is_file() and _folder_has(step_dir, required):
            steps.append((int(number), step_dir))
    if not steps:
        return None
    step, last = max(steps)
    return last, step


def unreadable_weights_problem(error: BaseException) -> str | None:
    """What is wrong with a weights file, from the error a loader raised; None if the error is not about that.

    Recognised: safetensors' SafetensorError (truncated, empty, not safetensors), torch's refusal to
    unpickle objects under weights_only=True, and torch's unreadable zip archive (a truncated .bin)."""
    text = str(error)
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    if type(error).__name__ == "SafetensorError":
        return f"it is not a complete safetensors file ({first}); it is probably truncated: download it again"
    if isinstance(error, pickle.UnpicklingError) and "weights only load failed" in text.lower():
        detail = re.search(r"WeightsUnpickler error: ([^.]*)", text)
        return ("it is a pickle holding more than tensors, and promptist never unpickles objects (torch.load with "
                f"weights_only=True refused it{': ' + detail.group(1) if detail else ''}); "
                "use the model's .safetensors file instead")
    if "PytorchStreamReader" in text or isinstance(error, EOFError) or isinstance(error, pickle.UnpicklingError):
        return (f"it is not a readable torch checkpoint ({first.split('. ')[0]}); it is probably truncated: "
                "download it again")
    return None


def _weights_file(location: Path, error: BaseException) -> Path:
    """The file an error is about: `location` itself, or the weights file in that folder it most likely means."""
    if not location.is_dir():
        return location
    files = sorted(p for p in location.iterdir() if p.suffix in WEIGHT_FILE_SUFFIXES and p.is_file())
    named = [p for p in files if p.name in str(error)]
    safetensors_first = type(error).__name__ == "SafetensorError"
    ranked = named + sorted(files, key=lambda p: (p.suffix == ".safetensors") != safetensors_first)
    return ranked[0] if ranked else location


@contextmanager
def reading_weights(location: Path | str) -> Iterator[None]:
    """Around a loader call: an error about an unreadable weights file in `location` (a file or a model
    folder) becomes an UnreadableWeightsError naming the file, instead of a loader's traceback."""
    try:
        yield
    except WeightsNotFoundError:
        raise
    except Exception as e:
        problem = unreadable_weights_problem(e)
        if problem is None:
            raise
        raise UnreadableWeightsError(_weights_file(Path(location), e), problem) from e


@dataclass(frozen=True)
class HubModel:
    """A model folder published on the Hugging Face Hub."""

    repo_id: str
    # Files that must be present for the folder to be usable (any one of each tuple).
    required: tuple[tuple[str, ...], ...] = (("config.json",),)
    allow_patterns: tuple[str, ...] = ("*.json", "*.safetensors", "*.txt", "*.model")
    # Where the tokenizer comes from when the model repo ships none (Promptist uses GPT-2's).
    tokenizer_repo_id: str | None = None


@dataclass(frozen=True)
class FileModel:
    """A single weights file downloadable from a URL, pinned by sha256."""

    filename: str
    url: str
    sha256: str | None = None


@dataclass(frozen=True)
class ResolveAttempt:
    where: str
    path: str


@dataclass
class SearchLog:
    attempts: list[ResolveAttempt] = field(default_factory=list)

    def add(self, where: str, path: Path | str) -> None:
        self.attempts.append(ResolveAttempt(where, str(path)))

    def lines(self) -> str:
        return "\n".join(f"  - {a.where}: {a.path}" for a in self.attempts)


TOKENIZER_FILES = (("tokenizer.json", "vocab.json"),)

KNOWN_HUB_MODELS: dict[str, HubModel] = {
    # Promptist's repo holds the GPT-2 policy only; the reference code loads the "gpt2" tokenizer.
    "microsoft/Promptist": HubModel(
        "microsoft/Promptist",
        required=(("config.json",), ("model.safetensors", "pytorch_model.bin")),
        allow_patterns=("*.json", "*.safetensors", "*.txt", "pytorch_model.bin"),
        tokenizer_repo_id="openai-community/gpt2",
    ),
    "openai-community/gpt2": HubModel(
        "openai-community/gpt2",
        required=(("config.json",),) + TOKENIZER_FILES,
        allow_patterns=("*.json", "*.safetensors", "*.txt"),
    ),
    # Reward models (promptist_core.clip_models). Only the files we load are downloaded, not the
    # other formats these repos also hold (timm weights, .bin duplicates, 4 GB of CLIP-H).
    "timm/vit_large_patch14_clip_224.openai": HubModel(
        "timm/vit_large_patch14_clip_224.openai",
        required=(("open_clip_config.json",), ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")),
        allow_patterns=("open_clip_config.json", "open_clip_model.safetensors"),
    ),
    "openai/clip-vit-large-patch14": HubModel(
        "openai/clip-vit-large-patch14",
        required=(("config.json",), ("model.safetensors", "pytorch_model.bin")) + TOKENIZER_FILES,
        allow_patterns=("*.json", "model.safetensors", "merges.txt"),
    ),
    "yuvalkirstain/PickScore_v1": HubModel(
        "yuvalkirstain/PickScore_v1",
        required=(("config.json",), ("model.safetensors", "pytorch_model.bin")),
        allow_patterns=("*.json", "model.safetensors", "merges.txt"),
        tokenizer_repo_id="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    ),
    # PickScore's processor: tokenizer and image settings only.
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K": HubModel(
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        required=TOKENIZER_FILES + (("preprocessor_config.json",),),
        allow_patterns=("tokenizer*.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                        "preprocessor_config.json"),
    ),
}


# Short names the Hub still redirects: `gpt2` is `openai-community/gpt2` (a folder named `gpt2` in a
# models folder is found first, as `local_folder_name` of the full id).
HUB_ALIASES = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}


def downloads_allowed(allow_download: bool | None = None) -> bool:
    """Explicit argument wins; otherwise any of OFFLINE_ENV_VARS set to a true value forbids downloads."""
    if allow_download is not None:
        return allow_download
    for var in OFFLINE_ENV_VARS:
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return False
    return True


def hub_endpoint() -> str:
    """The Hugging Face Hub address downloads go to: $HF_ENDPOINT, else huggingface_hub's default."""
    env = os.environ.get("HF_ENDPOINT", "").strip()
    if env:
        return env.rstrip("/")
    try:
        from huggingface_hub import constants

        return constants.ENDPOINT.rstrip("/")
    except Exception:  # pragma: no cover - huggingface_hub is a hard dependency
        return "https://huggingface.co"


def unreachable_reason(url: str, timeout: float = REACHABILITY_TIMEOUT_S) -> str | None:
    """None when a server answers at `url` (any HTTP status counts), else why not: one try, short timeout.

    Only http(s) URLs are probed; anything else (a file:// URL) counts as reachable."""
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        return None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # 401, 404, 5xx: a server answered, so the network is there
    except (OSError, ValueError) as e:  # URLError (refused, DNS), timeout
        reason = getattr(e, "reason", None) or e
        return f"{type(reason).__name__}: {reason}"


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__


def default_models_dir() -> Path:
    """The folder headless users keep models in: $PROMPTIST_MODELS_DIR, else ./models/promptist."""
    env = os.environ.get(MODELS_DIR_ENV_VAR)
    return Path(env).expanduser() if env else Path.cwd() / "models" / "promptist"


def local_folder_name(name: str) -> str:
    """`microsoft/Promptist` is kept as `<models_dir>/Promptist`: what users see on the Hub page."""
    return name.rstrip("/").split("/")[-1]


def _as_dirs(models_dir: Path | str | Sequence[Path | str] | None) -> list[Path]:
    if models_dir is None:
        return [default_models_dir()]
    if isinstance(models_dir, (str, Path)):
        return [Path(models_dir)]
    return [Path(d) for d in models_dir]


def _folder_has(folder: Path, required: tuple[tuple[str, ...], ...]) -> bool:
    return folder.is_dir() and all(any((folder / f).is_file() for f in group) for group in required)


def _is_meant_as_path(name: str) -> bool:
    """Hub ids are `owner/name`; anything else with a separator, or starting with . / ~, is a path."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or Path(name).expanduser().exists()


def hf_cache_dirs() -> list[Path]:
    """The Hugging Face caches to look in, read at call time (a host may change them after we import).

    First where the host points now (Forge sets HF_HUB_CACHE / HF_HOME to its `models/diffusers` at
    start-up; `huggingface_hub.constants` if it was imported earlier), then the user's default cache
    (`~/.cache/huggingface/hub`), where models downloaded outside the host live.
    """
    dirs: list[Path] = []
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            dirs.append(Path(os.environ[var]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    try:
        from huggingface_hub import constants

        dirs.append(Path(constants.HF_HUB_CACHE))
    except Exception:  # pragma: no cover - huggingface_hub is a hard dependency
        pass
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    dirs.append(Path(cache_home) / "huggingface" / "hub")
    unique = {}
    for d in dirs:
        unique.setdefault(os.path.normcase(os.path.abspath(os.path.expanduser(str(d)))), Path(d).expanduser())
    return list(unique.values())


def _hub_cache_folder(repo_id: str, required: tuple[tuple[str, ...], ...], cache_dir: Path) -> Path | None:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub is a hard dependency
        return None
    if not cache_dir.is_dir():
        return None
    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True, cache_dir=str(cache_dir)))
    except Exception:
        return None
    return folder if _folder_has(folder, required) else None


def resolve(
    name: str,
    *,
    models_dir: Path | str | Sequence[Path | str] | None = None,
    allow_download: bool | None = None,
    required: tuple[tuple[str, ...], ...] | None = None,
) -> Path:
    """Return a local folder holding model `name` (a path, a folder under `models_dir`, or a Hub id).

    `models_dir` is the host's folder (ComfyUI `models/promptist`, A1111 `extensions/<ext>/models`)
    or several of them, searched in order. Raises WeightsNotFoundError naming every place looked at.
    """
    if not name or not name.strip():
        raise ValueError("model name is empty: give a folder path or a Hugging Face id like microsoft/Promptist")
    name = name.strip()
    if name in HUB_ALIASES and not Path(name).expanduser().exists():
        name = HUB_ALIASES[name]
    known = KNOWN_HUB_MODELS.get(name)
    required = required or (known.required if known else (("config.json",),))
    dirs = _as_dirs(models_dir)
    log = SearchLog()

    # 1. explicit local path
    candidate = Path(name).expanduser()
    if _is_meant_as_path(name):
        if _folder_has(candidate, required):
            return candidate
        if candidate.is_dir():
            missing = [" or ".join(g) for g in required if not any((candidate / f).is_file() for f in g)]
            raise WeightsNotFoundError(
                f"model folder {candidate} is incomplete: missing {', '.join(missing)}. "
                "Copy the model's files (config.json, model.safetensors, tokenizer files) into it."
            )
        raise WeightsNotFoundError(f"model folder {candidate} does not exist.")

    # 2. the host's models folder(s)
    for d in dirs:
        for sub in dict.fromkeys((local_folder_name(name), name)):
            folder = d / sub
            log.add("models folder", folder)
            if _folder_has(folder, required):
                return folder
            unfinished = unfinished_run_checkpoint(folder, required)
            if unfinished is not None:  # "put the model files here" would be wrong advice for a run's folder
                raise UnfinishedRunError(name, folder, *unfinished)

    # 3. the policy that ships with promptist (a user's own folder of that name, found above, wins)
    if name == BUNDLED_POLICY:
        log.add("bundled with promptist", BUNDLED_POLICY_DIR)
        if _folder_has(BUNDLED_POLICY_DIR, required):
            return BUNDLED_POLICY_DIR

    # 4. the Hugging Face cache (only for names that look like Hub ids)
    is_hub_id = name.count("/") == 1
    if is_hub_id:
        for cache_dir in hf_cache_dirs():
            log.add("Hugging Face cache", cache_dir / f"models--{name.replace('/', '--')}")
            folder = _hub_cache_folder(name, required, cache_dir)
            if folder is not None:
                return folder

    # 5. download
    allowed = downloads_allowed(allow_download)
    target = dirs[0] / local_folder_name(name)
    why = "downloads are disabled (PROMPTIST_OFFLINE / HF_HUB_OFFLINE)" if is_hub_id else (
        "it is not a Hugging Face id, so it cannot be downloaded")
    tried = is_hub_id and allowed
    if tried:
        endpoint = hub_endpoint()
        unreachable = unreachable_reason(endpoint)
        if unreachable:
            why = f"downloading it failed: the Hugging Face Hub ({endpoint}) cannot be reached ({unreachable})"
        else:
            try:
                return _download_hub(name, target, known, required)
            except Exception as e:  # unknown repo, gated, disk full: say where to put the files instead
                why = f"downloading it failed ({_first_line(e)})"
    needed = ", ".join(" or ".join(g) for g in required)
    raise WeightsNotFoundError(
        f"model '{name}' was not found and {why}.\nLooked in:\n{log.lines()}\n"
        f"Put the model files ({needed}, plus the tokenizer files) in: {target}"
        + (f"\n(download them from https://huggingface.co/{name})" if is_hub_id else "")
        + (f"\n{OFFLINE_HINT}" if tried else ""),
        reason=why, put_in=target, files=needed, source=f"https://huggingface.co/{name}" if is_hub_id else None,
    )


def choose_default_policy(*, models_dir=None, allow_download: bool | None = None) -> tuple[str, str | None]:
    """The policy to use when the user names none: microsoft/Promptist where it is in a models folder or the
    HF cache or can be downloaded, else the bundled policy. Returns (name, None) or (BUNDLED_POLICY, the one
    line that says which model, why and how to get Promptist). Decides in seconds offline (the Hub is
    probed once, briefly). A broken Promptist folder is an error, not a reason to switch."""
    try:
        resolve(DEFAULT_OPTIMIZER_MODEL, models_dir=models_dir, allow_download=allow_download)
        return DEFAULT_OPTIMIZER_MODEL, None
    except UnreadableWeightsError:
        raise
    except WeightsNotFoundError as e:
        why = e.reason or "it is in none of the places looked at"
        target = _as_dirs(models_dir)[0] / local_folder_name(DEFAULT_OPTIMIZER_MODEL)
        return BUNDLED_POLICY, (f"promptist: using the bundled policy {BUNDLED_POLICY} (small, SFT only): "
                                f"{DEFAULT_OPTIMIZER_MODEL} is not here and {why}; for the paper's RL policy, "
                                f"run once online or put its files in {target}")


def resolve_tokenizer(model_folder: Path, name: str, *, models_dir=None, allow_download: bool | None = None) -> Path:
    """The folder to load the tokenizer from: the model folder if it has one, else the known fallback."""
    if _folder_has(model_folder, TOKENIZER_FILES):
        return model_folder
    known = KNOWN_HUB_MODELS.get(name)
    if known is None or known.tokenizer_repo_id is None:
        raise WeightsNotFoundError(
            f"model folder {model_folder} has no tokenizer (tokenizer.json or vocab.json + merges.txt). "
            "Copy the tokenizer files that came with the model into it."
        )
    try:
        return resolve(known.tokenizer_repo_id, models_dir=models_dir, allow_download=allow_download,
                       required=TOKENIZER_FILES)
    except WeightsNotFoundError as e:
        raise e.carried_over(
            f"{e}\nAlternatively copy GPT-2's tokenizer files (vocab.json, merges.txt) into {model_folder}."
        ) from None


def _download_hub(repo_id: str, target: Path, known: HubModel | None, required) -> Path:
    from huggingface_hub import list_repo_files, snapshot_download

    patterns = list(known.allow_patterns if known else HubModel(repo_id).allow_patterns)
    # Never fetch a pickle when safetensors exist.
    if "pytorch_model.bin" in patterns:
        try:
            if any(f.endswith(".safetensors") for f in list_repo_files(repo_id)):
                patterns.remove("pytorch_model.bin")
        except Exception:
            pass
    existed = target.exists()
    try:
        target.mkdir(parents=True, exist_ok=True)
        snapshot_download(repo_id, local_dir=str(target), allow_patterns=patterns)
    except BaseException:
        # Leave no empty folder behind to look like a model (a finished file or two is kept to resume).
        if not existed and not any(p.is_file() for p in target.glob("*")):
            shutil.rmtree(target, ignore_errors=True)
        raise
    if not _folder_has(target, required):
        raise WeightsNotFoundError(f"downloaded {repo_id} into {target} but it lacks {required}")
    return target


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def resolve_file(
    name: str,
    *,
    known: FileModel | None = None,
    models_dir: Path | str | Sequence[Path | str] | None = None,
    allow_download: bool | None = None,
) -> Path:
    """Return a local single weights file: `name` as a path, `<models_dir>/<filename>`, or a download."""
    log = SearchLog()
    candidate = Path(name).expanduser()
    log.add("local path", candidate)
    if candidate.is_file():
        return candidate
    filename = known.filename if known else candidate.name
    dirs = _as_dirs(models_dir)
    for d in dirs:
        log.add("models folder", d / filename)
        if (d / filename).is_file():
            return d / filename
    why = "downloads are disabled (PROMPTIST_OFFLINE / HF_HUB_OFFLINE)" if known else "no download URL is known for it"
    tried = known is not None and downloads_allowed(allow_download)
    if tried:
        parts = urllib.parse.urlsplit(known.url)
        unreachable = unreachable_reason(f"{parts.scheme}://{parts.netloc}/")
        if unreachable:
            why = f"downloading it failed: {parts.netloc} cannot be reached ({unreachable})"
        else:
            try:
                return download_file(known.url, dirs[0] / filename, known.sha256)
            except Exception as e:  # cut connection, sha256 mismatch, disk full
                why = f"downloading it failed ({_first_line(e)})"
    raise WeightsNotFoundError(
        f"weights file '{filename}' was not found and {why}.\nLooked in:\n{log.lines()}\n"
        f"Put the file in: {dirs[0] / filename}" + (f"\n(download it from {known.url})" if known else "")
        + (f"\n{OFFLINE_HINT}" if tried else ""),
        reason=why, put_in=dirs[0], files=filename, source=known.url if known else None,
    )


def download_file(url: str, target: Path, sha256: str | None = None) -> Path:
    """Download to a temporary file beside `target`, check sha256, then rename: never a half file."""
    from tqdm.auto import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {target.name}") as bar:
                while block := resp.read(1 << 20):
                    out.write(block)
                    bar.update(len(block))
        if sha256 is not None:
            got = sha256_of(Path(tmp))
            if got != sha256:
                raise OSError(f"sha256 mismatch for {url}: expected {sha256}, got {got}; the file was discarded")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load_tokenizer(folder: Path | str, **kwargs):
    """AutoTokenizer for a resolved folder, also where the host's transformers/tokenizers are older than
    the ones that wrote it (A1111 1.10 ships transformers 4.30 + tokenizers 0.13, which know neither
    transformers 5's `tokenizer_class: TokenizersBackend` nor its tokenizer.json): then the folder's
    vocab.json + merges.txt are read as GPT-2's byte-level BPE."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    try:
        return _checked(AutoTokenizer.from_pretrained(str(folder), **kwargs), folder)
    except Exception as e:
        if not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
            raise
        first = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        logger.warning("tokenizer in %s did not load (%s); using its vocab.json + merges.txt", folder, first)
        try:
            return _checked(_gpt2_tokenizer_from_vocab(folder, **kwargs), folder)
        except Exception as e2:
            raise ValueError(f"the tokenizer in {folder} cannot be read ({first}), nor its vocab.json + merges.txt "
                             f"({type(e2).__name__}: {e2}). Copy the tokenizer files that came with the model "
                             "into it again.") from e2


def _checked(tokenizer, folder: Path):
    """Some versions build an empty tokenizer from unreadable files instead of raising: refuse it."""
    if not tokenizer("a photo")["input_ids"]:
        raise ValueError(f"the tokenizer in {folder} encodes text to nothing (its files are empty or broken)")
    return tokenizer


def _gpt2_tokenizer_from_vocab(folder: Path, **kwargs):
    """GPT-2's tokenizer class on the folder's vocab.json + merges.txt, with its special tokens."""
    from transformers import GPT2Tokenizer, GPT2TokenizerFast

    json.loads((folder / "vocab.json").read_text(encoding="utf-8"))  # a clear error for a broken file
    settings = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            settings.update({k: v for k, v in data.items() if k in _TOKENIZER_SETTINGS and v is not None})
    for key, value in settings.items():
        if isinstance(value, dict):  # {"content": "<|endoftext|>", ...} (AddedToken as saved)
            settings[key] = value.get("content")
    settings.update(kwargs)
    try:
        return GPT2TokenizerFast(**_vocab_files(GPT2TokenizerFast, folder), **settings)
    except Exception as e:  # no converter for this tokenizers version: the slow tokenizer still reads them
        logger.warning("fast GPT-2 tokenizer from %s failed (%s); using the slow one", folder, e)
        return GPT2Tokenizer(**_vocab_files(GPT2Tokenizer, folder), **settings)


def _vocab_files(tokenizer_class, folder: Path) -> dict[str, str]:
    """The keywords that hand `tokenizer_class` the folder's vocab.json + merges.txt: `vocab_file`/`merges_file`
    in transformers 4.x; transformers 5 takes `vocab`/`merges` (a path or the data) and silently builds an
    empty tokenizer from the old names, so the class's own signature decides."""
    vocab, merges = str(folder / "vocab.json"), str(folder / "merges.txt")
    if "vocab_file" in inspect.signature(tokenizer_class.__init__).parameters:
        return {"vocab_file": vocab, "merges_file": merges}
    return {"vocab": vocab, "merges": merges}


_TOKENIZER_SETTINGS = ("bos_token", "eos_token", "unk_token", "pad_token", "model_max_length", "add_prefix_space",
                       "errors")


def resolve_dataset_file(spec: str, *, allow_download: bool | None = None) -> Path:
    """A file of a Hugging Face dataset repo, `OWNER/NAME/path/to/file`: from the HF cache, else
    downloaded when allowed (the same offline switches as models)."""
    parts = spec.strip().strip("/").split("/")
    if len(parts) < 3 or not all(parts):
        raise ValueError(f"dataset file '{spec}' must look like OWNER/NAME/path/to/file "
                         "(e.g. hf-dataset:poloclub/diffusiondb/metadata.parquet)")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    from huggingface_hub import hf_hub_download

    caches = hf_cache_dirs()
    for cache in caches:
        try:
            return Path(hf_hub_download(repo_id, filename, repo_type="dataset", local_files_only=True,
                                        cache_dir=str(cache)))
        except Exception:
            continue
    why = "downloads are disabled (PROMPTIST_OFFLINE / HF_HUB_OFFLINE)"
    if downloads_allowed(allow_download):
        unreachable = unreachable_reason(hub_endpoint())
        if unreachable:
            why = f"the Hub cannot be reached ({unreachable}); offline, set PROMPTIST_OFFLINE=1"
        else:
            try:
                return Path(hf_hub_download(repo_id, filename, repo_type="dataset"))
            except Exception as e:
                why = f"downloading it failed ({_first_line(e)})"
    raise WeightsNotFoundError(
        f"dataset file '{filename}' of {repo_id} is not in the Hugging Face cache "
        f"({', '.join(map(str, caches))}) and {why}.\n"
        f"Download it from https://huggingface.co/datasets/{repo_id}/blob/main/{filename} and pass its local path."
    )

