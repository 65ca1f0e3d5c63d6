"""A cheap fingerprint of a model folder's contents, for caches that must notice a retrained model.

Why: a policy folder is retrained in place (ComfyUI's PPO node, `python -m trainer` while a host runs), and a
cache keyed by the folder's path serves the old weights until a restart. Hashing the weights on every look-up
would read hundreds of MB each time a host asks (ComfyUI asks on every queue), so the fingerprint is taken from
what `stat` says of each file the loader reads: the files directly in the folder (a training run's
`checkpoints/` and logs below it change during training without changing the model), with their size,
modification time and inode. A trainer's save replaces files (a new inode) or rewrites them (a new mtime and
usually a new size); copying a folder over another changes the mtimes.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path


def contents_fingerprint(path: Path | str) -> str:
    """16 hex digits that change when a file directly in folder `path` (or the file `path`) is added, removed,
    replaced or rewritten, and stay the same otherwise. A missing path has a fingerprint too (its absence)."""
    path = Path(path)
    digest = hashlib.sha256()
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name) if path.is_dir() else [path]
    except OSError as e:
        digest.update(f"unreadable {type(e).__name__}".encode())
        return digest.hexdigest()[:16]
    for entry in entries:
        try:
            st = os.stat(entry)  # follows links: the Hugging Face cache links its files to blobs
        except OSError:
            continue  # a dangling link or a file removed while we look: no file to load
        if not stat.S_ISREG(st.st_mode):
            continue
        name = entry.name if isinstance(entry, os.DirEntry) else Path(entry).name
        digest.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\n".encode())
    return digest.hexdigest()[:16]



def weights_fingerprint(labels: list[str], module) -> str:
    """16 hex digits of `labels` (a class name, a config) and of every tensor of `module` (an nn.Module, or None):
    the name of an encoder whose outputs are cached (TPO's latents), the same for the same weights in any host."""
    digest = hashlib.sha256()
    for label in labels:
        digest.update(label.encode())
    if module is not None:
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
