"""promptist_core: host-agnostic prompt optimization for text-to-image models.

Never imports a host (`comfy`, `folder_paths`, `modules`). Heavy modules (torch, transformers)
are imported by the submodules that need them, so importing this package is cheap.
"""

from pathlib import Path

__version__ = "0.1.0"

PACKAGE_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_ROOT.parent


def check_own_packages(root: Path, names: tuple[str, ...] = ("promptist_core", "trainer")) -> None:
    """Fail clearly if `promptist_core` or `trainer` were imported from somewhere other than `root`.

    `trainer` is a common top-level name; a host environment may hold another package by that name.
    """
    import sys

    root = Path(root).resolve()
    for name in names:
        module = sys.modules.get(name)
        if module is None:
            continue
        origin = Path(getattr(module, "__file__", "") or "").resolve()
        if root not in origin.parents:
            raise ImportError(
                f"'{name}' was imported from {origin}, not from the promptist plugin at {root}. "
                f"Another installed package uses the name '{name}'; uninstall it or start the host "
                "from a clean environment."
            )

