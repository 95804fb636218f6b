"""Where each thread of a job spends its samples: a summary of py-spy's raw output (collapsed stacks).

    py-spy record --format raw --threads --gil -o job.txt -- python launch/train.py ...
    python benchmarks/stack_profile.py job.txt [--top 12]

One table per thread that holds at least 2% of the samples: its share of them, the frames of this project's code
and of the libraries it calls with the most samples counted once per stack (inclusive), and the innermost frames
of any code with the most samples (where the time is spent). With `--gil`, py-spy keeps only the samples of
the thread holding the GIL, so the shares say which thread the interpreter is serving: a data path bound by Python
contention shows the training thread holding it while the producer thread waits.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
_THREAD = re.compile(r"^thread \((?P<id>[^)]*)\): ?(?P<name>.*)$")
_OURS = ("sae_dist/", "launch/", "benchmarks/", "transformers/", "tokenizers/", "torch/", "datasets/")


def parse(lines: list[str]) -> dict[str, tuple[Counter, Counter]]:
    """{thread: (inclusive samples per frame of the listed code, samples per innermost frame)}; each first
    Counter also holds the thread's total under the key ''."""
    threads: dict[str, tuple[Counter, Counter]] = defaultdict(lambda: (Counter(), Counter()))
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = _THREAD.match(frames[0])
        name = f"{thread['name'] or 'thread'} ({thread['id']})" if thread else "process"
        inclusive, innermost = threads[name]
        samples = int(count)
        inclusive[""] += samples
        labels = [f"{m['function']} ({m['file']})" for m in map(_FRAME.match, frames[1 if thread else 0 :]) if m]
        if labels:
            innermost[labels[-1]] += samples
        for label in dict.fromkeys(labels):
            if any(part in label for part in _OURS):
                inclusive[label] += samples
    return threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", type=Path, help="py-spy's output with --format raw")
    parser.add_argument("--top", type=int, default=12, help="frames per thread")
    args = parser.parse_args()
    if not args.raw.is_file():
        print(f"{args.raw}: no such file (py-spy record --format raw -o FILE ...)", file=sys.stderr)
        sys.exit(2)
    threads = parse(args.raw.read_text().splitlines())
    total = sum(inclusive[""] for inclusive, _ in threads.values()) or 1
    console = Console(width=160)
    for name, (inclusive, innermost) in sorted(threads.items(), key=lambda item: -item[1][0][""]):
        share = inclusive[""] / total
        if share < 0.02:
            continue
        table = Table(title=f"{name}: {share:.0%} of {total:,} samples")
        table.add_column("frame")
        table.add_column("of the thread", justify="right")
        table.add_row("[bold]inclusive (this project and its libraries)[/bold]", "")
        for label, samples in [(k, v) for k, v in inclusive.most_common(args.top + 1) if k][: args.top]:
            table.add_row(escape(label), f"{samples / inclusive[''] :.0%}")
        table.add_row("[bold]innermost[/bold]", "")
        for label, samples in innermost.most_common(args.top):
            table.add_row(escape(label), f"{samples / inclusive[''] :.0%}")
        console.print(table)

if __name__ == "__main__":
    main()
