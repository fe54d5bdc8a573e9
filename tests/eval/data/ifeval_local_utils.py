"""lm-eval's own IFEval scoring, for the local IFEval-format sample (ifeval_local.yaml)."""
from lm_eval.tasks.ifeval.utils import agg_inst_level_acc, process_results  # noqa: F401
