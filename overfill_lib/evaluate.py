"""``python -m overfill_lib.evaluate``: lm-eval's own command line, with the ``overfill`` model registered and this
project's task directory (``overfill_lib/lm_tasks``) on the include path when the command line names none."""

from __future__ import annotations

import sys
from collections.abc import Sequence

_TASK_COMMANDS = ("run", "ls", "validate")


def with_our_tasks(args: Sequence[str]) -> list[str]:
    """The command line with ``--include_path <our lm_tasks>`` added where lm-eval reads tasks and none is given."""
    from overfill_lib.evaluation import LM_TASKS_DIR

    args = list(args)
    if any(a == "--include_path" or a.startswith("--include_path=") for a in args) or any(a in ("-h", "--help") for a in args):
        return args
    command = args[0] if args else None
    # lm-eval inserts `run` itself when no subcommand is given and there are arguments.
    if command in _TASK_COMMANDS or (command is not None and command.startswith("-")):
        return [*args, "--include_path", str(LM_TASKS_DIR)]
    return args


def main(argv: Sequence[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    import overfill_lib.evaluation  # noqa: F401  (registers the `overfill` model with lm-eval)

    args = with_our_tasks(sys.argv[1:] if argv is None else argv)
    # lm-eval's parser reads sys.argv itself.
    saved = sys.argv
    sys.argv = [saved[0] if saved else "overfill_lib.evaluate", *args]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
