"""Lines for the terminal and the job's log: each written whole, in one write.

`print(text, file=...)` writes the text and its newline separately, and where the stream is unbuffered
(PYTHONUNBUFFERED=1, as in the Docker image and many clusters) the ranks of a torchrun job, which share one log,
interleave between the two: 'error: ... by peererror: ...' on one line, the other rank's newline after it.
"""

from __future__ import annotations

import sys
from typing import TextIO


def say(line: str, stream: TextIO | None = None) -> None:
    """Write `line` and its newline to `stream` (default: stderr) in one write, then flush."""
    stream = sys.stderr if stream is None else stream
    stream.write(line + "\n")
    stream.flush()
