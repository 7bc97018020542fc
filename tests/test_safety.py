"""Issue 8, faults and security: no fault loses work, no checkpoint runs code, no recipe
crashes the loader.

- kill -9 in the middle of a checkpoint write leaves the previous file loadable and whole;
- a full disk is a clear RunError, the previous checkpoint intact and no temp file left;
- every torch.load in mg passes weights_only=True and nothing unpickles user files;
- checkpoint validation catches tampered contents (shapes, tensors, stage, arch, version);
- hypothesis: random recipe dicts, --set strings and TOML texts give a Recipe or MgError.
(SIGINT/SIGTERM: tests/test_train.py; NaN loss through the CLI: tests/test_errors.py.)
"""

from __future__ import annotations

import ast
import copy
import errno
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mg_lib import checkpoint as ck
from mg_lib.errors import MgError, RunError
from mg_lib.recipe import (
    DataConfig,
    GrowConfig,
    ModelConfig,
    Recipe,
    TrainConfig,
    apply_overrides,
    load_recipe,
    to_toml,
    tomllib,
    validate,
)
from mg_lib.train import new_run
from mg_lib.wrn import Arch, build_model

SOURCES = [ROOT / "mg.py", *sorted((ROOT / "mg_lib").rglob("*.py"))]


def tiny_recipe(**extra: Any) -> Recipe:
    sets = {"data.dataset": '"synthetic"', "model.depth": 10, **extra}
    return validate(apply_overrides({}, [f"{k}={v}" for k, v in sets.items()]))


@pytest.fixture
def ckpt() -> dict[str, Any]:
    """A valid, untrained members checkpoint (WRN-10-1, 2 members), as a dict."""
    return new_run(tiny_recipe())


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ---------------------------------------------------------------- security: the sources


def calls(name: str) -> list[tuple[Path, ast.Call]]:
    """Every call of `<module>.name(...)` or `name(...)` in mg.py and mg_lib."""
    found = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
                if called == name:
                    found.append((path, node))
    return found


def keyword(call: ast.Call, name: str) -> Any:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<expr>"
    return "<absent>"


def test_every_torch_load_is_weights_only() -> None:
    loads = [(p, c) for p, c in calls("load")
             if isinstance(c.func, ast.Attribute) and getattr(c.func.value, "id", "") == "torch"]
    assert loads, "no torch.load found: the scan is broken"
    bad = [f"{p.name}:{c.lineno}" for p, c in loads if keyword(c, "weights_only") is not True]
    assert bad == []


def test_nothing_unpickles_user_files() -> None:
    for p, c in calls("load") + calls("loads"):
        owner = getattr(c.func, "value", None)
        assert getattr(owner, "id", "") not in ("pickle", "cPickle", "dill", "joblib"), \
            f"{p.name}:{c.lineno} unpickles"
    np_loads = [(p, c) for p, c in calls("load")
                if getattr(getattr(c.func, "value", None), "id", "") == "np"]
    assert all(keyword(c, "allow_pickle") is False for _, c in np_loads)
    for p, c in calls("add_safe_globals") + calls("safe_globals") + calls("Unpickler"):
        pytest.fail(f"{p.name}:{c.lineno} widens what may be unpickled")
    for path in SOURCES:
        assert "weights_only=False" not in path.read_text(), path.name


def test_legacy_and_foreign_files_are_not_unpickled(tmp_path: Path, ckpt: dict) -> None:
    legacy = tmp_path / "legacy.pt"
    torch.save(ckpt, legacy, _use_new_zipfile_serialization=False)  # valid content, old format
    with pytest.raises(MgError, match="legacy torch file; mg never unpickles"):
        ck.load(legacy)
    plain = tmp_path / "list.pt"
    torch.save([1, 2, 3], plain)
    with pytest.raises(MgError, match="no 'mg-checkpoint' marker"):
        ck.load(plain)


def test_corrupted_files_give_mgerror_only(tmp_path: Path, ckpt: dict) -> None:
    """Truncations, flipped bytes, foreign zips: one MgError each, never a raw IndexError,
    KeyError or RuntimeError from the unpickler (torch raises all of those)."""
    import zipfile

    good = tmp_path / "good.pt"
    ck.save(ckpt, good)
    data = good.read_bytes()
    rng = random.Random(1)
    bad = tmp_path / "bad.pt"
    variants = [data[:n] for n in (1, 4, 100, len(data) // 3, len(data) - 1)]
    variants += [b"\x80\x02" + rng.randbytes(500), b"PK\x03\x04" + rng.randbytes(500)]
    for _ in range(40):
        flipped = bytearray(data)
        for _ in range(rng.randint(1, 20)):
            flipped[rng.randrange(len(flipped))] ^= rng.randrange(1, 256)  # a real change
        variants.append(bytes(flipped))
    errors = 0
    for blob in variants:
        bad.write_bytes(blob)
        try:
            ck.load(bad)
        except MgError as e:
            errors += 1
            assert str(e).startswith(f"{bad}: ") and "\n" not in str(e)
        assert blob != data
    assert errors == len(variants)  # zip CRCs catch even a flipped byte in tensor data
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("notes.txt", "a zip, but not torch's")
    with pytest.raises(MgError, match="truncated or corrupt"):
        ck.load(bad)


# ---------------------------------------------------------------- validation


def _set(path: str, value: Any):
    def edit(c: dict) -> None:
        *parents, leaf = path.split("/")
        for p in parents:
            c = c[p]
        c[leaf] = value
    return edit


def _drop(path: str):
    def edit(c: dict) -> None:
        *parents, leaf = path.split("/")
        for p in parents:
            c = c[p]
        del c[leaf]
    return edit


TAMPER = {
    "wrong shape": (_set("model/fc.coefs", torch.zeros(2, 3)),
                    r"'fc.coefs' has shape \(2, 3\), expected \(2, 2\)"),
    "missing tensor": (_drop("model/bn.running_var"), "'bn.running_var' is missing"),
    "extra tensor": (_set("model/evil.weight", torch.zeros(1)), "unexpected model tensor"),
    "wrong dtype": (_set("model/bn.weight", torch.zeros(128, dtype=torch.int64)),
                    "'bn.weight' is torch.int64"),
    "bad stage": (_set("stage", "grown"), r"stage 'grown' does not match.*\(members\)"),
    "stage typo": (_set("stage", "membrs"), "stage 'membrs'"),
    "newer version": (_set("version", ck.VERSION + 1), "newer than this mg reads"),
    "no version": (_drop("version"), "no valid format version"),
    "bool version": (_set("version", True), "no valid format version"),
    "wrong format": (_set("format", "other"), "not an mg checkpoint"),
    "missing key": (_drop("history"), "lacks history"),
    "model not a dict": (_set("model", [1, 2]), "'model' is a list, expected a dict"),
    "arch unknown field": (_set("arch/heads", 8), "unknown field 'heads'"),
    "arch depth": (_set("arch/depth", 12), "checkpoint architecture is invalid"),
    "arch huge": (_set("arch/depth", 10**9), "depth = 1000000000 is out of range"),
    "arch type": (_set("arch/width", "1"), "width = '1' is out of range"),
    "arch kind": (_set("arch/kind", "resnet"), "checkpoint architecture is invalid"),
    "arch bool": (_set("arch/grown", 0), "grown must be true or false"),
    "arch too big": (_set("arch/width", 10**6), "cannot be built|out of range|shape"),
    "recipe invalid": (_set("recipe/train/epochs", -1), r"recipe: train\.epochs"),
    "train state": (_set("train/epochs", None), "no epochs table"),
    "target unknown": (_set("target", "tall"), "grow target 'tall' is not in its recipe"),
}


@pytest.mark.parametrize("name", list(TAMPER))
def test_validate_refuses_tampered_checkpoints(ckpt: dict, name: str) -> None:
    edit, message = TAMPER[name]
    ck.validate(ckpt, "x.pt")  # the untouched checkpoint is valid
    bad = copy.deepcopy(ckpt)
    edit(bad)
    with pytest.raises(MgError, match=message) as e:
        ck.validate(bad, "x.pt")
    assert str(e.value).startswith("x.pt: ") and "\n" not in str(e.value)


@pytest.mark.parametrize("arch", [
    Arch(depth=10), Arch(depth=16, width=2, members=4, templates=3), Arch(depth=10, grown=True),
    Arch(kind="plain", depth=10, grown=True), Arch(kind="plain", depth=16, mid_bn=False)])
def test_expected_tensors_match_a_real_build(arch: Arch) -> None:
    """validate's cheap shape oracle equals the state_dict of a real, initialised model."""
    want = {k: (v.shape, v.dtype) for k, v in build_model(arch).state_dict().items()}
    got = {k: (v.shape, v.dtype) for k, v in ck.expected_tensors(arch).items()}
    assert got == want


def test_grown_checkpoint_tampered_to_members_shape(tmp_path: Path, ckpt: dict) -> None:
    """A grown arch over member-shaped tensors: the shapes, not the stage, give it away."""
    bad = copy.deepcopy(ckpt)
    bad["arch"]["grown"], bad["stage"], bad["target"] = True, "grown", "wide"
    with pytest.raises(MgError, match="has shape"):
        ck.validate(bad, "x.pt")


# ---------------------------------------------------------------- saving


def test_save_is_atomic_and_keeps_the_usual_mode(tmp_path: Path, ckpt: dict) -> None:
    path = tmp_path / "m.pt"
    umask = os.umask(0o022)
    try:
        ck.save(ckpt, path)
    finally:
        os.umask(umask)
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)  # not mkstemp's 0600
    assert ck.load(path)["arch"] == ckpt["arch"]
    assert temps(tmp_path) == []


def _enospc(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _dev_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the temp file's descriptor point at /dev/full: the kernel's own ENOSPC."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    real = tempfile.mkstemp

    def mkstemp(**kw: Any) -> tuple[int, str]:
        fd, name = real(**kw)
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), name

    monkeypatch.setattr(ck.tempfile, "mkstemp", mkstemp)


@pytest.mark.parametrize("how", ["torch.save raises", "/dev/full", "rename fails"])
def test_disk_full_keeps_previous_checkpoint(tmp_path: Path, ckpt: dict, how: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "members.pt"
    ck.save(ckpt, path)
    before = path.read_bytes()
    newer = {**ckpt, "history": [{"epoch": 1}]}
    if how == "torch.save raises":
        monkeypatch.setattr(ck.torch, "save", _enospc)
    elif how == "/dev/full":
        _dev_full(monkeypatch)
    else:
        monkeypatch.setattr(ck.os, "replace", _enospc)
    with pytest.raises(RunError, match=r"members\.pt: checkpoint not written \(disk full\); "
                       "the previous checkpoint is intact") as e:
        ck.save(newer, path)
    assert e.value.exit_code == 1
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert temps(tmp_path) == []
    assert ck.load(path)["history"] == []


def test_interrupted_save_leaves_no_temp(tmp_path: Path, ckpt: dict,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A second Ctrl-C (KeyboardInterrupt) inside torch.save: old file kept, temp removed."""
    path = tmp_path / "members.pt"
    ck.save(ckpt, path)
    before = path.read_bytes()

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ck.save(ckpt, path)
    assert path.read_bytes() == before and temps(tmp_path) == []


def test_save_into_a_file_is_a_clear_error(tmp_path: Path, ckpt: dict) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunError, match="cannot write checkpoint"):
        ck.save(ckpt, tmp_path / "f" / "m.pt")
    with pytest.raises(MgError, match="is a file, not a folder"):
        ck.check_out_path(tmp_path / "f" / "m.pt")


WRITER = r"""
import os, sys, torch
from mg_lib import checkpoint as ck

torch.set_num_threads(1)  # fork-safe: no OpenMP pool in the parent
path = sys.argv[1]
base = ck.load(path)
pad = torch.zeros(4_000_000)  # 16 MB: a write takes a while, so a kill lands inside one
r = 0
while sys.stdin.readline():  # one round per line; EOF ends
    r += 1
    pid = os.fork()
    if pid == 0:  # the writer: save forever, each file self-consistent (pad == tag)
        i = 0
        while True:
            i += 1
            pad.fill_(r * 1000 + i)
            base["history"] = [{"tag": r * 1000 + i}]
            base["pad"] = pad
            ck.save(base, path)
    print(pid, flush=True)
    os.waitpid(pid, 0)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_kill_9_during_save_keeps_a_loadable_checkpoint(tmp_path: Path, ckpt: dict) -> None:
    path = tmp_path / "members.pt"
    ck.save(ckpt, path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    rng = random.Random(0)
    mid_write, tags = 0, []
    try:
        # "first": kill within a few ms of the first write starting (lands inside it);
        # "later": kill at a random moment after at least one write has replaced the file.
        for when in ("first", "later", "first", "later"):
            seen, stamp = set(temps(tmp_path)), path.stat().st_mtime_ns
            proc.stdin.write("go\n")
            proc.stdin.flush()
            pid = int(proc.stdout.readline())
            deadline = time.time() + 60
            while time.time() < deadline and (
                    not set(temps(tmp_path)) - seen if when == "first"
                    else path.stat().st_mtime_ns == stamp):
                time.sleep(0.0005)
            time.sleep(rng.uniform(0, 0.005) if when == "first" else rng.uniform(0, 0.1))
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
            mid_write += bool(set(temps(tmp_path)) - seen)
            got = ck.load(path)  # whatever happened, the file is one whole checkpoint
            tag = got["history"][0]["tag"] if got["history"] else 0
            if tag:  # never a mix of two writes
                assert torch.equal(got["pad"], torch.full_like(got["pad"], float(tag)))
            tags.append(tag)
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    assert mid_write >= 1, "no kill landed inside a write"
    assert tags[1] > 0 and tags[3] > tags[1]  # the "later" rounds did replace the file
    assert tags == sorted(tags)


# ---------------------------------------------------------------- hypothesis: recipes


LITERALS = ["cifar10", "npz", "synthetic", "template", "plain", "wrn", "cosine", "constant",
            "joint", "sequential", "mixture", "random", "net2net", "zero", "orthogonal", "copy"]
junk = st.text(min_size=1, max_size=8)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 40), st.integers(-2**70, 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1), st.text(max_size=10),
    st.sampled_from(LITERALS))
values = st.recursive(scalars, lambda c: st.lists(c, max_size=3)
                      | st.dictionaries(junk, c, max_size=3), max_leaves=6)


def table(model: type) -> st.SearchStrategy:
    keys = st.one_of(st.sampled_from(list(model.model_fields)), junk)
    return st.dictionaries(keys, scalars, max_size=5)


raw_recipes = st.builds(
    lambda parts, extra: {**parts, **extra},
    st.fixed_dictionaries({}, optional={
        "seed": scalars, "data": table(DataConfig) | values, "model": table(ModelConfig) | values,
        "train": table(TrainConfig) | values,
        "grow": st.dictionaries(st.sampled_from(["wide", "w-2", "a b", ""]) | junk,
                                table(GrowConfig) | values, max_size=2) | values}),
    st.dictionaries(junk, values, max_size=1))

KEYS = ([f"{s}.{k}" for s, m in (("data", DataConfig), ("model", ModelConfig),
                                  ("train", TrainConfig)) for k in m.model_fields]
        + [f"grow.wide.{k}" for k in GrowConfig.model_fields] + ["seed", "grow.new.epochs"])
set_strings = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS) | junk,
              st.sampled_from(["1", "-1", "0", "0.5", "1e30", "inf", "nan", "true", '"x"',
                               "[1, 2]", "{a = 1}", "'", "", "zero", "1\nx = 2"]) | st.text()),
    st.text())

HYPO = settings(max_examples=200, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


def check_outcome(make: Any, outcomes: dict[str, int]) -> None:
    """`make()` gives a Recipe (that survives a TOML round trip) or raises MgError."""
    try:
        r = make()
    except MgError as e:
        assert str(e) and "\n" not in str(e)
        outcomes["error"] += 1
        return
    assert isinstance(r, Recipe)
    assert validate(r.dump()) == r
    assert validate(tomllib.loads(to_toml(r))) == r  # the recipe.toml written beside a run
    outcomes["recipe"] += 1


def test_random_recipe_dicts_give_recipe_or_mgerror() -> None:
    outcomes = {"recipe": 0, "error": 0}

    @HYPO
    @given(raw_recipes)
    def prop(raw: dict) -> None:
        check_outcome(lambda: validate(copy.deepcopy(raw), "r.toml"), outcomes)

    prop()
    assert outcomes["recipe"] > 0 and outcomes["error"] > 0, outcomes


def test_random_set_overrides_give_recipe_or_mgerror() -> None:
    outcomes = {"recipe": 0, "error": 0}
    base = tiny_recipe().dump()

    @HYPO
    @given(st.lists(set_strings, max_size=3))
    def prop(sets: list[str]) -> None:
        check_outcome(lambda: validate(apply_overrides(copy.deepcopy(base), sets)), outcomes)

    prop()
    assert outcomes["recipe"] > 0 and outcomes["error"] > 0, outcomes


def test_random_toml_text_gives_recipe_or_mgerror(tmp_path: Path) -> None:
    outcomes = {"recipe": 0, "error": 0}
    path = tmp_path / "r.toml"
    lines = st.sampled_from(["[data]", "[train]", "[grow.wide]", "epochs = 2", "lr = 0.1",
                             "dataset = 'synthetic'", "x = [", "depth = 16", "= 3", "[[a]]"])

    @settings(HYPO, max_examples=100)
    @given(st.lists(lines | st.text(max_size=20), max_size=6))
    def prop(text: list[str]) -> None:
        path.write_text("\n".join(text), encoding="utf-8")
        check_outcome(lambda: load_recipe(path), outcomes)

    prop()
    assert outcomes["recipe"] > 0 and outcomes["error"] > 0, outcomes


def test_override_failure_leaves_the_source_recipe_alone() -> None:
    from mg_lib.recipe import override

    stored = tiny_recipe().dump()
    before = copy.deepcopy(stored)
    with pytest.raises(MgError, match="train.lr"):
        override(stored, ["train.epochs=5", "train.lr=-1"], "x.pt: recipe")
    assert stored == before



# ---------------------------------------------------------------- Ctrl-C


def test_sigint_leaves_a_resumable_checkpoint(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C mid-epoch: exit 130 and one line; --resume then finishes the run.

    SIGTERM through a real subprocess is tests/test_train.py's; here SIGINT is delivered to
    this process at step 3 of an in-process `mg train`, so the test costs no start-up.
    """
    from cli_matrix import run_inprocess

    import mg_lib.train as tr

    real, calls = tr.member_losses, {"n": 0}

    def losses_then_ctrl_c(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(logits, labels)

    monkeypatch.setattr(tr, "member_losses", losses_then_ctrl_c)
    (tmp_path / "r.toml").write_text('[data]\ndataset = "synthetic"\n')
    sets = ["--set", "data.synthetic_images=80", "--set", "data.batch_size=8", "--set",
            "model.depth=10", "--set", "train.members=\"joint\"", "--device", "cpu"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = run_inprocess(["train", "r.toml", "--out", "run", *sets], tmp_path)
        assert got.code == 130 and got.stdout == "", got.stderr
        assert "interrupted by SIGINT in members, epoch 1, step 3; resume with: mg train " \
            "--resume run/members.pt" in got.stderr and "Traceback" not in got.stderr
        mid = ck.load(tmp_path / "run" / "members.pt")
        assert mid["train"]["current"]["step"] == 3 and not mid["train"]["done"]
        assert temps(tmp_path / "run") == []
        monkeypatch.setattr(tr, "member_losses", real)
        done = run_inprocess(["train", "--resume", "run/members.pt", "--device", "cpu"],
                             tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert done.code == 0, done.stderr
    final = ck.load(tmp_path / "run" / "members.pt")
    assert final["train"]["done"] and final["train"]["epochs"] == {"members": 1}
