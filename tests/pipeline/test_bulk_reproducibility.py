"""project_dataset on the C++ path writes the same rows, bit for bit, whatever the thread count, given the same
captured vectors. The capture itself (torch's forward and backward) is not ours to make reproducible across thread
counts (README, "Reproducibility"), so both runs capture on one thread; everything after the capture -- the
projection, the ranks, the probabilities, the gradient ranks and norms -- runs on 1 and on 3 threads."""
import pandas as pd
import pytest

import blens_fast.bulk.run
from blens_fast.bulk import project_dataset, read_results
from blens_fast.context import load_model
from tests.helpers import threads

FACTS = [("The mother tongue of Danielle Darrieux is", "French"), ("The capital of France is", "Paris"),
         ("Toyota was founded in", "Japan"), ("Mozart was born in", "Salzburg"), ("A cat is an", "animal")]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return load_model(str(tiny_checkpoint))


def test_rows_from_the_same_vectors_do_not_depend_on_the_thread_count(tmp_path, tiny, monkeypatch):
    capture_examples = blens_fast.bulk.run.capture_examples

    def capture_on_one_thread(*args, **kwargs):
        with threads(1):
            return capture_examples(*args, **kwargs)

    monkeypatch.setattr(blens_fast.bulk.run, "capture_examples", capture_on_one_thread)
    records = [{"id": f"r{i}", "prompt": prompt, "target": target} for i, (prompt, target) in enumerate(FACTS)]
    frames = {}
    for n_threads in (1, 3):
        with threads(n_threads):
            out = project_dataset(tiny, records, tmp_path / f"threads{n_threads}", k=7, batch_size=3, impl="cpu",
                                  progress=False)
        frames[n_threads] = {table: read_results(out, table) for table in ("rows", "records")}
    for table in ("rows", "records"):
        pd.testing.assert_frame_equal(frames[3][table], frames[1][table], check_exact=True)
