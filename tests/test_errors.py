"""Issue 8, bad input: every row of the matrix in tests/cli_matrix.py fails cleanly.

Each row: its exit code (2 bad input, 1 failed run), nothing on stdout, one to three lines
on stderr naming the file or key and the problem, no traceback, no file touched. Every row
runs in-process (typer's CliRunner, separate stdout and stderr); the rows marked `subprocess`
also run through the real `python -m mg`. `python tests/cli_matrix.py` runs them all that way.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_matrix import (
    MEMBERS,
    clear_new,
    new_files,
    prepare,
    problems,
    rows,
    run_inprocess,
    run_subprocess,
    snapshot,
)

from mg_lib import checkpoint as ck
from mg_lib.errors import MgError

ROWS = rows()
SUBPROCESS_ROWS = [r for r in ROWS if r.subprocess]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """members.pt (trained by the real CLI) and every broken input, shared by the rows."""
    return prepare(tmp_path_factory.mktemp("matrix"), run_inprocess)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # In-process eval rows run a forward pass; one thread avoids OpenMP spin on busy cores.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def check(row, folder: Path, runner) -> list[str]:
    before = snapshot(folder)
    got = runner(row.args, folder)
    after = snapshot(folder)
    clear_new(folder, before)  # keep the folder as the next row expects it
    return problems(row, got, before, after)


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_row_in_process(folder: Path, row) -> None:
    assert check(row, folder, run_inprocess) == []


@pytest.mark.parametrize("row", SUBPROCESS_ROWS, ids=[r.name for r in SUBPROCESS_ROWS])
def test_row_through_real_cli(folder: Path, row) -> None:
    assert check(row, folder, run_subprocess) == []


def test_matrix_covers_issue_8() -> None:
    """Every input the issue lists has a row; a dropped row fails here."""
    names = {r.name for r in ROWS}
    need = {"missing recipe", "malformed TOML", "unknown key", "wrong type", "negative epochs",
            "lr zero", "width zero", "members zero", "--set unknown key", "data path missing",
            "data path unreadable", "npz wrong keys", "npz wrong shape", "truncated checkpoint",
            "random bytes", "pickled payload", "pickled subclass", "newer format",
            "unknown grow target", "unknown --coefs", "unknown --method",
            "eval members default", "--out is a foreign file"}
    assert need <= names, need - names
    assert len(SUBPROCESS_ROWS) >= 6


def test_bad_data_writes_nothing(folder: Path) -> None:
    row = next(r for r in ROWS if r.name == "npz wrong keys")
    before = snapshot(folder)
    got = run_inprocess(row.args, folder)
    after = snapshot(folder)
    clear_new(folder, before)
    assert got.code == 2
    assert new_files(before, after) == []


def test_nan_keeps_the_last_good_checkpoint(folder: Path) -> None:
    """Exit 1 on a NaN loss in epoch 2; the file still loads and holds epoch 1's state."""
    row = next(r for r in ROWS if r.name == "loss becomes NaN")
    before = ck.load(folder / MEMBERS)
    assert check(row, folder, run_inprocess) == []
    after = ck.load(folder / MEMBERS)
    assert after["train"]["epochs"] == before["train"]["epochs"] == {"member0": 1, "member1": 1}
    assert all(torch.equal(after["model"][k], v) for k, v in before["model"].items())
    assert all(torch.isfinite(v).all() for v in after["model"].values() if v.is_floating_point())


def test_payload_is_live_but_never_runs(folder: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The pickled payload does run code when unpickled unsafely, so refusing it matters."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MgError, match=r"refused.*\(exec\)"):
        ck.load(folder / "payload.pt")
    assert not (tmp_path / "PWNED").exists()
    torch.load(folder / "payload.pt", weights_only=False)  # what mg must never do
    assert (tmp_path / "PWNED").exists()


def test_out_foreign_file_with_force(folder: Path, tmp_path: Path) -> None:
    """--force overwrites a foreign file with a valid checkpoint; without it, nothing moves."""
    target = tmp_path / "notes.txt"
    target.write_text("keep me\n")
    refused = run_inprocess(["grow", str(folder / MEMBERS), "--to", "wide", "--out",
                             str(target)], folder)
    assert refused.code == 2 and target.read_text() == "keep me\n"
    got = run_inprocess(["grow", str(folder / MEMBERS), "--to", "wide", "--out", str(target),
                         "--force"], folder)
    assert got.code == 0, got.stderr
    assert got.stdout.strip() == str(target)
    assert ck.load(target)["stage"] == "grown"


def test_eval_default_is_the_ensemble(folder: Path) -> None:
    """No --member/--ensemble on a members checkpoint: the ensemble, the same as --ensemble."""
    plain = run_inprocess(["eval", MEMBERS, "--json", "--device", "cpu"], folder)
    explicit = run_inprocess(["eval", MEMBERS, "--ensemble", "--json", "--device", "cpu"],
                             folder)
    assert plain.code == explicit.code == 0, plain.stderr
    assert plain.stdout == explicit.stdout
    assert '"what": "ensemble of 2 members"' in plain.stdout


def test_os_errors_are_one_line_exit_1(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine failing (disk full while writing a log, say) is a failed run, not a crash."""
    import errno

    from mg_lib import ops

    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "run/metrics.jsonl")

    monkeypatch.setattr(ops, "info", full)
    got = run_inprocess(["info", MEMBERS], folder)
    assert (got.code, got.stdout, got.crash) == (1, "", None)
    assert got.stderr == "mg: error: run/metrics.jsonl: No space left on device\n"
