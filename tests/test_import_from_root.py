"""Python started in the repository root imports Hugging Face's installed `kernels`, never the top-level
`kernels/` folder (Triton code shipped as `sdpo_fast.kernels`): transformers >= 5.25 imports `kernels` while
`transformers.modeling_utils` loads, and a regular package in the root would shadow it."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)


def _installed_kernels() -> str | None:
    """The file of the `kernels` package this interpreter finds outside the repository root, if any."""
    paths = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    spec = importlib.machinery.PathFinder.find_spec("kernels", paths)
    return spec.origin if spec is not None and spec.origin not in (None, "namespace") else None


def test_installed_kernels_wins_in_the_root(tmp_path):
    """From the root, `import kernels` is the installed regular package (Hugging Face's, or a stand-in placed
    after the root on sys.path where it is not installed), and `sdpo_fast.kernels` is still ours."""
    env = dict(os.environ)
    expected = _installed_kernels()
    if expected is None:
        stand_in = tmp_path / "site" / "kernels"
        stand_in.mkdir(parents=True)
        (stand_in / "__init__.py").write_text("CUDAProperties = object\n")
        expected = str(stand_in / "__init__.py")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(stand_in.parent)]))
    result = _run(["-c", "import kernels, sdpo_fast.kernels.config as c; print(kernels.__file__); print(c.__file__)"],
                  env=env)
    assert result.returncode == 0, result.stderr
    kernels_file, ours = result.stdout.split()
    assert Path(kernels_file).resolve() == Path(expected).resolve()
    assert Path(ours).resolve() == ROOT / "kernels" / "config.py"


@pytest.mark.parametrize("args", [
    ["-c", "import transformers.modeling_utils, sdpo_fast"],
    ["-m", "sdpo_fast.cli", "--help"],
    ["-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
], ids=["import", "cli-help", "collect"])
def test_python_in_the_root_imports(args):
    result = _run(args)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert not re.search(r"ImportError|ModuleNotFoundError|\d+ errors?\b", output), output[-3000:]
