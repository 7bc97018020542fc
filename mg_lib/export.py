"""Export: any mg checkpoint as a plain PyTorch WRN with the synthesised weights.

The exported file is `torch.save` of plain containers and tensors (loads with
`weights_only=True`), format "mg-plain-export", version 1:

    format, version, mg_version, created    what wrote it
    source, stage                           the checkpoint it came from, members | grown
    arch        Arch.to_dict() with kind = "plain" (same depth, width, members, grown)
    state_dict  the plain model's tensors (CPU): every template conv's `templates`/`coefs`
                become its synthesised `weight`; BatchNorm tensors are copied as they are

Load it without mg's trainer:

    blob = torch.load("plain.pt", weights_only=True)
    model = build_model(Arch.from_dict(blob["arch"]))      # mg_lib.wrn
    model.load_state_dict(blob["state_dict"])

A members export is the k members side by side as one block-diagonal (grouped) net that
returns (k, N, classes) logits; a grown export is an ordinary WRN returning (N, classes).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import checkpoint as ck
from .errors import MgError
from .templates import Synthesised, TemplateLinear
from .wrn import WRN, Arch, build_model

FORMAT = "mg-plain-export"
VERSION = 1


@torch.no_grad()
def plain_state_dict(model: WRN) -> dict[str, Tensor]:
    """The state_dict of the equivalent plain model: synthesised weights, everything else as is."""
    model_was_training = model.training
    model.eval()  # fold: each weight is synthesised once, outside autograd
    layers = {name: m for name, m in model.named_modules() if isinstance(m, Synthesised)}
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in layers and leaf in ("templates", "coefs"):
            if leaf == "templates":
                m = layers[owner]
                w = m.plain_weight() if isinstance(m, TemplateLinear) else m.current_weight()
                out[f"{owner}.weight"] = w.detach().to("cpu", copy=True).contiguous()
            continue
        out[key] = value.detach().to("cpu", copy=True)
    model.train(model_was_training)
    return out


def to_plain(model: WRN) -> WRN:
    """A plain-kind WRN computing exactly what `model` computes (the explicit fold)."""
    plain = build_model(replace(model.arch, kind="plain"))
    plain.load_state_dict(plain_state_dict(model))  # strict: keys and shapes must match
    return plain.to(next(model.parameters()).device).train(model.training)


def export_checkpoint(path: Path, out: Path | None = None, force: bool = False) -> Path:
    """`mg export`: CKPT -> a plain-export file (default `<name>-plain.pt` beside CKPT)."""
    path = Path(path)
    ckpt = ck.load(path)
    dest = Path(out) if out is not None else path.with_name(f"{path.stem}-plain.pt")
    if dest.exists() and dest.resolve() == path.resolve():
        raise MgError(f"{dest}: is the checkpoint being exported; give another --out")
    if dest.is_dir():
        raise MgError(f"{dest}: is a directory; give a file path ending in .pt")
    if dest.exists() and not force and _read(dest) is None:
        raise MgError(f"{dest}: exists and is not an mg plain export; refusing to overwrite "
                      "it (use --force)")
    model = ck.model_from(ckpt)
    arch = replace(model.arch, kind="plain")
    blob: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "mg_version": ck.MG_VERSION,
        "created": ck.now(), "source": str(path), "stage": ckpt["stage"],
        "arch": arch.to_dict(), "state_dict": plain_state_dict(model),
    }
    return ck.save(blob, dest)


def _read(path: Path) -> dict[str, Any] | None:
    """The export at `path`, or None when it is not one (or unreadable)."""
    try:
        blob = ck.read(path, "plain export")
    except MgError:
        return None
    return blob if isinstance(blob, dict) and blob.get("format") == FORMAT else None


def load_export(path: str | Path, device: str | torch.device = "cpu") -> WRN:
    """The plain WRN of an export file (read with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise MgError(f"{path}: export not found")
    blob = _read(path)
    if blob is None:
        raise MgError(f"{path}: not an mg plain export (no '{FORMAT}' marker)")
    if blob.get("version", 0) > VERSION:
        raise MgError(f"{path}: export format {blob['version']} is newer than this mg reads")
    model = build_model(Arch.from_dict(blob["arch"]))
    model.load_state_dict(blob["state_dict"])
    return model.to(device).eval()
