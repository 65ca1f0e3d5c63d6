"""Interim: replaced by the A1111 branch's save_policy_folder (loads in transformers 4.30 and 5.x)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def save_policy_folder(model, tokenizer, folder: Path) -> Path:
    folder = Path(folder)
    tmp = folder.parent / f".{folder.name}.saving-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder
