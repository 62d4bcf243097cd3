"""Progress bars that show on a terminal and stay quiet in logs and tests."""

from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], desc: str, total: int | None = None) -> tqdm:
    """A tqdm bar, disabled when stderr is not a terminal or SPILLOVER_NO_PROGRESS is set."""
    return tqdm(iterable, desc=desc, total=total, disable=progress_disabled(), leave=False, dynamic_ncols=True)


def progress_disabled() -> bool:
    """No bars when stderr is not a terminal (logs, pipes, tests) or SPILLOVER_NO_PROGRESS is set."""
    return bool(os.environ.get("SPILLOVER_NO_PROGRESS")) or not sys.stderr.isatty()
