"""Training checkpoints: ``OUT/checkpoints/step_NNNNNN/state.pt`` written atomically (temp file, then rename),
so a run killed mid-save leaves the previous checkpoint intact; ``--resume latest`` picks the newest."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

STATE_FILE = "state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def save_checkpoint(root: Path, step: int, state: dict) -> Path:
    directory = Path(root) / f"step_{step:06d}"
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / (STATE_FILE + ".partial")
    torch.save(state, partial)
    os.replace(partial, directory / STATE_FILE)
    return directory


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return sorted(found)


def find_checkpoint(root: Path, where: str) -> Path:
    """``where`` = "latest" (newest under ``root``) or a checkpoint directory."""
    if where == "latest":
        found = list_checkpoints(root)
        if not found:
            raise ValueError(f"--resume latest: no checkpoint under {str(root)!r}; run without --resume first")
        return found[-1][1]
    path = Path(where).expanduser()
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"--resume {where!r} is not a checkpoint directory (no {STATE_FILE} in it)")
    return path


def load_checkpoint(path: Path) -> dict:
    # weights_only: a checkpoint is tensors, numbers, strings and lists/dicts of them; nothing to unpickle.
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)
