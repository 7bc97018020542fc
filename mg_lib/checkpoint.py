"""Checkpoints: one self-describing `.pt` of plain containers and tensors.

Layout (FORMAT "mg-checkpoint", VERSION 1):

    format, version, mg_version, created   what wrote it
    recipe      the resolved recipe (dict)
    arch        Arch.to_dict(): kind, depth, width, members, templates, stem, classes, grown
    stage       "members" | "grown";  target: the grow target a grown net trains for
    lineage     list of operations: {"op": "init" | "grow", ...}
    model       state_dict tensors, on CPU
    train       trainer state: per-phase epochs, position, optimizer state, RNG states
    history     one dict per evaluated epoch (the same lines as metrics.jsonl)
    flops       training FLOPs spent so far, per phase

`torch.load(path, weights_only=True)` always works, so loading never runs code. Writes go
to a temporary file in the same folder, fsync'd, then renamed over the old file: a crash
mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import datetime as _dt
import errno
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import MgError, RunError
from .wrn import WRN, Arch, build_model

FORMAT = "mg-checkpoint"
VERSION = 1
MG_VERSION = "0.1.0"
REQUIRED = ("recipe", "arch", "stage", "lineage", "model", "train", "history", "flops")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def make(recipe: dict[str, Any], model: WRN, *, lineage: list[dict[str, Any]],
         train: dict[str, Any], history: list[dict[str, Any]], flops: dict[str, Any],
         target: str | None = None) -> dict[str, Any]:
    """Assemble a checkpoint dict (tensors moved to CPU)."""
    arch = model.arch
    return {
        "format": FORMAT, "version": VERSION, "mg_version": MG_VERSION, "created": now(),
        "recipe": recipe, "arch": arch.to_dict(),
        "stage": "grown" if arch.grown else "members", "target": target,
        "lineage": lineage,
        "model": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
        "train": train, "history": history, "flops": flops,
    }


def save(ckpt: dict[str, Any], path: str | Path) -> Path:
    """Write atomically: temp file in the same folder, fsync, rename over `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise RunError(f"{path}: cannot write checkpoint ({e.strerror or e})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except (OSError, RuntimeError) as e:
        Path(tmp).unlink(missing_ok=True)
        full = isinstance(e, OSError) and e.errno == errno.ENOSPC
        why = "disk full" if full or "No space" in str(e) else str(e).splitlines()[0]
        raise RunError(f"{path}: checkpoint not written ({why}); the previous file is intact"
                       ) from None
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load(path: str | Path) -> dict[str, Any]:
    """Read and validate a checkpoint; every problem is one MgError naming the file."""
    path = Path(path)
    if not path.exists():
        raise MgError(f"{path}: checkpoint not found")
    if path.is_dir():
        raise MgError(f"{path}: is a directory, not a checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = str(e).split("\n")[0] if "Unsupported" in str(e) else "not a torch file"
        if "weights_only" in str(e) or "Unsupported" in str(e) or "GLOBAL" in str(e):
            raise MgError(f"{path}: refused: the file holds pickled Python objects, which mg "
                          "never loads (weights_only=True)") from None
        raise MgError(f"{path}: not an mg checkpoint ({detail})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MgError(f"{path}: not a readable checkpoint (truncated or corrupt: {first})"
                      ) from None
    validate(ckpt, path)
    return ckpt


def validate(ckpt: Any, path: str | Path) -> None:
    """Check format, version, keys and tensor shapes against the stored architecture."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise MgError(f"{path}: not an mg checkpoint (no '{FORMAT}' marker)")
    version = ckpt.get("version")
    if not isinstance(version, int):
        raise MgError(f"{path}: checkpoint has no format version")
    if version > VERSION:
        raise MgError(f"{path}: checkpoint format {version} is newer than this mg reads "
                      f"({VERSION}); upgrade mg")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise MgError(f"{path}: checkpoint lacks {', '.join(missing)}")
    try:
        arch = Arch.from_dict(ckpt["arch"])
    except TypeError as e:
        raise MgError(f"{path}: checkpoint architecture is invalid ({e})") from None
    with torch.device("meta"):
        expected = build_model(arch).state_dict()
    model = ckpt["model"]
    if not isinstance(model, dict):
        raise MgError(f"{path}: checkpoint 'model' is not a tensor table")
    for key, ref in expected.items():
        got = model.get(key)
        if not isinstance(got, torch.Tensor):
            raise MgError(f"{path}: model tensor '{key}' is missing")
        if got.shape != ref.shape:
            raise MgError(f"{path}: model tensor '{key}' has shape {tuple(got.shape)}, "
                          f"expected {tuple(ref.shape)} for {arch.describe()}")
    extra = sorted(set(model) - set(expected))
    if extra:
        raise MgError(f"{path}: unexpected model tensor '{extra[0]}'")
    if ckpt["stage"] != ("grown" if arch.grown else "members"):
        raise MgError(f"{path}: stage '{ckpt['stage']}' does not match the architecture")


def arch_of(ckpt: dict[str, Any]) -> Arch:
    return Arch.from_dict(ckpt["arch"])


def model_from(ckpt: dict[str, Any], device: str | torch.device = "cpu") -> WRN:
    """Rebuild the model a checkpoint describes, with its tensors (BN statistics included)."""
    model = build_model(arch_of(ckpt))
    model.load_state_dict(ckpt["model"])
    return model.to(device)


def check_out_path(path: str | Path, force: bool = False) -> Path:
    """Refuse to overwrite an existing file that is not an mg checkpoint (unless forced)."""
    path = Path(path)
    if path.is_dir():
        raise MgError(f"{path}: is a directory; give a file path ending in .pt")
    if path.exists() and not force:
        try:
            load(path)
        except MgError:
            raise MgError(f"{path}: exists and is not an mg checkpoint; refusing to overwrite "
                          "it (use --force)") from None
    return path
