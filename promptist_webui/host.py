"""The webui's own modules, in the one place that imports them (None outside the webui: tests, headless).

Every other module of the adapter takes `gr`, `shared`, `devices`, ... from here, and defines its webui
classes only `if IN_WEBUI`. Also the extension's own folders.
"""

from __future__ import annotations

from pathlib import Path

EXTENSION_ROOT = Path(__file__).resolve().parents[1]

try:
    import gradio as gr
    from modules import devices, script_callbacks, scripts, shared
    from modules.call_queue import wrap_gradio_gpu_call
except ImportError:  # not inside the webui (tests, headless)
    gr = devices = script_callbacks = scripts = shared = wrap_gradio_gpu_call = None

IN_WEBUI = scripts is not None


def models_dirs(webui_models_path: str | None = None) -> list[Path]:
    """`extensions/<this>/models`, then the webui's `models/promptist`."""
    dirs = [EXTENSION_ROOT / "models"]
    if webui_models_path:
        dirs.append(Path(webui_models_path) / "promptist")
    return dirs
