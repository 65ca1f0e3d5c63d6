"""ComfyUI entry point: registers the Promptist nodes. Nothing heavy is imported here.

ComfyUI imports this folder as a package. Our libraries (`promptist_core`, `trainer`) are
top-level packages in this folder: put it on sys.path just long enough to import them, so our
`nodes/` folder never shadows ComfyUI's own `nodes` module.
"""

import importlib.util
import logging
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent
_log = logging.getLogger("promptist")


# module -> pip name, for the one-line "what is missing" message: what the nodes import. Not diffusers (only the
# headless generators and trainers use it, and install.py rightly skips it in ComfyUI: naming it here sent users
# to an installer that then had nothing to install).
_DEPENDENCIES = {"transformers": "transformers", "safetensors": "safetensors", "huggingface_hub": "huggingface_hub",
                 "open_clip": "open_clip_torch"}


def _missing_dependencies() -> list[str]:
    return [pip for module, pip in _DEPENDENCIES.items() if importlib.util.find_spec(module) is None]


def _import_core() -> bool:
    sys.path.insert(0, str(_ROOT))
    try:
        import promptist_core

        promptist_core.check_own_packages(_ROOT, names=("promptist_core",))
        try:  # claim the generic name `trainer` for ours; another pack may own it already
            import trainer  # noqa: F401

            promptist_core.check_own_packages(_ROOT, names=("trainer",))
        except ImportError as e:
            _log.warning("[promptist] training is unavailable: %s", e)
        return True
    except ImportError as e:
        _log.error("[promptist] not loaded: %s. Run: %s %s", e, sys.executable, _ROOT / "install.py")
        return False
    finally:
        sys.path.remove(str(_ROOT))


_missing = _missing_dependencies()
if _missing:  # ComfyUI keeps starting; the nodes load and say the same if used
    _log.error("[promptist] missing dependencies: %s. Run: %s %s", ", ".join(_missing), sys.executable,
               _ROOT / "install.py")

if _import_core():
    try:
        from .nodes import NODES
        from .nodes.comfy_schema import HAS_V3
    except ImportError as e:  # an optional dependency missing: one clear line, ComfyUI keeps starting
        _log.error("[promptist] nodes not loaded: %s. Run: %s %s", e, sys.executable, _ROOT / "install.py")
        NODES, HAS_V3 = [], False

    if HAS_V3:
        from comfy_api.latest import ComfyExtension

        class PromptistExtension(ComfyExtension):
            async def get_node_list(self):
                return list(NODES)

        async def comfy_entrypoint() -> ComfyExtension:
            return PromptistExtension()

    else:
        NODE_CLASS_MAPPINGS = {n.SPEC.NODE_ID: n for n in NODES}
        NODE_DISPLAY_NAME_MAPPINGS = {n.SPEC.NODE_ID: n.SPEC.DISPLAY_NAME for n in NODES}
else:
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}
