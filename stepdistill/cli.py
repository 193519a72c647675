"""Small helpers shared by the recipes in ``training_scripts/``."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from .training import NonFiniteLossError


def parse_args(*dataclass_types, args: list[str] | None = None) -> tuple:
    """Parse the command line into the given dataclasses (``HfArgumentParser``, ``--help`` shows every field)
    and seed every random generator with the parsed ``seed``."""
    from accelerate.utils import set_seed
    from transformers import HfArgumentParser

    parsed = HfArgumentParser(dataclass_types).parse_args_into_dataclasses(args)
    seeds = [obj.seed for obj in parsed if isinstance(getattr(obj, "seed", None), int)]
    # Seed before any model is built: LoRA initialisation, GAN heads and every other draw follow --seed.
    set_seed(seeds[0] if seeds else 0)
    return parsed


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a bad-input error raised inside the block into one line on stderr and exit status 2."""
    try:
        yield
    except (ValueError, FileNotFoundError, NonFiniteLossError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
