"""CounterFact: the records (:mod:`.records`), the editing harness that edits, scores and reverts each one
(:mod:`.harness`), calibration of edit settings (:mod:`.calibrate`) and trade-off sweeps and result tables
(:mod:`.tradeoff`)."""
from .calibrate import calibrate
from .harness import evaluate_counterfact
from .records import fact_queries, fact_texts, load
from .tradeoff import last_layer_sweep, run_tradeoff, sweep, write_results

__all__ = ["calibrate", "evaluate_counterfact", "fact_queries", "fact_texts", "last_layer_sweep", "load",
           "run_tradeoff", "sweep", "write_results"]
