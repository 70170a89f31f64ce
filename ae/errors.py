"""One-line errors and warnings: every command-line tool reports them the same way."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import wraps
from typing import TypeVar

from tqdm import tqdm

R = TypeVar("R")

SEED_MAX = 2**32 - 1  # every tool's --seed is in 0..SEED_MAX


def warn(message: str) -> None:
    """Print one warning line on stderr (newlines folded; on its own line even under a progress bar)."""
    tqdm.write(f"[cae-train] warning: {' '.join(message.split())}", file=sys.stderr)


class UserError(Exception):
    """A problem the user can fix (bad flag, missing or corrupt file). Printed as one line, exit 2."""


def check_range(flag: str, value: int | None, low: int, high: int | None) -> None:
    """UserError unless `value` (None: not given) is in low..high (high None: no upper bound)."""
    if value is not None and value < low:
        raise UserError(f"{flag} must be at least {low}, got {value}")
    if value is not None and high is not None and value > high:
        raise UserError(f"{flag} must be at most {high}, got {value}")


def friendly_errors(main: Callable[..., R]) -> Callable[..., R]:
    """Run a CLI entry point; turn UserError (and Ctrl-C) into a one-line message and a non-zero exit."""

    @wraps(main)
    def wrapper(*args, **kwargs) -> R:
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr, flush=True)
            raise SystemExit(130) from None

    return wrapper


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one-line UserErrors (exit 2, no usage dump); `prog` is the command."""

    def error(self, message: str):
        raise UserError(f"{message} (see `{self.prog} --help`)")
