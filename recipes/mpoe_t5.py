"""MPOE on T5 for GLUE in text-to-text form (MPOE Tables 1-2). See ``recipes/glue.py``.

    python recipes/mpoe_t5.py --model t5-base --task rte --variant mpoe --output-dir runs/t5-rte-mpoe
    python recipes/mpoe_t5.py --task rte,mrpc,cola,stsb --variant mpoe++ --output-dir runs/t5-multi  # multi-task
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from glue import main  # noqa: E402
from run_io import run_main  # noqa: E402

if __name__ == "__main__":
    run_main(lambda: main(default_model="t5-base"))
