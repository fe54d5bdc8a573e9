"""lm-eval's own IFEval scoring, for the local IFEval-format sample (ifeval_local.yaml), imported without
network access: lm-eval's IFEval module asks NLTK to download its punkt_tab data when it is imported (on local
rank 0), but the sample's instructions (no comma, title, keywords, forbidden words, end phrase, quotation,
bullet count) use none of it, so the import runs as a non-zero local rank, which skips the download. Instructions
that count sentences would need punkt_tab (`python -m nltk.downloader punkt_tab`)."""
import os

_rank = os.environ.get("LOCAL_RANK")
os.environ["LOCAL_RANK"] = "1"
try:
    from lm_eval.tasks.ifeval.utils import agg_inst_level_acc, process_results  # noqa: F401
finally:
    if _rank is None:
        del os.environ["LOCAL_RANK"]
    else:
        os.environ["LOCAL_RANK"] = _rank
