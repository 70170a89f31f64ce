"""One-line errors and warnings: every command-line tool reports them the same way."""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from collections.abc import Callable
from functools import wraps
from typing import TypeVar

from tqdm import tqdm

R = TypeVar("R")

SEED_MAX = 2**32 - 1  # every tool's --seed is in 0..SEED_MAX
STEPS_MAX = 10**9  # the most optimizer steps (or warm-up steps) a run may have


def warn(message: str) -> None:
    """Print one warning line on stderr (newlines folded; on its own line even under a progress bar)."""
    tqdm.write(f"[cae-train] warning: {' '.join(message.split())}", file=sys.stderr)


class UserError(Exception):
    """A problem the user can fix (bad flag, missing or corrupt file). Printed as one line, exit 2."""


def readable(number: float) -> str:
    """A number as a person reads it in a message: 1e+308, not its 309 digits."""
    if isinstance(number, int) and abs(number) < 10**10:
        return str(number)
    try:
        return f"{float(number):.6g}"
    except OverflowError:
        return f"about 1e+{len(str(abs(int(number)))) - 1}"


def check_range(flag: str, value: int | None, low: int, high: int | None) -> None:
    """UserError unless `value` (None: not given) is in low..high (high None: no upper bound)."""
    if value is not None and value < low:
        raise UserError(f"{flag} must be at least {readable(low)}, got {readable(value)}")
    if value is not None and high is not None and value > high:
        raise UserError(f"{flag} must be at most {readable(high)}, got {readable(value)}")


def friendly_errors(main: Callable[..., R]) -> Callable[..., R]:
    """Run a CLI entry point: the environment is checked first (`ae.environment`), SIGINT/SIGTERM
    raise `Interrupted` (`ae.interrupt`); UserError and a signal become one line and a non-zero exit."""

    @wraps(main)
    def wrapper(*args, **kwargs) -> R:
        from ae.environment import check_environment
        from ae.interrupt import Interrupted, raise_on_signals

        try:
            with raise_on_signals():
                check_environment()
                return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        except Interrupted as stop:  # cleanup ran while it unwound: skip the interpreter's slow teardown
            print(f"error: {stop}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(stop.exit_code)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr, flush=True)
            raise SystemExit(130) from None
        except BrokenPipeError:  # stdout's reader went away (`... | head`): stop quietly, as shell tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            raise SystemExit(128 + signal.SIGPIPE) from None

    return wrapper


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one-line UserErrors (exit 2, no usage dump); `prog` is the command.

    A negative number in any notation (-1e-9, -.5, -inf) is a flag's value, so that its range check
    (not argparse's "expected one argument") answers it.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$", re.I)

    def error(self, message: str):
        raise UserError(f"{message} (see `{self.prog} --help`)")
