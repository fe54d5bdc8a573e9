"""Sub-commands of the `sdpo-fast` CLI (top layer: may import everything below)."""
