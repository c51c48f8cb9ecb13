"""`accel estimate-memory`: what a model needs per dtype, from a factory or a config.json."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any

from accel.inference.estimate import BYTES_PER_WEIGHT, DEFAULT_DTYPES, estimate_memory


def add_parser(subparsers: Any) -> None:
    """Register `accel estimate-memory` on the `accel` command line."""
    parser = subparsers.add_parser(
        "estimate-memory",
        help="memory a model needs per dtype (total, largest layer, training with Adam)",
        description="Estimate the memory a model needs, without its weights and offline: "
                    "from a Hugging Face config.json (or its folder) or a Python factory.",
    )
    parser.add_argument("model", help="a config.json, a folder holding one, or "
                                      "'package.module:function' returning a torch module")
    parser.add_argument("--dtypes", nargs="+", default=list(DEFAULT_DTYPES),
                        choices=list(BYTES_PER_WEIGHT), metavar="DTYPE",
                        help=f"dtypes to show (default: {' '.join(DEFAULT_DTYPES)}; "
                             f"choices: {', '.join(BYTES_PER_WEIGHT)})")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=run_command)


def run_command(args: argparse.Namespace) -> int:
    """`accel estimate-memory MODEL [--dtypes ...] [--json]`."""
    # A console script does not put the working directory on sys.path; a factory named
    # on the command line usually lives there.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    with _quiet_libraries():
        estimate = estimate_memory(args.model, dtypes=args.dtypes)
    print(json.dumps(estimate.as_dict(), indent=2) if args.json else estimate.table())
    return 0


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Only the table: building a model imports libraries (transformers imports torchao,
    which logs the kernels it cannot load; torch logs pytree deprecations) whose warnings
    say nothing about the estimate. Errors still raise."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)
