"""The webui's own modules, in the one place that imports them (None outside the webui: tests, headless).

Every other module of the adapter takes `gr`, `shared`, `devices`, ... from here, and defines its webui
classes only `if IN_WEBUI`. Also the extension's own folders.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

EXTENSION_ROOT = Path(__file__).resolve().parents[1]

try:
    import gradio as gr
    from modules import devices, script_callbacks, scripts, shared
    from modules.call_queue import wrap_gradio_gpu_call
except ImportError:  # not inside the webui (tests, headless)
    gr = devices = script_callbacks = scripts = shared = wrap_gradio_gpu_call = None

IN_WEBUI = scripts is not None


def models_dirs(webui_models_path: str | None = None) -> list[Path]:
    """The webui's `models/promptist` (where webui users look, and where our trainers save), then
    `extensions/<this>/models`: a missing model's message names the first as the place to put it."""
    dirs = [Path(webui_models_path) / "promptist"] if webui_models_path else []
    return dirs + [EXTENSION_ROOT / "models"]


def expose_to_options_api(options: dict) -> None:
    """Add our settings to the webui's `GET /sdapi/v1/options` answer where it was built without them.

    The webui's API answers through `modules.api.models.OptionsModel`, a pydantic model made once, from the
    settings registered when `modules.api.models` is first imported; keys it lacks are dropped from the answer.
    A1111 1.10 imports it after the settings callbacks (so it has ours); Forge Neo imports it while loading the
    built-in extensions' scripts (sd_forge_controlnet imports `modules.api`), before any `on_ui_settings`, so
    its API listed none of our settings though they were saved and used. The API routes are made after the UI
    (and its settings), so a model extended here is the one they use. `options`: {key: OptionInfo}.
    """
    api_models = sys.modules.get("modules.api.models")
    model = getattr(api_models, "OptionsModel", None)
    if model is None:  # not imported yet: it will read the registered settings itself (A1111 1.10)
        return
    known = getattr(model, "model_fields", None) or getattr(model, "__fields__", {})  # pydantic 2 / 1
    missing = {key: info for key, info in options.items() if key not in known}
    if not missing:
        return
    from pydantic import Field, create_model

    typemap = getattr(getattr(shared, "opts", None), "typemap", {})
    fields = {}
    for key, info in missing.items():  # typed as the webui types its own settings (modules/api/models.py)
        kind = typemap.get(type(info.default), type(info.default)) if info.default else Any
        fields[key] = (kind | None, Field(default=info.default, description=info.label))
    api_models.OptionsModel = create_model("Options", __base__=model, **fields)


def ensure_temp_dir() -> None:
    """Create the webui's folder for images shown in the UI (Settings → "Directory for temporary images") if
    it is missing, so the Train and Evaluate tabs' curve and grid images can be shown.

    Forge Neo's default is `<data dir>/tmp`, made only when the setting is changed (or by a gradio theme cache
    under the webui's own folder): with `--data-dir` it does not exist, and gradio's answer to a Train button
    failed with `FileNotFoundError: .../tmp/tmpXXXX.png` after the run had saved. A1111 1.10's default is
    empty (the system temp folder).
    """
    opts = getattr(shared, "opts", None)
    # The attribute gives the default where config.json has no value (opts.data holds only what was loaded).
    folder = getattr(opts, "temp_dir", None) or getattr(opts, "data", {}).get("temp_dir")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
