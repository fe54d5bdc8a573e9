"""Drop-ins that make other trainers compute their loss through `sdpo_loss` (import the submodule you need)."""
