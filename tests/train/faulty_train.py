"""launch/train.py with faults injected, for the torchrun restart test: `torchrun ... faulty_train.py OVERRIDES`.

FAULT_PLAN (JSON) maps a torchrun attempt (TORCHELASTIC_RESTART_COUNT) to one fault of one rank:
    {"0": {"rank": 1, "signal": "SIGTERM", "step": 7},                    # signal at the start of step 7
     "1": {"rank": 0, "signal": "SIGKILL", "step": 20, "when": "publish"}} # during the save of step 20, after the
                                                                           # rename, before `latest` is replaced

Each rank appends the status it exits with to exit_statuses.jsonl in the working folder (torchrun's own log names
only the first failure it sees, and under load that can be a rank it killed after the rank had chosen its status).
"""

from __future__ import annotations

import json
import os
import runpy
import signal
from pathlib import Path

from sae_dist.run_dir import LATEST_FILE, checkpoint_name
from sae_dist.train import checkpoint
from sae_dist.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]


def install(fault: dict) -> None:
    sig = getattr(signal, fault["signal"])
    step = int(fault["step"])
    if fault.get("when") == "publish":
        write = checkpoint.write_atomically

        def write_then_die(path, data):
            if path.name == LATEST_FILE and data.decode() == checkpoint_name(step):
                os.kill(os.getpid(), sig)
            write(path, data)

        checkpoint.write_atomically = write_then_die
    else:
        train_step = Trainer.train_step

        def step_then_signal(self, x_TD):
            if self.step + 1 == step:
                os.kill(os.getpid(), sig)
            return train_step(self, x_TD)

        Trainer.train_step = step_then_signal


if __name__ == "__main__":
    fault = json.loads(os.environ.get("FAULT_PLAN", "{}")).get(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if fault is not None and int(fault["rank"]) == int(os.environ.get("RANK", "0")):
        install(fault)
    try:
        runpy.run_path(str(ROOT / "launch" / "train.py"), run_name="__main__")
    except SystemExit as exc:
        record = {"attempt": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
                  "rank": int(os.environ.get("RANK", "0")), "status": exc.code}
        with open("exit_statuses.jsonl", "a") as log:
            log.write(json.dumps(record) + "\n")
        raise
