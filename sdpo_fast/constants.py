"""Constants shared by every layer."""

IGNORE_INDEX = -100
"""Target id of positions that enter no loss (Hugging Face's convention)."""
