"""The bad-input matrix of issue 8: `mg` command lines that must fail cleanly, one row each.

Every row must end with its exit code (2 bad input, 1 failed run), nothing on stdout, one to
three lines on stderr that name the file or key and the problem, no traceback, and no file in
the working folder created, changed or removed. tests/test_errors.py runs every row in-process
and a representative few as real subprocesses; run this file to push the WHOLE matrix through
the real CLI, one subprocess per row:

    python tests/cli_matrix.py
"""

from __future__ import annotations

import collections
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
# One thread per process: on a busy 2-core machine OpenMP spin-waits make tiny nets 50x slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
MEMBERS = "members.pt"  # the valid members checkpoint every matrix folder holds
TINY = {"data.dataset": '"synthetic"', "data.synthetic_images": 40, "data.batch_size": 8,
        "data.eval_batch_size": 64, "model.depth": 10, "train.epochs": 1}


def tiny_sets(**extra: object) -> list[str]:
    out: list[str] = []
    for k, v in {**TINY, **extra}.items():
        out += ["--set", f"{k}={v}"]
    return out


@dataclass
class Row:
    name: str
    args: list[str]
    code: int = 2
    says: tuple[str, ...] = ()  # substrings stderr must hold (case-insensitive)
    stdout: str | None = None  # None: stdout must be empty; else a substring it must hold
    subprocess: bool = False  # also run as a real subprocess in the test suite


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    seconds: float = 0.0
    crash: BaseException | None = None  # in-process only: an exception that escaped mg
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- running mg


def run_subprocess(args: list[str], cwd: Path, timeout: float = 120) -> Outcome:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "mg", *args], cwd=cwd, capture_output=True,
                       text=True, env=ENV, timeout=timeout)
    return Outcome(p.returncode, p.stdout, p.stderr, time.perf_counter() - t0)


def run_inprocess(args: list[str], cwd: Path) -> Outcome:
    from typer.testing import CliRunner

    import mg

    old = Path.cwd()
    t0 = time.perf_counter()
    os.chdir(cwd)
    try:
        r = CliRunner().invoke(mg.app, args)
    finally:
        os.chdir(old)
    crash = None if r.exception is None or isinstance(r.exception, SystemExit) else r.exception
    return Outcome(r.exit_code, r.stdout, r.stderr, time.perf_counter() - t0, crash)


def snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """(size, mtime_ns, sha256) of every file under `folder`, by relative path."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(folder))] = (st.st_size, st.st_mtime_ns,
                                               hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def problems(row: Row, got: Outcome, before: dict, after: dict) -> list[str]:
    """Everything wrong with one row's outcome (empty: the row passes)."""
    bad = []
    if got.crash is not None:
        bad.append(f"escaped exception {type(got.crash).__name__}: {got.crash}")
    if got.code != row.code:
        bad.append(f"exit {got.code}, expected {row.code}")
    if row.stdout is None and got.stdout:
        bad.append(f"stdout not empty: {got.stdout[:200]!r}")
    if row.stdout is not None and row.stdout.lower() not in got.stdout.lower():
        bad.append(f"stdout lacks {row.stdout!r}: {got.stdout[:200]!r}")
    lines = got.stderr.strip().splitlines()
    if row.stdout is None and not 1 <= len(lines) <= 3:
        bad.append(f"{len(lines)} lines on stderr, expected 1 to 3: {got.stderr[:400]!r}")
    if "Traceback" in got.stderr:
        bad.append("traceback on stderr")
    for s in row.says:
        if s.lower() not in got.stderr.lower():
            bad.append(f"stderr lacks {s!r}: {got.stderr.strip()[:300]!r}")
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if changed:
        bad.append(f"files created, changed or removed: {changed}")
    return bad


def new_files(before: dict, after: dict) -> list[str]:
    return sorted(set(after) - set(before))


# ---------------------------------------------------------------- inputs


class Payload:
    """Runs code when unpickled (it creates a file PWNED): what a hostile checkpoint carries."""

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        return (exec, ("open('PWNED', 'w').close()",))


class Tracked(collections.OrderedDict):
    """An OrderedDict subclass: harmless here, but unpickling it means importing code."""


def make_members(folder: Path, run: Callable[[list[str], Path], Outcome] = run_subprocess
                 ) -> Path:
    """A valid members checkpoint (one epoch on 36 synthetic images) made by `mg train`."""
    (folder / "seed.toml").write_text("[grow.wide]\nepochs = 1\n")
    out = run(["train", "seed.toml", "--out", "seed-run", *tiny_sets(), "--device", "cpu"],
              folder)
    assert out.code == 0, out.stderr
    path = folder / MEMBERS
    (folder / "seed-run" / "members.pt").rename(path)
    for p in sorted((folder / "seed-run").iterdir()):
        p.unlink()
    (folder / "seed-run").rmdir()
    (folder / "seed.toml").unlink()
    return path


def write_inputs(folder: Path) -> None:
    """The broken files the rows point at (the folder already holds members.pt)."""
    w = folder.joinpath
    w("good.toml").write_text('[data]\ndataset = "synthetic"\n\n[grow.wide]\nepochs = 1\n')
    w("malformed.toml").write_text("[data]\nbatch_size = 8\n[train\nepochs = 1\n")
    w("typo.toml").write_text("[train]\nepocs = 3\n")
    w("wrongtype.toml").write_text('[train]\nepochs = "ten"\n')
    w("binary.toml").write_bytes(b"\x80\x81\xfe\xff" * 8)
    w("notes.txt").write_text("my notes, not a checkpoint\n")
    w("data.npz").write_bytes(os.urandom(256))  # unreadable: not a zip at all
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)
    y = np.arange(8) % 2
    names = np.array(["a", "b"])
    np.savez(w("nokeys.npz"), x_train=x, classes=names)  # y_train, x_test, y_test missing
    np.savez(w("badshape.npz"), x_train=x[..., 0], y_train=y, x_test=x, y_test=y,
             classes=names)
    good = torch.load(w(MEMBERS), weights_only=True)
    data = w(MEMBERS).read_bytes()
    w("truncated.pt").write_bytes(data[: len(data) // 2])
    w("empty.pt").write_bytes(b"")
    w("random.pt").write_bytes(np.random.default_rng(1).bytes(4096))
    evil = {**good, "train": {**good["train"], "hook": Payload()}}
    torch.save(evil, w("payload.pt"))
    torch.save({**good, "train": Tracked(good["train"])}, w("subclass.pt"))
    torch.save({**good, "version": 99}, w("newer.pt"))
    model = dict(good["model"])
    model["stem.coefs"] = torch.zeros(3, 3)
    torch.save({**good, "model": model}, w("badshape.pt"))


def rows() -> list[Row]:
    """The matrix. Paths are relative to the folder the rows run in."""
    t = ["train", "good.toml", "--device", "cpu"]
    npz = ["--set", 'data.dataset="npz"']
    return [
        # recipes
        Row("missing recipe", ["train", "nope.toml"], says=("nope.toml", "not found"),
            subprocess=True),
        Row("recipe is a folder", ["train", "."], says=("not a recipe", "directory")),
        Row("recipe not text", ["train", "binary.toml"], says=("binary.toml", "cannot read")),
        Row("malformed TOML", ["train", "malformed.toml"],
            says=("malformed.toml", "malformed TOML", "line 3")),
        Row("unknown key", ["train", "typo.toml"],
            says=("typo.toml", "unknown key 'train.epocs'", "did you mean 'epochs'"),
            subprocess=True),
        Row("unknown table", ["flops", "good.toml", "--set", "trian.epochs=1"],
            says=("unknown key 'trian'", "did you mean 'train'")),
        Row("wrong type", ["train", "wrongtype.toml"],
            says=("wrongtype.toml", "train.epochs", "integer", "'ten'")),
        Row("wrong type via --set", [*t, "--set", "data.crop=1"],
            says=("data.crop", "boolean")),
        Row("negative epochs", [*t, "--set", "train.epochs=-1"],
            says=("train.epochs", "greater than or equal to 0", "-1")),
        Row("lr zero", [*t, "--set", "train.lr=0"], says=("train.lr", "greater than 0")),
        Row("lr negative", [*t, "--set", "grow.wide.lr=-0.1"],
            says=("grow.wide.lr", "greater than 0")),
        Row("lr infinite", [*t, "--set", "train.lr=inf"], says=("train.lr", "finite")),
        Row("width zero", [*t, "--set", "model.width=0"],
            says=("model.width", "greater than or equal to 1")),
        Row("members zero", [*t, "--set", "model.members=0"],
            says=("model.members", "greater than or equal to 1")),
        Row("bad depth", [*t, "--set", "model.depth=12"], says=("model.depth", "6n + 4")),
        Row("--set unknown key", [*t, "--set", "train.lrr=0.1"],
            says=("unknown key 'train.lrr'", "did you mean 'lr'"), subprocess=True),
        Row("--set without =", [*t, "--set", "train.epochs"], says=("--set", "KEY.SUB=VALUE")),
        Row("--set into a value", [*t, "--set", "data.dataset.x=1"],
            says=("'dataset' is a value", "not a table")),
        Row("table for a value", [*t, "--set", "seed.x=1"], says=("seed", "got a table")),
        Row("bad grow target name", [*t, "--set", "grow.a+b.epochs=1"],
            says=("grow", "target name")),
        # data
        Row("data path missing", [*t, *npz, "--set", 'data.path="gone.npz"'],
            says=("gone.npz", "not found")),
        Row("data path unreadable", [*t, *npz, "--set", 'data.path="data.npz"'],
            says=("data.npz", "not an .npz file")),
        Row("npz wrong keys", [*t, *npz, "--set", 'data.path="nokeys.npz"'],
            says=("nokeys.npz", "y_train", "missing")),
        Row("npz wrong shape", [*t, *npz, "--set", 'data.path="badshape.npz"'],
            says=("badshape.npz", "x_train", "shape")),
        # checkpoints
        Row("checkpoint missing", ["info", "gone.pt"], says=("gone.pt", "not found")),
        Row("checkpoint is a folder", ["eval", "."], says=("directory",)),
        Row("truncated checkpoint", ["eval", "truncated.pt"],
            says=("truncated.pt", "truncated or corrupt"), subprocess=True),
        Row("empty checkpoint", ["grow", "empty.pt", "--to", "wide"],
            says=("empty.pt", "empty file")),
        Row("random bytes", ["info", "random.pt"], says=("random.pt", "not an mg checkpoint")),
        Row("text as checkpoint", ["train", "--resume", "notes.txt"],
            says=("notes.txt", "not an mg checkpoint")),
        Row("pickled payload", ["eval", "payload.pt"],
            says=("payload.pt", "refused", "pickled", "weights_only"), subprocess=True),
        Row("pickled subclass", ["grow", "subclass.pt", "--to", "wide"],
            says=("subclass.pt", "refused", "Tracked")),
        Row("newer format", ["info", "newer.pt"],
            says=("newer.pt", "format 99", "newer", "upgrade mg")),
        Row("tampered tensor shape", ["flops", "badshape.pt"],
            says=("badshape.pt", "stem.coefs", "shape (3, 3)")),
        # commands
        Row("unknown grow target", ["grow", MEMBERS, "--to", "wdie"],
            says=(MEMBERS, "unknown grow target 'wdie'", "did you mean 'wide'")),
        Row("unknown target with --coefs", ["grow", MEMBERS, "--to", "tall", "--coefs", "zero"],
            says=("unknown grow target 'tall'",)),
        Row("unknown --coefs", ["grow", MEMBERS, "--to", "wide", "--coefs", "diagonal"],
            says=("--coefs diagonal", "orthogonal")),
        Row("unknown --method", ["grow", MEMBERS, "--to", "wide", "--method", "magic"],
            says=("--method magic", "net2net")),
        Row("--out is a foreign file", ["grow", MEMBERS, "--to", "wide", "--out", "notes.txt"],
            says=("notes.txt", "refusing to overwrite", "--force")),
        Row("--out under a file", ["train", "good.toml", "--out", "notes.txt/run"],
            says=("notes.txt", "not a folder")),
        Row("eval unknown member", ["eval", MEMBERS, "--member", "5"],
            says=("--member 5", "0..1")),
        Row("eval bad split", ["eval", MEMBERS, "--split", "train"],
            says=("--split train", "val or test")),
        Row("eval members and ensemble", ["eval", MEMBERS, "--member", "0", "--ensemble"],
            says=("not both",)),
        Row("recipe and --resume", ["train", "good.toml", "--resume", MEMBERS],
            says=("RECIPE", "--resume")),
        # a failed run: exit 1, the last good checkpoint (members.pt, 1 epoch) untouched
        Row("loss becomes NaN", ["train", "--resume", MEMBERS, "--set", "train.epochs=2",
                                 "--set", "train.lr=1e30", "--device", "cpu"], code=1,
            says=("loss became", "member0, epoch 2", "last good checkpoint is members.pt")),
        # a clear default rather than an error: the members' ensemble, said on stdout
        Row("eval members default", ["eval", MEMBERS, "--device", "cpu"], code=0,
            stdout="ensemble of 2 members", subprocess=True),
    ]


def clear_new(folder: Path, before: dict) -> None:
    """Remove files (and then empty folders) a row created, so the next row starts clean."""
    for p in sorted(folder.rglob("*"), reverse=True):
        rel = str(p.relative_to(folder))
        if p.is_file() and rel not in before:
            p.unlink()
        elif p.is_dir() and not any(p.iterdir()):
            p.rmdir()


def prepare(folder: Path, run: Callable[[list[str], Path], Outcome] = run_subprocess) -> Path:
    """A folder holding members.pt and every broken input of the matrix."""
    make_members(folder, run)
    write_inputs(folder)
    return folder


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        folder = prepare(Path(tmp))
        failed = 0
        t0 = time.perf_counter()
        for row in rows():
            before = snapshot(folder)
            got = run_subprocess(row.args, folder)
            after = snapshot(folder)
            bad = problems(row, got, before, after)
            failed += bool(bad)
            shown = (got.stdout if row.code == 0 else got.stderr).strip().replace("\n", " | ")
            print(f"{'FAIL' if bad else 'ok  '} {row.name:<28} exit {got.code}  "
                  f"{got.seconds:4.1f}s  {shown[:150]}")
            for b in bad + got.notes:
                print(f"       {b}")
        print(f"{len(rows()) - failed}/{len(rows())} rows pass, "
              f"{time.perf_counter() - t0:.0f}s through the real CLI")
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
