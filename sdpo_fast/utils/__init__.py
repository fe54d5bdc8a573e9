"""Small utilities every layer may use: argument checks and atomic file and directory writes."""
from .checks import check_bool, check_choice, check_int, check_number
from .files import fsync_file, replace_dir, write_text_atomic

__all__ = ["check_bool", "check_choice", "check_int", "check_number", "fsync_file", "replace_dir",
           "write_text_atomic"]
