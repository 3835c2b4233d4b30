"""The ``nmaem`` command (also ``python -m nmaem_plugin``).

``build_parser`` assembles the subcommands (one module each in this folder: its parser and its
runner); ``main`` runs one and turns errors and interrupts into one line and an exit status.
Each subcommand has ``--help``, prints progress for long work, and on bad input prints
``nmaem: error: <one line naming the file and the problem>`` and exits with status 2.
"""
import argparse
import sys
from typing import Optional, Sequence

from ..base.errors import NmaemError
from ..base.threads import choose_threads, use_threads
from . import (check, evaluate, export, infer, modes, refine_states, report, simulate, states,
               train)
from .options import add_threads_option

__all__ = ["main", "build_parser", "Terminated", "PROGRESS_STREAM"]

# where a command's "threads:" line goes: with its progress lines, on stdout, except for
# check (progress on stderr, the report on stdout) and evaluate (stdout is its JSON result,
# and it prints no progress)
PROGRESS_STREAM = {"check": "stderr", "evaluate": None}


def build_parser() -> argparse.ArgumentParser:
    from nmaem_plugin import __version__
    parser = argparse.ArgumentParser(
        prog="nmaem",
        description="Heterogeneous reconstruction of deformable atomic models in cryo-EM: "
                    "normal modes, simulation, training, inference, export.")
    parser.add_argument("--version", action="version", version="nmaem " + __version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    modes.add_parser(sub)
    simulate.add_parser(sub)
    train.add_parser(sub)
    infer.add_parser(sub)
    export.add_parser(sub)
    states.add_parser(sub)
    refine_states.add_parser(sub)
    evaluate.add_parser(sub)
    report.add_parser(sub)
    check.add_parser(sub)
    for command in sub.choices.values():
        add_threads_option(command)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt: every ``with`` block
    unwinds (atomic writes remove their temporary file, the run lock is released)."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _checkpoint_epoch(run_dir):
    """The epochs done in the last checkpoint of ``run_dir`` (0 when there is none)."""
    from ..io.runfolder import checkpoint_file, read_log_rows
    try:
        import torch
        ck = torch.load(checkpoint_file(run_dir, "last"), map_location="cpu",
                        weights_only=True)
        return int(ck["epoch"])
    except Exception:
        rows = read_log_rows(run_dir)
        return int(rows[-1]["epoch"]) if rows else 0


def _interrupted_line(args, how):
    """The one line printed when a command is stopped by a signal."""
    if getattr(args, "command", None) == "train":
        done = _checkpoint_epoch(args.output)
        kept = ("keeps its last checkpoint (epoch %d)" % done if done
                else "has no finished epoch yet")
        return ("nmaem: interrupted by %s; the run %s %s: continue it with nmaem train -o "
                "%s --resume" % (how, args.output, kept, args.output))
    return ("nmaem: interrupted by %s; outputs are written whole or not at all (no "
            "partial file was left); run the command again" % how)


def _one_line(exc):
    """The message of an NmaemError on one line; one re-raised from a DataLoader worker
    (whose text holds the worker's traceback) gives its own last line."""
    text = str(exc)
    if "Traceback (most recent call last)" in text:
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        text = last.split("NmaemError: ", 1)[-1]
    return text.replace("\n", " ")


def main(argv: Optional[Sequence[str]] = None) -> int:
    import signal
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(words)
    from ..base.faults import reset_faults
    from .options import given_options
    reset_faults()
    command = parser._subparsers._group_actions[0].choices[args.command]   # argparse's
    args.given = given_options(command, words[words.index(args.command) + 1:])
    previous = None
    if not getattr(args, "worker", False):       # torchrun workers: their launcher's
        try:
            previous = signal.signal(signal.SIGTERM, _on_sigterm)
        except ValueError:                       # not the main thread
            previous = None
    if hasattr(signal, "SIGXFSZ"):
        # the file-size limit (ulimit -f): EFBIG at the write, one line, not a core dump
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        except ValueError:
            pass
    try:
        # one rule for every command (base.threads), before numpy, torch or a BLAS loads
        threads, why = choose_threads(args.threads)
        stream = PROGRESS_STREAM.get(args.command, "stdout")
        if stream and not getattr(args, "worker", False):
            out = sys.stderr if stream == "stderr" else sys.stdout
            out.write("threads: %d (%s)\n" % (threads, why))
            out.flush()
        with use_threads(threads):
            return args.func(args) or 0
    except NmaemError as exc:
        sys.stderr.write("nmaem: error: %s\n" % _one_line(exc))
        return 2
    except OSError as exc:
        # an environment fault outside the checked paths: one line naming the file
        from ..base.errors import os_error
        sys.stderr.write("nmaem: error: %s\n" % str(
            os_error(exc, None, "cannot read or write")).replace("\n", " "))
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(_interrupted_line(args, "Ctrl-C") + "\n")
        return 130
    except Terminated:
        sys.stderr.write(_interrupted_line(args, "SIGTERM") + "\n")
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
