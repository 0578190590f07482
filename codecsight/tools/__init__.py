"""Offline tools above the serving runtime and the client: the `codecsight` command, the
scene generator, training, evaluation and benchmarks.

Import direction: `codecsight.tools` -> `codecsight_client` -> `codecsight` (the runtime).
The runtime never imports the client or the tools.
"""
from __future__ import annotations

import sys


class UsageError(ValueError):
    """A tool was asked for something it cannot do (a flag's value); entry points exit 2."""


class ToolError(RuntimeError):
    """A tool could not do its work (a measurement failed, a program is missing); exit 1."""


def exit_code(prog: str, main, argv=None) -> int:
    """Run an entry point's main(argv) and return its exit code.

    Library functions raise, only entry points exit: a UsageError becomes its message on
    stderr and code 2; a ToolError or codecsight.serve.ServerError (no server could be built,
    started or made ready) its message and code 1. Anything else keeps its traceback.
    """
    from codecsight.serve import ServerError

    try:
        return main(argv)
    except UsageError as e:
        print(f"{prog}: {e}", file=sys.stderr, flush=True)
        return 2
    except (ToolError, ServerError) as e:
        print(f"{prog}: {e}", file=sys.stderr, flush=True)
        return 1
