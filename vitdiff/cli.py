"""The ``vitdiff`` command: ``vitdiff {models,train,sample,eval} ...``.

Each subcommand lives beside the code it drives and exposes ``main(argv) -> int``;
this file only dispatches, so ``vitdiff --help`` stays fast (no torch import).
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "models": ("vitdiff.models.catalog", "list every preset with params and GFLOPs"),
    "train": ("vitdiff.trainer", "train from an experiments/ config: vitdiff train CONFIG [key=value ...]"),
    "sample": ("vitdiff.sample_cli", "sample an image grid from a checkpoint"),
    "eval": ("vitdiff.evaluate", "evaluate a checkpoint (FID / FD / NLL) and save the protocol"),
}


def usage() -> str:
    lines = ["usage: vitdiff COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`vitdiff COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
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
