"""What every command line of the package shares: bad input ends in one line on stderr and exit code 2."""
from __future__ import annotations

import functools
import sys
import time


class UserError(Exception):
    """Bad input found by the trainer: printed as one line, before any expensive work."""


def one_line_errors(*user_errors: type[BaseException], failures: tuple[type[BaseException], ...] = ()):
    """Decorator for a CLI's main(argv) -> int: an exception of user_errors prints `error: ...` as one line
    on stderr and exits 2; one of failures (e.g. a diverged run) prints the same and exits 1; anything
    else is a bug and keeps its traceback. Under torchrun every rank meets the same error and rank 0
    says it: the others wait so torchrun stops them first, and only an error of one rank alone is
    still printed, after the wait, with its rank."""
    def wrap(main):
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            try:
                return main(argv)
            except user_errors + failures as err:
                from .distributed import from_env

                ctx = from_env()
                if not ctx.is_main:
                    time.sleep(5)
                print(f"error: {err}" if ctx.is_main else f"error (rank {ctx.rank}): {err}", file=sys.stderr)
                return 1 if isinstance(err, failures) else 2
        return run
    return wrap
