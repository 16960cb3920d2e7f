"""Evaluation: the paper's Table 1 (methods x clean / corrupted data) for any model, run through
the wrappers. ``methods`` defines each method once (a wrapper factory; the oracles, which need
labels, live there too), ``harness`` runs them, ``report`` summarises."""

from .harness import (GEOMETRIC_CORRUPTIONS, check_methods, corrupted_set, evaluate, evaluate_arrays,
                      evaluate_segmentation, evaluate_segmentation_arrays, measure_cost)
from .methods import (LABELS, METHODS, MODEL_CALLS, PREDICTOR_METHODS, SEG_LABELS, SEG_METHODS, OracleKSegmentationWrapper,
                      OracleKWrapper, ViewMemo, build_method)
from .report import markdown_table, plot_scatter, plot_selection_rates, segmentation_markdown_table, summarize

__all__ = ["GEOMETRIC_CORRUPTIONS", "LABELS", "METHODS", "MODEL_CALLS", "PREDICTOR_METHODS", "SEG_LABELS",
           "SEG_METHODS", "OracleKSegmentationWrapper", "OracleKWrapper", "ViewMemo", "build_method", "check_methods",
           "corrupted_set", "evaluate", "evaluate_arrays", "evaluate_segmentation", "evaluate_segmentation_arrays",
           "markdown_table", "measure_cost", "plot_scatter", "plot_selection_rates", "segmentation_markdown_table",
           "summarize"]
