"""``blens bench``: the Backward Lens the naive way (:mod:`blens_fast.lens_reference`) and with blens_fast, on the
same prompts, checked against each other, with time and peak memory per stage: :mod:`.run` (models, prompts, the
two ways, agreement), :mod:`.meter` (time and memory), :mod:`.report` (JSON, markdown, plot)."""
from .run import MODEL_SPECS, BenchConfig, run_bench

__all__ = ["MODEL_SPECS", "BenchConfig", "run_bench"]
