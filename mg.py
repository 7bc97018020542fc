"""mg: grow neural networks by recombining learned templates (MixtureGrowth).

The command line only parses, calls mg_lib and prints. Results go to stdout (a path, a
table or one JSON object), logs and progress to stderr, so shell pipelines work:

    g=$(mg grow "$(mg train recipes/small.toml)" --to wide) && mg train --resume "$g"
"""

from __future__ import annotations

import errno
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

app = typer.Typer(
    help="Grow neural networks by recombining learned templates (MixtureGrowth, WACV 2024).\n\n"
    "Train k small members, grow them offline into one k-times wider net, keep training.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

SET_HELP = "Override a recipe field, e.g. --set train.epochs=2 (value parsed as TOML). Repeatable."
DEVICE_HELP = "auto (CUDA, then MPS, then CPU), cpu, cuda or mps."


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn mg's errors into one line on stderr and an exit code; never a traceback."""
    from mg_lib.errors import MgError

    try:
        yield
    except MgError as e:
        typer.echo(f"mg: error: {e}", err=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("mg: interrupted", err=True)
        raise typer.Exit(130) from None
    except OSError as e:
        # The machine, not mg, failed (disk full, permissions, a vanished folder): a failed
        # run, told in one line. A closed stdout pipe is typer's to handle quietly.
        if e.errno == errno.EPIPE:
            raise
        where = f"{e.filename}: " if e.filename else ""
        typer.echo(f"mg: error: {where}{e.strerror or e}", err=True)
        raise typer.Exit(1) from None


def emit(obj: Any, as_json: bool, text: str) -> None:
    typer.echo(json.dumps(obj, indent=None) if as_json else text)


@app.command()
def train(
    recipe: Path | None = typer.Argument(None, help="Recipe TOML (omit with --resume)."),
    resume: Path | None = typer.Option(None, "--resume", help="Continue this checkpoint: "
                                       "its unfinished phase, or a grown net's training."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Run folder for a new run "
                                    "(default runs/<recipe name>); with --resume, a new "
                                    "checkpoint path (default: update CKPT in place)."),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    stop_after: int | None = typer.Option(None, "--stop-after", min=1, help="Stop after this "
                                          "many epochs; the checkpoint stays resumable."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file at the "
                               "output path even if it is not an mg checkpoint."),
) -> None:
    """Train the members of a recipe, or resume any checkpoint. Prints the checkpoint path."""
    with user_errors():
        from mg_lib.errors import MgError
        from mg_lib.recipe import load_recipe

        if (recipe is None) == (resume is None):
            raise MgError("give a RECIPE to start a run, or --resume CKPT to continue one")
        # Check the recipe before importing torch: a typo is reported in a blink.
        r = load_recipe(recipe, sets) if recipe is not None else None

        from mg_lib import distributed as dist
        from mg_lib import train as tr
        from mg_lib.runtime import resolve_device

        dev = resolve_device(device)
        with dist.session(dev):
            if resume is not None:
                path = tr.resume(resume, sets, dev, out, stop_after, force)
            else:
                assert recipe is not None and r is not None
                folder = out if out is not None else Path("runs") / recipe.stem
                path = tr.train_recipe(r, folder, dev, stop_after, force)
        if dist.is_main():
            typer.echo(str(path))


@app.command()
def grow(
    ckpt: Path = typer.Argument(..., help="A trained members checkpoint."),
    to: str = typer.Option(..., "--to", help="Grow target: a [grow.NAME] table of the recipe."),
    coefs: str | None = typer.Option(None, "--coefs", help="New coefficients: zero "
                                     "(function-preserving), orthogonal, copy or random. "
                                     "Default: the target's grow.NAME.coefs."),
    method: str | None = typer.Option(None, "--method", help="mixture (recombine templates), "
                                      "random (fresh off-diagonal blocks) or net2net."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output checkpoint (default: "
                                    "grown-NAME.pt beside CKPT)."),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
    force: bool = typer.Option(False, "--force", help="Overwrite a non-checkpoint file."),
) -> None:
    """Grow members into one wider net, offline: no data is read. Prints the new path."""
    with user_errors():
        from mg_lib import ops

        typer.echo(str(ops.grow_checkpoint(ckpt, to, coefs, method, out, sets, force)))


@app.command("eval")
def evaluate(
    ckpt: Path = typer.Argument(..., help="Any mg checkpoint."),
    split: str = typer.Option("val", "--split", help="val (held out of train) or test."),
    member: int | None = typer.Option(None, "--member", help="Evaluate member M alone."),
    ensemble: bool = typer.Option(False, "--ensemble", help="Average the members' logits "
                                  "(the default for a members checkpoint)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    sets: list[str] = typer.Option([], "--set", help="Override data fields, e.g. "
                                   "--set data.path=cifar.npz."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """Top-1, top-5 and loss of a checkpoint on the val or test split.

    Under torchrun each rank evaluates its shard of the split and rank 0 prints the exact
    numbers over the whole split.
    """
    with user_errors():
        from mg_lib import distributed as dist
        from mg_lib import ops
        from mg_lib.runtime import resolve_device

        dev = resolve_device(device)
        with dist.session(dev):
            res = ops.eval_checkpoint(ckpt, split, member, ensemble, sets, dev)
        if not dist.is_main():
            return
        text = (f"{res['what']} on {res['split']} ({res['count']} images): "
                f"top1 {100 * res['top1']:.2f}%  top5 {100 * res['top5']:.2f}%  "
                f"loss {res['loss']:.4f}")
        emit(res, as_json, text)


@app.command()
def flops(
    source: Path = typer.Argument(..., help="A recipe TOML or a checkpoint."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """MACs, FLOPs, parameters and training cost of every stage. Reads no data."""
    with user_errors():
        from mg_lib import ops

        res = ops.flops_report(source, sets)
        emit(res, as_json, ops.flops_text(res))


@app.command()
def info(
    ckpt: Path = typer.Argument(..., help="Any mg checkpoint."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """What a checkpoint holds: stage, shapes, lineage, training state, history."""
    with user_errors():
        from mg_lib import ops

        res = ops.info(ckpt)
        emit(res, as_json, ops.info_text(res))


@app.command()
def export(
    ckpt: Path = typer.Argument(..., help="Any mg checkpoint (members or grown)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output file (default: "
                                    "<name>-plain.pt beside CKPT)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file that is "
                               "not an mg plain export."),
) -> None:
    """Write a plain PyTorch WRN state_dict (synthesised weights) for inference. Prints its
    path; load it into build_model(Arch.from_dict(blob["arch"])), see mg_lib/export.py."""
    with user_errors():
        from mg_lib import export as ex

        typer.echo(str(ex.export_checkpoint(ckpt, out, force)))


def main() -> None:
    """Console entry point (`mg`, `python -m mg`)."""
    app()


if __name__ == "__main__":
    sys.exit(main())
