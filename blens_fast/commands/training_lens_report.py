"""Redraw a training lens's timelines: timeline_<module>.png and timeline_<module>.html for every module.

DIR is the out= folder of a TrainingLens (bl.training_lens) or of bl.integrations.BackwardLensCallback; the drawings
go into DIR, or into --out. Prints the gradient's summary per module over the sampled steps.
Example: blens training-lens-report out/tlens
"""
from __future__ import annotations

OUT_HELP = "folder for the timelines (default: DIR itself)"
MODEL_HELP = "unused: the folder holds everything the report needs"


def add_arguments(parser) -> None:
    parser.add_argument("directory", metavar="DIR", help="the training lens's out= folder")


def run(args) -> int:
    from ..training import read_training_lens
    from ..training_report import summary_table, write_timelines

    steps = read_training_lens(args.directory, "steps")
    written = write_timelines(args.directory, args.out)
    print(summary_table(steps))
    print("\nwrote " + ", ".join(str(p) for p in written.values()))
    return 0
