"""The Backward Lens over a whole dataset: streaming, resumable, verified, split across ``torchrun`` ranks.

:func:`project_dataset` reads records (prompt, target, optional id) and writes long-format Parquet rows, shard by
shard, with its settings as keywords or one :class:`RunOptions`; :func:`read_results` gives them back. The pipeline:
:mod:`.records` (input and validation), :mod:`.rows` (the Arrow tables), :mod:`.shards` (the output folder: commits,
digests, manifest, lock, the plan), :mod:`.run` (the run options and spec, the capture/commit loop, ranks, the final
merge), :mod:`.results` (reading back).
"""
from .records import BadRecord
from .results import read_results
from .run import RunOptions, project_dataset
from .shards import InjectedFault

__all__ = ["BadRecord", "InjectedFault", "RunOptions", "project_dataset", "read_results"]
