"""Named crash points for fault-injection tests.

Each step of a commit, of pack rotation and of garbage collection calls
`point` with its name. When the environment variable ``BUILDATFS_CRASH_AT``
names that step, the daemon dies on the spot (``os._exit``, as a kill -9
would leave it), so tests can check that the store reopens with either the
old or the new content of every file, never a mix.
"""

from __future__ import annotations

import os
from typing import Final

STEPS: Final = (
    "commit:chunks-written",  # records appended to a pack, index not yet changed
    "commit:index-committed",  # index transaction committed, staging not yet removed
    "commit:staging-removed",  # staging file gone
    "pack:rotated",  # a new pack file created, nothing in it yet
    "gc:copied",  # live records copied, index still names the old pack
    "gc:index-updated",  # index names the copies, old pack not yet deleted
)

_TARGET = os.environ.get("BUILDATFS_CRASH_AT")
EXIT_CODE: Final = 86


def point(step: str) -> None:
    """Die here if this is the step the test asked for."""
    if _TARGET == step:
        os._exit(EXIT_CODE)
