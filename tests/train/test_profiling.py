"""trainer.profile_steps: a torch.profiler window over a running job's steps writes each rank's Chrome trace and
operator table, changes nothing the run learns, and in a sweep runs once for all members."""

import gzip
import json

from sae_dist.data import build_activation_source
from sae_dist.train.run import train_from_config
from sae_dist.train.trainer import Trainer


def test_profile_window_writes_trace_and_table_and_changes_nothing(make_run, tmp_path, capsys):
    run = make_run(steps=12, log_every=5, profile_steps=3)
    profiled = Trainer(run, build_activation_source(run))
    profiled.train()
    summary = capsys.readouterr().out
    folder = profiled.run_dir / "profile"
    assert sorted(p.name for p in folder.iterdir()) == ["steps_6-8_rank_0.json.gz", "steps_6-8_rank_0.txt"]
    events = json.loads(gzip.decompress((folder / "steps_6-8_rank_0.json.gz").read_bytes()))["traceEvents"]
    names = {event.get("name") for event in events}
    assert "aten::mm" in names and "Optimizer.step#TorchAdam.step" in names
    table = (folder / "steps_6-8_rank_0.txt").read_text()
    assert table.startswith("torch.profiler, steps 6-8 (3)") and "aten::" in table
    assert table.splitlines()[0] in summary

    plain_run = make_run(steps=12, log_every=5, out_dir=str(tmp_path / "plain"))
    plain = Trainer(plain_run, build_activation_source(plain_run))
    plain.train()
    for name, tensor in plain.model.state_dict().items():
        assert profiled.model.state_dict()[name].equal(tensor), name
    assert not (plain.run_dir / "profile").exists()


def test_window_ends_with_the_run_and_a_sweep_profiles_once(make_run):
    """A run shorter than its first metrics window plus the window profiles its last steps; in a sweep only the
    first member's loop runs the profiler (two at once cannot run)."""
    run = make_run(steps=6, log_every=5, profile_steps=4)
    run.sweep = [{"sae.k": 4}, {"sae.k": 8}]
    results = train_from_config(run, eval_batches=1)
    first, second = (result["trainer"].run_dir for result in results)
    assert sorted(p.name for p in (first / "profile").iterdir()) == ["steps_3-6_rank_0.json.gz", "steps_3-6_rank_0.txt"]
    assert not (second / "profile").exists()
