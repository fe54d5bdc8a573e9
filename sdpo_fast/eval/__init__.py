"""Before/after evaluation of a trained checkpoint against its base model: lm-evaluation-harness tasks,
pairwise judged win rate, results directory with JSON, a markdown table and a bar chart."""
from .harness import PRIMARY_METRICS, primary_metric, run_lm_eval
from .pairwise import length_controlled_win_rate, pairwise_win_rate
from .results import ResultsDir, markdown_table
from .run import EvalModels, evaluate_checkpoint, load_eval_prompts

__all__ = ["PRIMARY_METRICS", "EvalModels", "ResultsDir", "evaluate_checkpoint", "length_controlled_win_rate",
           "load_eval_prompts", "markdown_table", "pairwise_win_rate", "primary_metric", "run_lm_eval"]
