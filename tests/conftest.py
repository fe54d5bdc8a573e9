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

from hypothesis import settings  # noqa: E402

# Property tests draw the same examples on every run (reproducible CI); explore with --hypothesis-seed=N.
settings.register_profile("deterministic", derandomize=True)
settings.load_profile("deterministic")
