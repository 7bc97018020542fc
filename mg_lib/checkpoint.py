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

`torch.load(path, weights_only=True)` always works, so loading never runs code. `load`
unpickles nothing but zip files, checks their CRCs, refuses pickled objects, then validates
format, version, keys, types and every tensor's shape against the stored architecture.
Writes go to a temporary file in the same folder, fsync'd, then renamed over the old file:
a crash (even kill -9) mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import os
import pickle
import re
import stat
import tempfile
import warnings
import zipfile
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from .errors import MgError, RunError
from .recipe import validate as validate_recipe
from .wrn import WRN, Arch, build_model

FORMAT = "mg-checkpoint"
VERSION = 1
MG_VERSION = "0.1.0"
REQUIRED = ("recipe", "arch", "stage", "lineage", "model", "train", "history", "flops")
ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive; nothing else is unpickled
MAX_DEPTH = 1000  # range checks on a stored arch, so a hostile file cannot make mg build
MAX_SIZE = 1_000_000  # millions of layers before the tensors are even compared
# In-place ops that only set values; skipping them never changes a shape (see expected_tensors).
VALUE_FILLS = frozenset({"normal_", "uniform_", "fill_", "zero_", "copy_", "div_", "mul_",
                         "add_", "sub_", "clamp_", "exponential_", "bernoulli_", "random_"})


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
    """Write atomically: temp file in the same folder, fsync, rename over `path`.

    Whatever stops the write (disk full, an exception, SIGKILL), `path` holds either the
    previous checkpoint or the new one, never a torn file; a failed write removes its temp file.
    """
    path = Path(path)
    existed = path.is_file()
    try:
        mode = _file_mode(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise RunError(f"{path}: cannot write checkpoint ({_why(e)})") from None
    done = False
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp makes the file 0600; give it the mode a plain write would
        os.replace(tmp, path)
        done = True
        _fsync_dir(path.parent)
    except (OSError, RuntimeError) as e:
        kept = "the previous checkpoint is intact" if existed else "nothing was written"
        raise RunError(f"{path}: checkpoint not written ({_why(e)}); {kept}") from None
    finally:
        if not done:  # also on KeyboardInterrupt: never leave a half-written temp file behind
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return path


def _file_mode(path: Path) -> int:
    """Permission bits for a new checkpoint: the old file's, else 0o666 minus the umask."""
    if path.is_file():
        return stat.S_IMODE(path.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _why(e: BaseException) -> str:
    """A short reason for a failed write."""
    if isinstance(e, OSError):
        if e.errno == errno.ENOSPC:
            return "disk full"
        if e.errno == getattr(errno, "EDQUOT", -1):
            return "disk quota exceeded"
        return e.strerror or str(e) or type(e).__name__
    text = str(e)
    if "No space left" in text:  # torch's C++ writer wraps ENOSPC in a RuntimeError
        return "disk full"
    return _first_sentence(text) or type(e).__name__


def _first_sentence(text: str) -> str:
    line = text.strip().split("\n")[0].strip()
    return line.split(". ")[0].rstrip(".")


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
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
    ckpt = read(path)
    validate(ckpt, path)
    return ckpt


def read(path: str | Path, what: str = "checkpoint") -> Any:
    """Unpickle a torch.save file safely, or raise one MgError naming the file and problem.

    Only PyTorch zip files are unpickled at all, and only with `weights_only=True`: a file
    that holds a pickled Python object (a class instance, a function) is refused, never run.
    """
    path = Path(path)
    head = _head(path, what)
    if head[:4] != ZIP_MAGIC:
        raise MgError(f"{path}: not an mg {what} ({_kind(head)})")
    try:
        # torch does not check the zip's CRCs; a flipped bit in tensor data would load
        # silently. Checking them costs ~0.1 s per 200 MB.
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except zipfile.BadZipFile:
        raise MgError(f"{path}: not a readable {what} (truncated or corrupt zip archive)"
                      ) from None
    except (OSError, EOFError, ValueError) as e:
        raise MgError(f"{path}: not a readable {what} (truncated or corrupt: "
                      f"{_first_sentence(str(e)) or type(e).__name__})") from None
    if bad is not None:
        raise MgError(f"{path}: not a readable {what} (corrupt: checksum mismatch in {bad})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about odd pickle protocols
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise MgError(f"{path}: refused: it holds a pickled Python object ({found[1]}); mg "
                          "loads only tensors and plain containers (weights_only=True)") from None
        raise MgError(f"{path}: not a readable {what} (corrupt pickle data)") from None
    except Exception as e:  # noqa: BLE001 - a corrupt file raises anything (IndexError, ...)
        raise MgError(f"{path}: not a readable {what} (truncated or corrupt: "
                      f"{_first_sentence(str(e)) or type(e).__name__})") from None


def _head(path: Path, what: str) -> bytes:
    """The first bytes of a file, with one clear error for each way it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(8)
    except FileNotFoundError:
        raise MgError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise MgError(f"{path}: is a directory, not a {what}") from None
    except OSError as e:
        raise MgError(f"{path}: cannot read {what} ({e.strerror or e})") from None


def _kind(head: bytes) -> str:
    if not head:
        return "empty file"
    if head[:1] == b"\x80":
        return "a plain pickle or legacy torch file; mg never unpickles those"
    return "not a PyTorch zip file"


def validate(ckpt: Any, path: str | Path) -> None:
    """Check format, version, keys, types and tensor shapes against the stored architecture."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise MgError(f"{path}: not an mg checkpoint (no '{FORMAT}' marker)")
    version = ckpt.get("version")
    if type(version) is not int or version < 1:
        raise MgError(f"{path}: checkpoint has no valid format version (got {version!r})")
    if version > VERSION:
        raise MgError(f"{path}: checkpoint format {version} is newer than this mg reads "
                      f"({VERSION}); upgrade mg")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise MgError(f"{path}: checkpoint lacks {', '.join(missing)}")
    for key, kind in (("recipe", dict), ("arch", dict), ("lineage", list), ("model", dict),
                      ("train", dict), ("history", list), ("flops", dict)):
        if not isinstance(ckpt[key], kind):
            raise MgError(f"{path}: checkpoint '{key}' is a {type(ckpt[key]).__name__}, "
                          f"expected a {kind.__name__}")
    arch = _arch(ckpt["arch"], path)
    stage = "grown" if arch.grown else "members"
    if ckpt["stage"] != stage:
        raise MgError(f"{path}: stage {ckpt['stage']!r} does not match the architecture "
                      f"({stage})")
    if not isinstance(ckpt["train"].get("epochs"), dict):
        raise MgError(f"{path}: checkpoint 'train' has no epochs table")
    try:
        expected = expected_tensors(arch)
    except (RuntimeError, MemoryError, ValueError) as e:  # e.g. a width no memory can hold
        raise MgError(f"{path}: checkpoint architecture cannot be built ({arch.describe()}: "
                      f"{_first_sentence(str(e))})") from None
    model = ckpt["model"]
    for key, ref in expected.items():
        got = model.get(key)
        if not isinstance(got, torch.Tensor):
            raise MgError(f"{path}: model tensor '{key}' is missing")
        if got.shape != ref.shape:
            raise MgError(f"{path}: model tensor '{key}' has shape {tuple(got.shape)}, "
                          f"expected {tuple(ref.shape)} for {arch.describe()}")
        if got.dtype != ref.dtype or got.is_meta or got.layout != torch.strided:
            raise MgError(f"{path}: model tensor '{key}' is {got.dtype} {got.layout} on "
                          f"{got.device.type}, expected dense {ref.dtype}")
    extra = sorted(set(model) - set(expected))
    if extra:
        raise MgError(f"{path}: unexpected model tensor '{extra[0]}' for {arch.describe()}")
    validate_recipe(ckpt["recipe"], f"{path}: recipe")
    if ckpt.get("target") is not None and ckpt["target"] not in ckpt["recipe"].get("grow", {}):
        raise MgError(f"{path}: grow target {ckpt['target']!r} is not in its recipe")


class _NoFill(TorchFunctionMode):
    """Skip the in-place fills of weight initialisation: only shapes and dtypes are wanted."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        if getattr(func, "__name__", "") in VALUE_FILLS:
            return args[0]
        return func(*args, **(kwargs or {}))


def expected_tensors(arch: Arch) -> dict[str, torch.Tensor]:
    """The state_dict an arch must have, as uninitialised tensors (shapes and dtypes).

    Not on the meta device: initialisers there go through torch's Python decompositions,
    whose first use imports torch._dynamo (seconds per `mg` call). On CPU with the fills
    skipped, torch.empty's memory is never touched, so a WRN-28-10 costs ~10 ms and no RAM.
    """
    with torch.no_grad(), _NoFill():
        return build_model(arch).state_dict()


def _arch(d: dict[str, Any], path: str | Path) -> Arch:
    """The stored architecture, range-checked before anything is built from it."""
    known = {f.name for f in fields(Arch)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise MgError(f"{path}: checkpoint architecture has unknown field '{unknown[0]}'")
    arch = Arch.from_dict(d)
    ints = {"depth": (10, MAX_DEPTH), "width": (1, MAX_SIZE), "members": (1, MAX_SIZE),
            "templates": (1, MAX_SIZE), "stem": (1, MAX_SIZE), "classes": (2, MAX_SIZE)}
    for name, (low, high) in ints.items():
        v = getattr(arch, name)
        if type(v) is not int or not low <= v <= high:
            raise MgError(f"{path}: checkpoint architecture: {name} = {v!r} is out of range")
    for name in ("grown", "mid_bn"):
        if type(getattr(arch, name)) is not bool:
            raise MgError(f"{path}: checkpoint architecture: {name} must be true or false")
    if arch.kind not in ("template", "plain") or (arch.depth - 4) % 6 or \
            arch.stem % arch.members:
        raise MgError(f"{path}: checkpoint architecture is invalid ({arch.describe()}, "
                      f"stem {arch.stem})")
    return arch


def arch_of(ckpt: dict[str, Any]) -> Arch:
    return Arch.from_dict(ckpt["arch"])


def model_from(ckpt: dict[str, Any], device: str | torch.device = "cpu") -> WRN:
    """Rebuild the model a checkpoint describes, with its tensors (BN statistics included)."""
    model = build_model(arch_of(ckpt))
    model.load_state_dict(ckpt["model"])
    return model.to(device)


def check_out_path(path: str | Path, force: bool = False) -> Path:
    """Refuse to overwrite any existing file unless forced: a trained checkpoint is work, and
    a file that is not a checkpoint is somebody else's."""
    path = Path(path)
    if path.is_dir():
        raise MgError(f"{path}: is a directory; give a file path ending in .pt")
    for parent in path.parents:
        if parent.exists():  # the nearest existing ancestor must be a folder
            if not parent.is_dir():
                raise MgError(f"{parent}: is a file, not a folder (output path {path})")
            break
    if path.exists() and not force:
        try:
            load(path)
        except MgError as e:
            why = str(e).removeprefix(f"{path}: ")
            if why.startswith("not an mg checkpoint (") and why.endswith(")"):
                why = why[len("not an mg checkpoint ("):-1]  # say it once
            raise MgError(f"{path}: exists and is not an mg checkpoint ({why}); refusing to "
                          "overwrite it (use --force)") from None
        raise MgError(f"{path}: a checkpoint is already there; continue it with mg train "
                      "--resume, or replace it with --force")
    return path
