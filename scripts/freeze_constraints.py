"""Print a pip constraints file pinning every installed distribution of this environment (stdout).

Run in the venv where the test suite just passed: `python scripts/freeze_constraints.py > constraints.txt`.
torch is left out (the set-up commands pin it, and a GPU machine brings its own CUDA build), as are sdpo_fast
itself and pip's own tooling.
"""
from __future__ import annotations

import importlib.metadata
import platform
import re

SKIP = {"torch", "sdpo-fast", "pip", "setuptools", "wheel"}


def main() -> None:
    pins = {}
    for dist in importlib.metadata.distributions():
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
        if name not in SKIP:
            pins[name] = dist.version.split("+")[0]
    print(f"# Exact versions of the last green CI (Python {platform.python_version()}); "
          "refresh with scripts/freeze_constraints.py")
    for name in sorted(pins):
        print(f"{name}=={pins[name]}")


if __name__ == "__main__":
    main()
