"""GLUE tasks: their columns and labels, loading (local GLUE folders or the hub) with the paper's
split protocol, and their metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from run_io import RecipeError


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task: where its data lives, its text columns and labels, its headline metric."""

    name: str            # our key
    hub_name: str        # datasets "glue" config
    folder: str          # local GLUE folder name
    text_keys: tuple[str, ...]
    num_labels: int      # 1 = regression
    label_words: tuple[str, ...] = ()  # T5 text-to-text targets by label id
    main_metric: str = "accuracy"


GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("cola", "cola", "CoLA", ("sentence",), 2, ("unacceptable", "acceptable"), "matthews"),
    "rte": GlueTask("rte", "rte", "RTE", ("sentence1", "sentence2"), 2, ("entailment", "not_entailment")),
    "mrpc": GlueTask("mrpc", "mrpc", "MRPC", ("sentence1", "sentence2"), 2, ("not_equivalent", "equivalent")),
    "stsb": GlueTask("stsb", "stsb", "STS-B", ("sentence1", "sentence2"), 1, (), "pearson"),
    "sst2": GlueTask("sst2", "sst2", "SST-2", ("sentence",), 2, ("negative", "positive")),
    "qnli": GlueTask("qnli", "qnli", "QNLI", ("question", "sentence"), 2, ("entailment", "not_entailment")),
    "mnli": GlueTask("mnli", "mnli", "MNLI", ("premise", "hypothesis"), 3,
                     ("entailment", "neutral", "contradiction")),
    "qqp": GlueTask("qqp", "qqp", "QQP", ("question1", "question2"), 2, ("not_duplicate", "duplicate")),
}


def get_task(name: str) -> GlueTask:
    """The task called ``name`` (case and '-' ignored: ``STS-B`` = ``stsb``)."""
    key = name.lower().replace("-", "")
    if key not in GLUE_TASKS:
        raise RecipeError(f"unknown GLUE task {name!r}; known: {', '.join(sorted(GLUE_TASKS))}")
    return GLUE_TASKS[key]


def _read_tsv(path: Path, task: GlueTask) -> list[dict]:
    """Rows of a GLUE ``.tsv`` as ``{text_key: str, ..., "label": int | float}``."""
    rows = []
    with open(path, newline="", encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    if task.name == "cola":  # no header: source, label, mark, sentence
        for ln in lines:
            parts = ln.split("\t")
            if len(parts) >= 4:
                rows.append({"sentence": parts[3], "label": int(parts[1])})
        return rows
    header = lines[0].split("\t")
    col = {h: i for i, h in enumerate(header)}
    for ln in lines[1:]:
        p = ln.split("\t")
        if len(p) < len(header) - 1:
            continue
        if task.name == "mrpc":
            rows.append({"sentence1": p[col["#1 String"]], "sentence2": p[col["#2 String"]], "label": int(p[0])})
        elif task.name == "stsb":
            rows.append({"sentence1": p[col["sentence1"]], "sentence2": p[col["sentence2"]], "label": float(p[-1])})
        else:
            label = p[col["label"]] if "label" in col else p[-1]
            rec = {k: p[col[k]] for k in task.text_keys}
            rec["label"] = task.label_words.index(label) if label in task.label_words else int(label)
            rows.append(rec)
    return rows


#: the paper protocol: tasks with at least this many training rows are "large" (SST-2, QNLI, QQP,
#: MNLI) and select models on :data:`HELD_OUT_ROWS` training rows instead of half the dev set
LARGE_TASK_ROWS = 10_000
HELD_OUT_ROWS = 1_000


def load_glue(task: GlueTask, data_dir: str | None, *, max_train: int | None = None,
              max_eval: int | None = None, split_protocol: str = "paper", seed: int = 42):
    """``(train, validation, test)`` as ``datasets.Dataset``.

    ``data_dir``: a local GLUE folder (``<data_dir>/<Task>/{train,dev}.tsv``); ``None`` loads
    ``glue/<task>`` from the hub with ``datasets``. ``split_protocol="paper"`` (MPOE, after
    Mahabadi et al. 2021): a task with fewer than :data:`LARGE_TASK_ROWS` training rows has its
    dev set shuffled (seeded) and halved, one half for model selection, the other as test; a
    larger task holds out :data:`HELD_OUT_ROWS` shuffled training rows (not trained on) for
    model selection and tests on the whole dev set. ``"dev"``: dev is both validation and test.
    ``max_train`` caps the training rows after the split. Dev rows carry ``dev_index``, their row
    in the dev set.
    """
    import datasets

    if data_dir is not None:
        folder = Path(data_dir) / task.folder
        if not (folder / "train.tsv").is_file() or not (folder / "dev.tsv").is_file():
            raise RecipeError(f"missing {folder}/train.tsv or dev.tsv (expected the GLUE folder layout)")
        train = datasets.Dataset.from_list(_read_tsv(folder / "train.tsv", task))
        dev = datasets.Dataset.from_list(_read_tsv(folder / "dev.tsv", task))
    else:
        ds = datasets.load_dataset("glue", task.hub_name)
        train = ds["train"]
        dev = ds["validation_matched" if task.name == "mnli" else "validation"]
    if split_protocol not in ("paper", "dev"):
        raise RecipeError(f"split protocol must be 'paper' or 'dev', got {split_protocol!r}")
    train = train.shuffle(seed=seed)
    if "dev_index" not in dev.column_names:  # the row's place in the dev set, to pair outputs across seeds
        dev = dev.add_column("dev_index", list(range(len(dev))))
    dev = dev.shuffle(seed=seed)
    if split_protocol == "dev":
        val = test = dev
    elif len(train) < LARGE_TASK_ROWS:
        half = len(dev) // 2
        val, test = dev.select(range(half)), dev.select(range(half, len(dev)))
    else:
        val, train, test = train.select(range(HELD_OUT_ROWS)), train.select(range(HELD_OUT_ROWS, len(train))), dev
    if max_train:
        train = train.select(range(min(max_train, len(train))))
    if max_eval:
        val = val.select(range(min(max_eval, len(val))))
        test = test.select(range(min(max_eval, len(test))))
    return train, val, test


def glue_metrics(task: GlueTask, preds, labels) -> dict[str, float]:
    """Accuracy, F1 (MRPC/QQP), Matthews (CoLA), Pearson/Spearman (STS-B); 'score' = main metric.

    ``preds``/``labels``: ``(n,)`` class ids (-1, an unparseable answer, counts as wrong), or
    scores for regression (non-finite predictions count as 0).
    """
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    preds, labels = np.asarray(preds), np.asarray(labels)
    if task.num_labels == 1:
        ok = np.isfinite(preds)
        p = np.where(ok, preds, 0.0)
        out = {"pearson": float(pearsonr(p, labels)[0]) if np.std(p) > 0 else 0.0,
               "spearman": float(spearmanr(p, labels)[0]) if np.std(p) > 0 else 0.0}
    else:
        # an unparseable text-to-text answer (-1) is wrong: scored as the next class after the label
        preds = np.where(preds < 0, (labels + 1) % max(task.num_labels, 2), preds)
        out = {"accuracy": float(accuracy_score(labels, preds))}
        if task.name in ("mrpc", "qqp"):
            out["f1"] = float(f1_score(labels, preds, zero_division=0))
        if task.name == "cola":
            out["matthews"] = float(matthews_corrcoef(labels, preds))
    out["score"] = out[task.main_metric]
    return out
