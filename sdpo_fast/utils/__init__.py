"""Small utilities every layer may use: argument checks, atomic file and directory writes, deferred signals."""
from .checks import check_bool, check_choice, check_int, check_number
from .files import DiskError, fsync_file, replace_dir, write_text_atomic
from .signals import Interrupted, deferred_signals

__all__ = ["DiskError", "Interrupted", "check_bool", "check_choice", "check_int", "check_number",
           "deferred_signals", "fsync_file", "replace_dir", "write_text_atomic"]
