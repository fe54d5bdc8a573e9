import os

import torch

# Triton decides whether kernels are interpreted when it is imported and when kernels are decorated, so the
# flag is set, and triton imported, before any test can change the environment.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
try:
    import triton  # noqa: F401
except ImportError:
    pass

import contextlib  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

import sdpo_fast  # noqa: E402
import sdpo_fast.kernels.config  # noqa: E402

# Under pytest-xdist (the README's `-n 2`) the workers share the cores: each takes its share of torch's threads, and
# the processes tests start (torchrun, `serve run`) inherit the same share.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    torch.set_num_threads(_THREADS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))

# Property tests draw the same examples on every run (reproducible CI); explore with --hypothesis-seed=N.
settings.register_profile("deterministic", derandomize=True)
settings.load_profile("deterministic")


# Our code: the package and the kernels folder it links to.
OWN_CODE = tuple({str(Path(m.__file__).resolve().parent) for m in (sdpo_fast, sdpo_fast.kernels.config)})
# A deprecated API warns in its own frame (or in a thin wrapper: a property, a deprecate_kwarg decorator): the call
# is ours when that frame or its caller is in our code.
CALLER_DEPTH = 1


def _raised_from_own_code() -> bool:
    frame = sys._getframe(2)  # past this function and the showwarning hook
    while frame is not None and frame.f_code.co_filename == warnings.__file__:
        frame = frame.f_back
    if frame is None or "/triton/" in frame.f_code.co_filename:
        return False  # Triton's interpreter running our kernels: its own calls (numpy's deprecations), not ours
    for _ in range(CALLER_DEPTH + 1):
        if frame is None:
            return False
        if str(Path(frame.f_code.co_filename).resolve()).startswith(OWN_CODE):
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def _fail_on_own_deprecations():
    """Fail when sdpo_fast's own calls raise a DeprecationWarning or FutureWarning (the API we call is going away:
    use its replacement, feature-detected so that the oldest supported releases keep working)."""
    raised = []
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, (DeprecationWarning, FutureWarning)) and _raised_from_own_code():
            raised.append(f"{category.__name__} at {filename}:{lineno}: {message}")
        impl = getattr(warnings, "_showwarnmsg_impl", None)
        if shown is getattr(warnings, "_showwarning_orig", None) and impl is not None:
            impl(warnings.WarningMessage(message, category, filename, lineno, file, line))
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown
    if raised:
        pytest.fail("sdpo_fast calls a deprecated API:\n" + "\n".join(raised), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    with _fail_on_own_deprecations():
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    with _fail_on_own_deprecations():
        return (yield)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    """A saved tiny random Qwen3 (context-sensitive init) and its chat tokenizer, as a local model directory."""
    from sdpo_fast.testing import tiny_causal_lm, tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny-model")
    tiny_causal_lm("qwen3", initializer_range=0.2, seed=3).save_pretrained(path)
    tiny_tokenizer("qwen3").save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def data_path(tmp_path_factory) -> str:
    """The first five rows of the shipped synthetic sample, as a JSONL file."""
    from sdpo_fast.data import sample_path

    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    path.write_text("".join(sample_path().read_text().splitlines(keepends=True)[:5]))
    return str(path)
