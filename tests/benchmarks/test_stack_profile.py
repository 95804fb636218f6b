"""benchmarks/stack_profile.py: py-spy's collapsed stacks summed per thread, inclusive and innermost."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "stack_profile.py"

RAW = """\
thread (0x1): MainThread;<module> (launch/train.py:3);train_step (sae_dist/train/trainer.py:120);backward (torch/autograd/__init__.py:9) 6
thread (0x1): MainThread;<module> (launch/train.py:3);train_step (sae_dist/train/trainer.py:120);step (torch/optim/adam.py:5) 2
thread (0x2): prefetch;_produce (sae_dist/data/prefetch.py:50);contexts (sae_dist/data/tokenize.py:70);encode (tokenizers/x.py:1) 2
"""


def test_samples_are_summed_per_thread_inclusive_and_innermost(tmp_path):
    raw = tmp_path / "job.txt"
    raw.write_text(RAW)
    out = subprocess.run([sys.executable, str(SCRIPT), str(raw), "--top", "5"], capture_output=True, text=True,
                         check=True, env={"COLUMNS": "200", "PATH": ""}).stdout
    main, prefetch = out.split("prefetch (0x2)")
    assert "MainThread (0x1): 80% of 10 samples" in main
    assert ": 20% of 10 samples" in prefetch

    def share(table: str, frame: str) -> list[str]:
        """The percentages on the rows naming `frame` (inclusive first, then innermost)."""
        return [row.split("│")[2].strip() for row in table.splitlines() if frame in row]

    assert share(main, "train_step (sae_dist/train/trainer.py)") == ["100%"]  # inclusive only: never innermost
    assert share(main, "backward (torch/autograd/__init__.py)") == ["75%", "75%"]
    assert share(main, "step (torch/optim/adam.py)") == ["25%", "25%"]
    assert share(prefetch, "encode (tokenizers/x.py)") == ["100%", "100%"]
    assert share(main, "encode (tokenizers/x.py)") == []


def test_a_missing_file_is_one_line_and_status_2(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "none.txt")], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "none.txt" in result.stderr
