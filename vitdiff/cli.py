"""The ``vitdiff`` command: ``vitdiff [--debug] {models,train,sample,eval} ...``.

Each subcommand lives beside the code it drives and exposes ``main(argv) -> int``;
this file only dispatches, so ``vitdiff --help`` stays fast (no torch import).

User errors (:class:`vitdiff.config.UserError`, and the operating system's "disk full", "permission denied",
"no such file" and the like) end every subcommand the same way, in :func:`run_command`: one line on stderr
saying what is wrong and what to do, exit status 2 (3: training diverged). ``--debug`` or ``VITDIFF_DEBUG=1``
shows the traceback instead.
"""
from __future__ import annotations

import errno
import importlib
import os
import sys
from typing import Callable

COMMANDS = {
    "models": ("vitdiff.models.catalog", "list every preset with params and GFLOPs"),
    "train": ("vitdiff.trainer", "train from an experiments/ config: vitdiff train CONFIG [key=value ...]"),
    "sample": ("vitdiff.sample_cli", "sample an image grid from a checkpoint"),
    "eval": ("vitdiff.evaluate", "evaluate a checkpoint (FID / FD / NLL) and save the protocol"),
}


DEBUG_ENV = "VITDIFF_DEBUG"
# What to do about the operating-system errors a user can fix; the rest (a bug) keep their traceback.
OS_ERROR_HINTS = {
    errno.ENOSPC: "free space on that disk or write elsewhere",
    errno.EDQUOT: "free space within your quota or write elsewhere",
    errno.EACCES: "fix its permissions or choose another location",
    errno.EPERM: "fix its permissions or choose another location",
    errno.EROFS: "the file system is read-only: choose another location",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file: check the path",
    errno.EISDIR: "it is a directory: pass a file",
    errno.EEXIST: "choose another path",
}


def user_error_message(error: BaseException) -> str | None:
    """The one-line report of an error the user can fix; None for anything else (a bug: keep the traceback)."""
    from .config import UserError

    if isinstance(error, UserError):
        return str(error)
    if isinstance(error, OSError) and error.errno in OS_ERROR_HINTS:
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror}{where} ({OS_ERROR_HINTS[error.errno]})"
    if isinstance(error, FileNotFoundError):  # raised by vitdiff with a message and no errno
        return str(error)
    return None


def run_command(prog: str, command: Callable[[], int | None]) -> int:
    """Run a subcommand's body; a user error becomes one line on stderr and its exit status (2, or the error's
    ``exit_status``), unless --debug / VITDIFF_DEBUG=1 asks for the traceback."""
    try:
        return int(command() or 0)
    except Exception as error:
        message = user_error_message(error)
        if message is None or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        if not in_worker_rank():
            print(f"{prog}: {message}", file=sys.stderr)
        return getattr(error, "exit_status", 2)


def launch_ranks(module: str, argv: list[str], nproc_per_node: int) -> int:
    """``torchrun --standalone --nproc-per-node=N -m module argv`` in this process, without torchrun's multi-screen
    failure report: a rank that stops on a user error has printed its line (exit status 2 or 3), so nothing is added;
    another failure adds one line naming the rank (its traceback is above)."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc_per_node}", "-m", module, *argv]))
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        if failure.exitcode in (2, 3):
            return failure.exitcode
        print(f"{module}: rank {rank} failed with exit status {failure.exitcode} (see above)", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


def in_worker_rank() -> bool:
    """A rank other than 0 of a torchrun job: it leaves the report of a user error every rank shares to rank 0."""
    return os.environ.get("RANK", "0") != "0"


def usage() -> str:
    lines = ["usage: vitdiff [--debug] COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`vitdiff COMMAND --help` for a command's options. --debug (or VITDIFF_DEBUG=1): a traceback "
              "instead of the one-line message for user errors."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--debug" in argv:
        argv = [arg for arg in argv if arg != "--debug"]
        os.environ[DEBUG_ENV] = "1"  # also reaches the processes a command starts
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"vitdiff: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
