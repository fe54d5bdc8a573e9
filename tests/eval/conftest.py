import pytest
import torch

from sdpo_fast.demo.assets import tiny_model_path
from sdpo_fast.train.setup import load_model, load_tokenizer


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A full checkpoint dir laid out like `sdpo-fast train`'s (run/config.yaml with model: null, i.e. the
    bundled tiny model as base; run/checkpoint-1 = the tiny model with perturbed weights)."""
    run = tmp_path_factory.mktemp("run")
    (run / "config.yaml").write_text("model: null\n")
    model = load_model(str(tiny_model_path()), dtype=torch.float32, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3 * p.std().clamp_min(1e-3))
    model.save_pretrained(run / "checkpoint-1")
    load_tokenizer(str(tiny_model_path())).save_pretrained(run / "checkpoint-1")
    return run / "checkpoint-1"
