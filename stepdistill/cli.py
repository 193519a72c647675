"""Small helpers shared by the recipes in ``training_scripts/``."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from .training import NonFiniteLossError


def parse_args(*dataclass_types, args: list[str] | None = None) -> tuple:
    """Parse the command line into the given dataclasses (``HfArgumentParser``, ``--help`` shows every field)."""
    from transformers import HfArgumentParser

    return HfArgumentParser(dataclass_types).parse_args_into_dataclasses(args)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a bad-input error raised inside the block into one line on stderr and exit status 2."""
    try:
        yield
    except (ValueError, FileNotFoundError, NonFiniteLossError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
