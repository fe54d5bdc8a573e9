"""`sdpo-fast train` runs each preflight check once (train/preflight.py), before the weights load; counted by
wrapping every check wherever a module of the package holds it."""
from __future__ import annotations

import collections
import sys

import pytest

from sdpo_fast import cli
from sdpo_fast.train import TrainConfig, checkpoint, distributed, preflight, reporting, rundir, setup, trainer

CHECKS = {
    "check_distributed": distributed.check_distributed,
    "open_run_directory": rundir.open_run_directory,
    "check_output_dir": rundir.check_output_dir,
    "check_fresh": rundir.check_fresh,
    "resume_changes": rundir.resume_changes,
    "resolve_checkpoint": rundir.resolve_checkpoint,
    "latest_valid_checkpoint": checkpoint.latest_valid_checkpoint,
    "check_resumable": rundir.check_resumable,
    "check_backends": preflight.check_backends,
    "check_reporters": reporting.check_reporters,
    "check_model_source": setup.check_model_source,
    "load_tokenizer": setup.load_tokenizer,
    "check_tokenizer": preflight.check_tokenizer,
    "load_encoded_data": preflight.load_encoded_data,
    "check_behavior_logprobs": preflight.check_behavior_logprobs,
    "check_memory": preflight.check_memory,
}


@pytest.fixture
def calls(monkeypatch):
    """Counts of each check (and of TrainConfig.validate) over the test. `check_launch` sees the job as rank 0 of
    a torchrun job (so the torchrun check runs) and the job then stays one process; the weights' loading is
    recorded in the same list, to see that every check came before it."""
    counts, order = collections.Counter(), []

    def counted(name, function):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            order.append(name)
            return function(*args, **kwargs)
        return wrapper

    wrappers = {name: counted(name, f) for name, f in CHECKS.items()}
    for module in [m for n, m in sys.modules.items() if n.startswith("sdpo_fast")]:
        for name, function in CHECKS.items():
            if getattr(module, name, None) is function:
                monkeypatch.setattr(module, name, wrappers[name])
    monkeypatch.setattr(TrainConfig, "validate", counted("validate", TrainConfig.validate))
    monkeypatch.setattr(setup, "load_model", counted("load_model", setup.load_model))
    real_launch = preflight.check_launch

    def launch_as_rank_0(config):
        with monkeypatch.context() as inside:
            inside.setattr(preflight, "launched_world", lambda: distributed.World(rank=0, size=2, local_rank=0))
            assert real_launch(config) is not None
        return None

    monkeypatch.setattr(trainer, "check_launch", launch_as_rank_0)
    return counts, order


def _train(model_dir, data_path, out, *flags) -> int:
    return cli.main(["train", "--model", model_dir, "--data", data_path, "--output-dir", str(out), "--batch-size",
                     "2", "--micro-batch-tokens", "256", "--no-progress", *flags])


def test_each_check_runs_once_per_train_before_the_weights_load(tmp_path, model_dir, data_path, calls):
    counts, order = calls
    assert _train(model_dir, data_path, tmp_path / "run", "--max-steps", "1") == 0
    once = {"validate", "check_distributed", "open_run_directory", "check_output_dir", "check_fresh",
            "check_backends", "check_reporters", "check_model_source", "load_tokenizer", "check_tokenizer",
            "load_encoded_data", "check_behavior_logprobs", "check_memory"}
    assert {name: counts[name] for name in once} == dict.fromkeys(once, 1)
    assert counts["resolve_checkpoint"] == counts["check_resumable"] == counts["resume_changes"] == 0
    assert order.index("load_model") > max(order.index(name) for name in once)

    counts.clear()
    order.clear()
    assert _train(model_dir, data_path, tmp_path / "run", "--max-steps", "2", "--resume") == 0
    resumed = once - {"check_fresh"} | {"resume_changes", "resolve_checkpoint", "latest_valid_checkpoint",
                                        "check_resumable"}
    assert {name: counts[name] for name in resumed} == dict.fromkeys(resumed, 1)
    assert counts["check_fresh"] == 0
    assert order.index("load_model") > max(order.index(name) for name in resumed)
