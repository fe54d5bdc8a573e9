"""What a run writes: nothing before every option is checked (a top-k above the vocabulary, a YAML option given
twice), never over an earlier run's results (demo), and the resolved config of online and demo runs."""
from __future__ import annotations

import pytest

from sdpo_fast.cli import build_parser, main
from sdpo_fast.train import load_yaml

DEMO = ["demo", "--interactions", "2", "--eval-every", "2", "--eval-prompts", "2", "--update-every", "2",
        "--max-new-tokens", "4"]


def test_demo_keeps_an_earlier_run_and_saves_its_resolved_config(tmp_path, capsys):
    from sdpo_fast.cli.online import online_config
    from sdpo_fast.demo import online_demo_settings
    from sdpo_fast.online.config import resolve_online_config

    out = tmp_path / "demo"
    argv = DEMO + ["--output-dir", str(out), "--lr", "0.003"]
    assert main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert {"win_rate_curve.csv", "win_rate_curve.png", "config.yaml", "adapter_model.safetensors"} <= set(before)
    capsys.readouterr()
    assert main(argv) == 2
    assert "already holds results; pass --overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    expected = online_config(build_parser().parse_args(argv), **online_demo_settings(False))
    saved = (out / "config.yaml").read_text()
    assert resolve_online_config(load_yaml(out / "config.yaml")) == expected and expected.lr == 0.003
    assert "# experiment: curve" in saved and "# interactions: 2" in saved and "# persona: no-emojis" in saved
    assert main(argv + ["--overwrite"]) == 0


def test_an_option_given_twice_in_a_yaml_is_refused(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("distillation-alpha: 0.5\ndistillation_alpha: 0.25\n")
    with pytest.raises(ValueError, match="sets an option twice .distillation_alpha as 'distillation-alpha' and "
                                         "'distillation_alpha'"):
        load_yaml(path)
    path.write_text("lr: 1e-4\nlr: 1e-3\n")
    with pytest.raises(ValueError, match="the key 'lr' appears twice"):
        load_yaml(path)
    out = tmp_path / "run"
    assert main(["train", "--config", str(path), "--output-dir", str(out), "--no-progress"]) == 2
    assert "appears twice" in capsys.readouterr().err and not out.exists()
    assert main(DEMO + ["--config", str(path), "--output-dir", str(out)]) == 2
    assert "appears twice" in capsys.readouterr().err and not out.exists()


def test_topk_above_the_vocabulary_is_refused_before_anything_is_written(tmp_path, capsys, model_dir, data_path):
    out = tmp_path / "run"
    args = ["train", "--model", model_dir, "--data", data_path, "--output-dir", str(out), "--max-steps", "1",
            "--distillation-mode", "topk_logits", "--no-progress"]
    assert main(args + ["--distillation-topk", "10000000"]) == 2
    assert "distillation_topk must be at most the vocabulary size" in capsys.readouterr().err
    assert not out.exists()
    assert main(args + ["--distillation-topk", "5"]) == 0  # the corrected rerun: nothing in the way
    online = tmp_path / "online"
    assert main(["online", "curve", "--interactions", "2", "--eval-every", "2", "--eval-prompts", "2",
                 "--lora-r", "4", "--distillation-mode", "topk_logits", "--distillation-topk", "10000000",
                 "--output-dir", str(online)]) == 2
    assert "distillation_topk must be at most the vocabulary size" in capsys.readouterr().err
    assert not online.exists()


@pytest.mark.parametrize("value", ["nan", "0", "1.5"])
def test_vllm_memory_share_is_checked_before_anything_loads(tmp_path, capsys, value):
    out = tmp_path / "online"
    assert main(["online", "curve", "--generation", "vllm", "--vllm-gpu-memory-utilization", value,
                 "--output-dir", str(out)]) == 2
    assert "--vllm-gpu-memory-utilization must be a number in (0, 1]" in capsys.readouterr().err
    assert not out.exists()
