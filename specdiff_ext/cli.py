"""The ``specdiff`` command (also ``python -m specdiff_ext``).

Subcommands so far: ``make-data`` (target continuations of ShareGPT prompts, as token shards)
and ``train-drafter`` (distil a masked-diffusion drafter from them). Each forwards its
arguments to the module that implements it; ``specdiff SUBCOMMAND --help`` lists them.
"""

from __future__ import annotations

import sys
from typing import Callable, Dict, Optional, Sequence


def _make_data(argv: Sequence[str]) -> int:
    from .drafter import data

    return data.main(argv)


def _train_drafter(argv: Sequence[str]) -> int:
    from .drafter import train

    return train.main(argv)


_COMMANDS: Dict[str, Callable[[Sequence[str]], int]] = {
    "make-data": _make_data,
    "train-drafter": _train_drafter,
}

_USAGE = """usage: specdiff COMMAND [ARGS...]

commands:
  make-data       generate target continuations of ShareGPT prompts (token shards + manifest)
  train-drafter   distil a masked-diffusion drafter from those shards

`specdiff COMMAND --help` shows a command's arguments.
"""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command named by argv[0] with the remaining arguments.

    Examples
    --------
    >>> main(["--help"])  # doctest: +SKIP
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_USAGE, end="")
        return 0
    cmd = _COMMANDS.get(args[0])
    if cmd is None:
        print(f"specdiff: unknown command {args[0]!r}\n\n{_USAGE}", end="", file=sys.stderr)
        return 2
    return int(cmd(args[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
