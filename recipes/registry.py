"""The recipes a study (``ablations.py``, ``factorization_study.py``) can run, by the name its
``--recipe`` option takes: ``gpt2`` (causal LM), ``bert`` (GLUE, encoder classifier) and ``t5``
(GLUE, text-to-text).
"""

from __future__ import annotations

import glue
import mpoe_bert
import mpoe_gpt2
from run_io import RecipeError
from studies import StudyRecipe

STUDY_RECIPES: dict[str, StudyRecipe] = {
    "gpt2": StudyRecipe("gpt2", mpoe_gpt2.main, mpoe_gpt2.study_metrics, "test_perplexity",
                        lower_is_better=True, task="wikitext2"),
    "bert": StudyRecipe("bert", lambda argv: glue.main(argv, default_model=mpoe_bert.default_model()),
                        glue.study_metrics, "test_score"),
    "t5": StudyRecipe("t5", lambda argv: glue.main(argv, default_model="t5-base"),
                      glue.study_metrics, "test_score"),
}


def study_recipe(name: str) -> StudyRecipe:
    """The recipe called ``name``; :class:`RecipeError` for an unknown name."""
    if name not in STUDY_RECIPES:
        raise RecipeError(f"unknown recipe {name!r}; use {', '.join(STUDY_RECIPES)}")
    return STUDY_RECIPES[name]
