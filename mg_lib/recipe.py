"""Recipes: one TOML file describes a whole run; pydantic checks every key and value.

A recipe is loaded in three steps: read TOML into a dict, apply `--set key.sub=value`
overrides to that dict, validate into a `Recipe`. Errors at any step become one `MgError`
line that names the file and the key.
"""

from __future__ import annotations

import copy
import difflib
import re
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import MgError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib


class Strict(BaseModel):
    # A typo in a recipe must fail loudly, never be silently ignored; so must a wrong type
    # (strict: "3" is not an int, 1 is not a bool) and an infinite or NaN number.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True,
                              allow_inf_nan=False)


class DataConfig(Strict):
    dataset: Literal["cifar10", "cifar100", "imagefolder", "npz", "synthetic"] = "cifar10"
    path: str | None = None  # npz file, dataset root, or download cache (default ~/.cache/mg)
    download: bool = True  # cifar10/100: fetch with torchvision when the copy is missing
    limit: int | None = Field(None, ge=1)  # use at most this many training images
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)  # held out of the train split, seeded
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(500, ge=1)
    crop: bool = True  # random crop after 4-pixel zero padding
    flip: bool = True  # random horizontal flip
    cutout: int = Field(0, ge=0)  # side of the zeroed square; 0 = off (paper recipe: 16)
    image_size: int = Field(32, ge=8)  # imagefolder images are resized to this
    synthetic_images: int = Field(1000, ge=10)  # synthetic: train images (test: a fifth)
    synthetic_classes: int = Field(10, ge=2)
    workers: int = Field(0, ge=0)  # imagefolder decoding threads
    classes: int | None = Field(None, ge=2)  # npz/imagefolder: class count override


class ModelConfig(Strict):
    kind: Literal["template", "plain"] = "template"
    arch: Literal["wrn"] = "wrn"
    depth: int = Field(16, ge=10)  # WRN-d: (d - 4) must be divisible by 6
    width: int = Field(1, ge=1)  # member width factor; the grown net is members x wider
    members: int = Field(2, ge=1)  # k
    templates: int = Field(2, ge=1)  # T, templates per layer and member
    stem: int = Field(16, ge=1)  # channels of the grown stem; each member gets stem / k
    mid_bn: bool = True  # False reproduces the reference: no BN between a block's two convs

    @field_validator("depth")
    @classmethod
    def _wrn_depth(cls, depth: int) -> int:
        if (depth - 4) % 6:
            raise ValueError(f"depth {depth} is not a WRN depth (6n + 4: 10, 16, 22, 28, ...)")
        return depth

    @model_validator(mode="after")
    def _shapes(self) -> ModelConfig:
        if self.stem % self.members:
            raise ValueError(f"stem {self.stem} is not divisible by members {self.members}")
        return self


class PhaseConfig(Strict):
    """Optimiser and schedule of one training phase."""

    epochs: int = Field(1, ge=0)
    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0.0)  # templates, BN; coefficients get none
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0.0)
    restarts: int = Field(0, ge=0)  # cosine warm restarts within the phase
    min_lr: float = Field(0.0, ge=0.0)


class TrainConfig(PhaseConfig):
    members: Literal["sequential", "joint"] = "sequential"
    member0_loss_weight: float = Field(1.0, gt=0.0)  # the reference uses 0.1
    amp: bool = True  # bf16 autocast on CUDA
    channels_last: bool = True  # on CUDA
    compile: bool = False  # torch.compile the model (CUDA)
    sync_bn: bool = False  # SyncBatchNorm under torchrun
    log_every: int = Field(0, ge=0)  # steps between log lines on stderr; 0 = once per epoch


class GrowConfig(PhaseConfig):
    epochs: int = Field(40, ge=0)
    lr: float = Field(0.01, gt=0.0)
    method: Literal["mixture", "random", "net2net"] = "mixture"
    coefs: Literal["zero", "orthogonal", "copy", "random"] = "orthogonal"
    coef_scale: float = Field(0.1, ge=0.0)  # new coefficients' norm relative to ||c_ii||
    coef_noise: float = Field(0.01, ge=0.0)  # `copy`: noise relative to ||c_ii||
    noise: float = Field(0.01, ge=0.0)  # net2net: symmetry-breaking noise, relative


TARGET_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")  # used in file names


class Recipe(Strict):
    seed: int = Field(0, ge=0, lt=2**63)  # torch generators take 64-bit seeds
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    grow: dict[str, GrowConfig] = Field(default_factory=lambda: {"wide": GrowConfig()})

    @field_validator("grow")
    @classmethod
    def _target_names(cls, grow: dict[str, GrowConfig]) -> dict[str, GrowConfig]:
        for name in grow:
            if not TARGET_NAME.fullmatch(name):
                raise ValueError(f"target name {name!r} must be letters, digits, '_' or '-' "
                                 "(it names files)")
        return grow

    def dump(self) -> dict[str, Any]:
        """Plain dict of every field (defaults included): what a checkpoint stores."""
        return self.model_dump(mode="python")


# ---------------------------------------------------------------- loading


def _suggest(key: str, model: type[BaseModel] | None) -> str:
    if model is None:
        return ""
    close = difflib.get_close_matches(key, list(model.model_fields), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the field at `loc` (for 'did you mean')."""
    parts = list(loc[:-1])
    if parts[:1] == ["grow"]:
        return GrowConfig if len(parts) == 2 else None  # grow.<target>.<key>
    model: type[BaseModel] = Recipe
    for part in parts:
        ann = model.model_fields[str(part)].annotation if part in model.model_fields else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _describe(err: ValidationError, source: str) -> MgError:
    first = err.errors()[0]
    loc = tuple(first["loc"])
    key = ".".join(str(p) for p in loc)
    if not key.isprintable():  # a key with a newline or control character: show it escaped
        key = repr(key)[1:-1]
    if first["type"] == "extra_forbidden":
        return MgError(f"{source}: unknown key '{key}'{_suggest(str(loc[-1]), _model_at(loc))}")
    msg = first["msg"].split("\n")[0]
    got = first.get("input")
    if first["type"] == "value_error":  # mg's own checks already quote the value
        msg, got = msg.removeprefix("Value error, "), None
    shown = " (got a table)" if isinstance(got, dict) and loc else \
        "" if isinstance(got, dict) or got is None else f" (got {_short(got)})"
    return MgError(f"{source}: {key or 'recipe'}: {msg}{shown}")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def parse_value(text: str) -> Any:
    """An override's value: TOML if it parses (1, 0.1, true, [1, 2], "x"), else the string."""
    try:
        parsed = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return text
    # "1\nx = 2" parses too; a value that smuggles in more keys stays a plain string.
    return parsed["v"] if len(parsed) == 1 else text


def apply_overrides(raw: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides to a recipe dict in place (and return it)."""
    for item in sets:
        key, sep, value = item.partition("=")
        parts = [p.strip() for p in key.split(".")]
        if not sep or not all(parts):
            raise MgError(f"--set {item!r}: expected KEY.SUB=VALUE, e.g. train.epochs=2")
        *parents, leaf = parts
        node = raw
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise MgError(f"--set {item!r}: '{part}' is a value, not a table")
            node = child
        node[leaf] = parse_value(value.strip())
    return raw


def read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MgError(f"{path}: recipe not found") from None
    except IsADirectoryError:
        raise MgError(f"{path}: is a directory, not a recipe file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MgError(f"{path}: cannot read recipe ({e})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise MgError(f"{path}: malformed TOML: {e}") from None


def validate(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate a recipe dict; any problem becomes one MgError naming `source` and the key."""
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise _describe(e, source) from None
    if not recipe.grow:
        raise MgError(f"{source}: grow: define at least one target, e.g. [grow.wide]")
    return recipe


def load_recipe(path: str | Path, sets: list[str] | None = None) -> Recipe:
    """Read a TOML recipe, apply `--set` overrides and validate."""
    path = Path(path)
    raw = apply_overrides(read_toml(path), list(sets or []))
    return validate(raw, str(path))


def override(recipe: Recipe | dict[str, Any], sets: list[str], source: str) -> Recipe:
    """A recipe (e.g. the one stored in a checkpoint) with `--set` overrides applied."""
    # A deep copy: a failed override must not half-change the caller's (checkpoint's) recipe.
    raw = recipe.dump() if isinstance(recipe, Recipe) else copy.deepcopy(dict(recipe))
    return validate(apply_overrides(raw, list(sets)), source)


def to_toml(recipe: Recipe) -> str:
    """The resolved recipe as TOML, written next to every checkpoint."""
    data = recipe.dump()
    lines: list[str] = [f"seed = {_toml_value(data.pop('seed'))}"]
    grow = data.pop("grow")
    for table, values in data.items():
        lines += ["", f"[{table}]"] + _toml_items(values)
    for name, values in grow.items():
        lines += ["", f"[grow.{name}]"] + _toml_items(values)
    return "\n".join(lines) + "\n"


def _toml_items(values: dict[str, Any]) -> list[str]:
    # None has no TOML spelling: leaving the key out restores the default (None).
    return [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        # TOML basic strings take no raw control characters: escape them as \uXXXX.
        return '"' + "".join(
            "\\" + ch if ch in '"\\' else f"\\u{ord(ch):04x}" if ord(ch) < 32 or ch == "\x7f"
            else ch for ch in v) + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")
