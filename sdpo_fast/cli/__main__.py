"""`python -m sdpo_fast.cli`: the `sdpo-fast` command."""
import sys

from . import main

sys.exit(main())
