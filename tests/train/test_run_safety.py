"""Crash safety of the offline trainer (in process): checkpoint integrity and fallback, a full disk, rotation,
time-based saves, resume with changed options, resume of a run that has no checkpoint, checks before weights."""
from __future__ import annotations

import errno
import io
import json
import os
from pathlib import Path

import pytest

from helpers import copy_model
import torch
from safetensors.torch import load_file

from sdpo_fast import cli
from sdpo_fast.train import TrainConfig, train
from sdpo_fast.train import checkpoint as checkpoint_module
from sdpo_fast.train import rundir, setup, trainer as trainer_module
from sdpo_fast.train.checkpoint import checkpoint_dirs, checkpoint_problem, rotate_checkpoints
from sdpo_fast.utils import files


def _config(model_dir, data_path, out, **options) -> TrainConfig:
    base = dict(model=model_dir, data=data_path, output_dir=str(out), batch_size=2, max_steps=4, lr=1e-3,
                micro_batch_tokens=256, seed=7)
    return TrainConfig(**{**base, **options})


@pytest.fixture(scope="module")
def whole(tmp_path_factory, model_dir, data_path) -> Path:
    """The last checkpoint of an uninterrupted 4-step run."""
    summary = train(_config(model_dir, data_path, tmp_path_factory.mktemp("whole") / "run"), progress=False,
                    log=lambda m: None)
    return Path(summary["checkpoint"])


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and wa
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def _steps(out: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in checkpoint_dirs(out)]


@pytest.mark.parametrize("victim", ["model.safetensors", "trainer_state.pt"])
def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, model_dir, data_path, whole, victim):
    out = tmp_path / "run"
    train(_config(model_dir, data_path, out, save_steps=1), progress=False, stop_after=3, log=lambda m: None)
    assert _steps(out) == [1, 2, 3]
    path = out / "checkpoint-3" / victim
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert victim in checkpoint_problem(out / "checkpoint-3")
    notes = []
    summary = train(_config(model_dir, data_path, out, save_steps=1, resume=True), progress=False, log=notes.append)
    assert any("checkpoint-3" in n and victim in n for n in notes), notes
    assert any("resuming from" in n and "checkpoint-2" in n for n in notes), notes
    assert summary["steps"] == 4 and (out / "checkpoint-3.corrupt").is_dir()
    _assert_same_weights(whole, out / "checkpoint-4")
    start = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "event" in line]
    assert start[-1]["resumed_from"].endswith("checkpoint-2")


def test_altered_file_of_same_size_is_caught_by_the_hash(tmp_path, model_dir, data_path):
    out = tmp_path / "run"
    train(_config(model_dir, data_path, out, max_steps=1), progress=False, log=lambda m: None)
    path = out / "checkpoint-1" / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    assert "hash" in checkpoint_problem(out / "checkpoint-1")
    assert checkpoint_problem(out / "checkpoint-1").startswith("model.safetensors")


class _FullDisk(io.RawIOBase):
    """A file that takes `room` bytes, then fails as a full disk does."""

    def __init__(self, path, room: int):
        self._f, self._room = open(path, "wb"), room

    def writable(self):
        return True

    def write(self, data):
        if len(data) > self._room:
            self._f.write(bytes(data[: self._room]))
            self._room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._f.write(data)

    def close(self):
        self._f.close()
        super().close()


def _full_disk_after(room: int):
    """An `open` whose files opened for writing hold `room` bytes."""
    return lambda path, mode="r": _FullDisk(path, room) if "w" in mode else open(path, mode)


def test_full_disk_at_a_save_is_one_line_and_leaves_nothing_half_written(tmp_path, model_dir, data_path,
                                                                          monkeypatch, whole):
    out = tmp_path / "run"
    train(_config(model_dir, data_path, out, save_steps=2), progress=False, stop_after=2, log=lambda m: None)
    monkeypatch.setattr(checkpoint_module, "open", _full_disk_after(1000), raising=False)
    with pytest.raises(files.DiskError) as err:
        train(_config(model_dir, data_path, out, save_steps=2, resume=True), progress=False, log=lambda m: None)
    assert str(err.value).startswith("disk full at") and "checkpoint-4" in str(err.value)
    assert "\n" not in str(err.value)
    assert _steps(out) == [2] and not [p for p in out.iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    assert train(_config(model_dir, data_path, out, save_steps=2, resume=True), progress=False,
                 log=lambda m: None)["steps"] == 4
    _assert_same_weights(whole, out / "checkpoint-4")


def test_full_disk_in_the_cli_is_one_line(tmp_path, model_dir, data_path, monkeypatch, capsys):
    monkeypatch.setattr(checkpoint_module, "open", _full_disk_after(0), raising=False)
    out = tmp_path / "run"
    assert cli.main(["train", "--model", model_dir, "--data", data_path, "--output-dir", str(out), "--max-steps",
                     "1", "--batch-size", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("sdpo-fast train: error: disk full at") and "checkpoint-1" in err[-1]


@pytest.mark.parametrize("code,message", [(errno.ENOSPC, "disk full at"), (errno.EROFS, "read-only file system"),
                                          (errno.EACCES, "permission denied")])
def test_write_text_atomic_disk_errors_keep_the_old_file(tmp_path, monkeypatch, code, message):
    target = tmp_path / "config.yaml"
    target.write_text("old")
    real = files.os.fdopen

    def failing(fd, *args, **kwargs):
        f = real(fd, *args, **kwargs)

        def write(_):
            raise OSError(code, os.strerror(code))

        f.write = write
        return f

    monkeypatch.setattr(files.os, "fdopen", failing)
    with pytest.raises(files.DiskError, match=message):
        files.write_text_atomic(target, "new")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["config.yaml"]


def test_disk_errors_reported_without_errno_are_mapped():
    rust = RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                        "\"No space left on device\" })")
    torch_save = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    for exc in (rust, torch_save):
        assert str(files.disk_error(exc, "/x/checkpoint-3")).startswith("disk full")
    assert files.disk_error(RuntimeError("shape mismatch"), "/x") is None


def test_save_minutes_and_save_total_limit(tmp_path, model_dir, data_path):
    out = tmp_path / "run"
    train(_config(model_dir, data_path, out, save_minutes=1e-9, save_total_limit=2), progress=False,
          log=lambda m: None)
    assert _steps(out) == [3, 4]
    out2 = tmp_path / "run2"
    train(_config(model_dir, data_path, out2, max_steps=2, save_minutes=1e-9), progress=False, log=lambda m: None)
    assert _steps(out2) == [1, 2]


def test_rotation_never_deletes_the_newest(tmp_path):
    for step in (1, 5, 12):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.pt").write_bytes(b"x")
    assert [p.name for p in rotate_checkpoints(tmp_path, 1, tmp_path / "checkpoint-12")] == ["checkpoint-1",
                                                                                              "checkpoint-5"]
    assert _steps(tmp_path) == [12]
    assert rotate_checkpoints(tmp_path, 1, tmp_path / "checkpoint-12") == []


def test_resume_applies_changeable_options_and_records_them(tmp_path, model_dir, data_path):
    new_lr = 5e-3
    reference = tmp_path / "reference"
    train(_config(model_dir, data_path, reference, lr=new_lr, max_steps=5), progress=False, log=lambda m: None)
    out = tmp_path / "run"
    train(_config(model_dir, data_path, out, save_steps=2), progress=False, stop_after=2, log=lambda m: None)
    notes = []
    summary = train(_config(model_dir, data_path, out, save_steps=2, resume=True, lr=new_lr, max_steps=5),
                    progress=False, log=notes.append)
    assert summary["steps"] == 5 and summary["changed"] == {"lr": [1e-3, new_lr], "max_steps": [4, 5]}
    steps = {json.loads(line)["step"]: json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
             if "event" not in line}
    expected = {json.loads(line)["step"]: json.loads(line)["lr"]
                for line in (reference / "metrics.jsonl").read_text().splitlines() if "event" not in line}
    assert [steps[s]["lr"] for s in (3, 4, 5)] == [expected[s] for s in (3, 4, 5)]
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "event" in line]
    assert events[-1]["changed"] == {"lr": [1e-3, new_lr], "max_steps": [4, 5]} and events[-1]["step"] == 2
    history = [json.loads(line) for line in (out / "config_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [0, 2] and history[1]["changed"]["lr"] == [1e-3, new_lr]
    assert any("lr 0.001 -> 0.005" in n for n in notes)


def test_resume_refuses_fixed_options_listing_them(tmp_path, model_dir, data_path, monkeypatch):
    out = tmp_path / "run"
    train(_config(model_dir, data_path, out, save_steps=2), progress=False, stop_after=2, log=lambda m: None)
    monkeypatch.setattr(setup, "load_model", _no_weights)
    with pytest.raises(ValueError) as err:
        train(_config(model_dir, data_path, out, resume=True, seed=8, batch_size=3), progress=False)
    assert "cannot change" in str(err.value) and "seed: 7 in the run, 8 now" in str(err.value)
    assert "batch_size: 2 in the run, 3 now" in str(err.value)


def test_every_option_is_classified_for_resume():
    documented = set(rundir.CHANGEABLE_ON_RESUME) | set(rundir.NOT_COMPARED_ON_RESUME)
    assert documented <= {f for f in TrainConfig().to_dict()}


def test_resume_of_a_run_without_checkpoint_starts_from_step_0(tmp_path, model_dir, data_path, whole):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9}\n{"step": 2, "lo')
    notes = []
    summary = train(_config(model_dir, data_path, out, resume=True), progress=False, log=notes.append)
    assert summary["steps"] == 4 and any("starting from step 0" in n for n in notes)
    _assert_same_weights(whole, out / "checkpoint-4")
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "event" not in line] == [1, 2, 3, 4]


def _no_weights(*args, **kwargs):
    raise AssertionError("weights were loaded before the check")


@pytest.mark.parametrize("case,message", [
    ("file", "is a file"),
    ("under-file", "is under the file"),
    ("read-only", "read-only file system"),
    ("not-empty", "is not empty"),
    ("resume-missing", "does not exist, so there is no checkpoint"),
    ("triton-on-cpu", "loss_backend 'triton' cannot run on cpu"),
    ("flash-missing", "attn_backend='flash' needs the flash-attn package"),
])
def test_output_dir_and_backend_problems_fail_before_weights_load(tmp_path, model_dir, data_path, monkeypatch,
                                                                  case, message):
    monkeypatch.setattr(setup, "load_model", _no_weights)
    out, options = tmp_path / "out", {}
    if case == "file":
        out.write_text("x")
    elif case == "under-file":
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "run"
    elif case == "read-only":
        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

        monkeypatch.setattr(rundir.tempfile, "TemporaryFile", read_only)
    elif case == "not-empty":
        out.mkdir()
        (out / "x").write_text("x")
    elif case == "resume-missing":
        options["resume"] = True
    elif case == "triton-on-cpu":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        options["loss_backend"] = "triton"
    elif case == "flash-missing":
        pytest.importorskip("torch")
        if __import__("importlib").util.find_spec("flash_attn") is not None:
            pytest.skip("flash-attn is installed here")
        options["attn_backend"] = "flash"
    with pytest.raises(ValueError) as err:
        train(_config(model_dir, data_path, out, **options), progress=False)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_non_finite_loss_stops_the_run(tmp_path, model_dir, data_path, monkeypatch):
    real = trainer_module.train_step

    def nan_step(*args, **kwargs):
        stats = real(*args, **kwargs)
        return type(stats)(**{**stats.__dict__, "loss": float("nan")})

    monkeypatch.setattr(trainer_module, "train_step", nan_step)
    with pytest.raises(ValueError, match="the loss is nan at step 1"):
        train(_config(model_dir, data_path, tmp_path / "run"), progress=False, log=lambda m: None)


@pytest.mark.parametrize("case,message", [
    ("no-tokenizer", "has no tokenizer files"),
    ("pickle-weights", "only pytorch_model.bin: pickle weights are not loaded"),
    ("no-config", "has no config.json"),
    ("template-drops-content", "cannot round-trip the chat template"),
])
def test_model_dir_problems_fail_before_weights_load(tmp_path, model_dir, data_path, monkeypatch, case, message):
    monkeypatch.setattr(setup, "load_model", _no_weights)
    model = {
        "no-tokenizer": lambda: copy_model(model_dir, tmp_path / "model", drop=["tokenizer.json"]),
        "pickle-weights": lambda: copy_model(model_dir, tmp_path / "model", drop=["model.safetensors"],
                                              add={"pytorch_model.bin": "x"}),
        "no-config": lambda: copy_model(model_dir, tmp_path / "model", drop=["config.json"]),
        "template-drops-content": lambda: copy_model(model_dir, tmp_path / "model",
                                                      add={"chat_template.jinja": "<|im_start|>assistant\n"}),
    }[case]()
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        train(_config(model, data_path, tmp_path / "out"), progress=False)
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()


def test_check_model_source_names_a_mistyped_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("./runs/my-model", "../my-model", "models/a/b", "~/nope"):
        with pytest.raises(FileNotFoundError, match="no such local directory"):
            setup.check_model_source(name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="no such local directory, and HF_HUB_OFFLINE is set"):
        setup.check_model_source("runs/my-model")


def test_data_counts_are_logged_and_returned(tmp_path, model_dir, data_path):
    data = tmp_path / "mixed.jsonl"
    data.write_text(Path(data_path).read_text() + "not json\n" + json.dumps({"messages": "x"}) + "\n")
    notes = []
    summary = train(_config(model_dir, str(data), tmp_path / "out", max_steps=1), progress=False, log=notes.append)
    counts = summary["data"]
    assert counts["rows"] == 7 and counts["encoded"] == 5 and counts["bad_rows"] == 2
    assert counts["skipped"] == {"invalid_json": 1, "conversation_not_a_list": 1}
    assert counts["first_bad_rows"] == [f"{data}:6: invalid_json", f"{data}:7: conversation_not_a_list"]
    assert any(n.startswith("data: 7 rows read") and "invalid_json 1" in n for n in notes)
    event = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert event["event"] == "start" and event["data"] == counts


def test_ctrl_c_outside_the_loop_is_one_line_exit_130(monkeypatch, capsys):
    from sdpo_fast.cli import train as train_cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_cli, "run", interrupted)
    assert cli.main(["train", "--no-progress"]) == 130
    assert capsys.readouterr().err == "sdpo-fast train: interrupted\n"


def test_sigterm_outside_the_loop_is_one_line_exit_143(monkeypatch, capsys):
    import signal

    from sdpo_fast.cli import train as train_cli

    monkeypatch.setattr(train_cli, "run", lambda args: os.kill(os.getpid(), signal.SIGTERM))
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["train", "--no-progress"]) == 143
    assert capsys.readouterr().err == "sdpo-fast train: terminated by SIGTERM\n"
    assert signal.getsignal(signal.SIGTERM) is before


def test_truncated_model_weights_are_one_line(tmp_path, model_dir, data_path):
    model = copy_model(model_dir, tmp_path / "model")
    weights = Path(model) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="could not load model .*: Error while deserializing header"):
        train(_config(model, data_path, tmp_path / "out"), progress=False, log=lambda m: None)


def test_binary_yaml_config_names_the_file(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\xff\xfe\x00binary")
    assert cli.main(["train", "--config", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "not UTF-8 text" in err


def test_resume_when_every_checkpoint_is_broken_starts_over_and_sets_them_aside(tmp_path, model_dir, data_path,
                                                                                  whole):
    out = tmp_path / "run"
    train(_config(model_dir, data_path, out, save_steps=1), progress=False, stop_after=2, log=lambda m: None)
    for step in (1, 2):
        (out / f"checkpoint-{step}" / "manifest.json").unlink()
    notes = []
    train(_config(model_dir, data_path, out, save_steps=1, resume=True), progress=False, log=notes.append)
    assert sum("no readable manifest.json" in n for n in notes) == 2
    assert any("starting from step 0" in n for n in notes)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-1.corrupt",
                                                               "checkpoint-2", "checkpoint-2.corrupt",
                                                               "checkpoint-3", "checkpoint-4"]
    _assert_same_weights(whole, out / "checkpoint-4")


def test_full_disk_while_logging_metrics_is_one_line(tmp_path, model_dir, data_path, monkeypatch):
    class FullMetrics(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "run" / "metrics.jsonl"))

    monkeypatch.setattr(trainer_module, "open", lambda path, mode="r": FullMetrics(), raising=False)
    with pytest.raises(files.DiskError, match=r"^disk full at '.*metrics.jsonl'"):
        train(_config(model_dir, data_path, tmp_path / "run"), progress=False, log=lambda m: None)


def test_resume_with_changed_data_contents_is_refused(tmp_path, model_dir, data_path):
    data = tmp_path / "rows.jsonl"
    data.write_text(Path(data_path).read_text())
    out = tmp_path / "run"
    train(_config(model_dir, str(data), out, save_steps=2), progress=False, stop_after=2, log=lambda m: None)
    data.write_text("".join(Path(data_path).read_text().splitlines(keepends=True)[:3]))
    with pytest.raises(ValueError, match="num_interactions: 5 in the checkpoint, 3 now"):
        train(_config(model_dir, str(data), out, resume=True), progress=False, log=lambda m: None)
