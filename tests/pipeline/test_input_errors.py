"""Bad input met deep inside becomes one error naming the value or the file and what was expected (issue 23, defect
6): a corrupt Parquet input, a JSON Lines file that is not UTF-8, unknown result columns, a model on the meta
device. (A poisoned whitening cache entry and an output folder that is a file: tests/security.)"""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers

from blens_fast import bind, lens, project_dataset, read_results
from blens_fast.bulk import BadRecord
from blens_fast.context import load_model
from tests.helpers import TINY_CONFIGS

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = dict(k=2, layers=[1], batch_size=2, progress=False, log=lambda message: None)
RECORDS = [{"id": "a", "prompt": "The capital of France is", "target": "Paris"},
           {"id": "b", "prompt": "A cat is an", "target": "animal"}]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return load_model(str(tiny_checkpoint))


def test_a_corrupt_parquet_input_names_the_file(tiny, tmp_path):
    path = tmp_path / "records.parquet"
    pq.write_table(pa.Table.from_pylist(RECORDS), path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2] + b"\x00" * 64 + data[len(data) // 2 + 64:])
    with pytest.raises(ValueError, match=r"input file .*records.parquet' is not a readable Parquet file"):
        project_dataset(tiny, path, tmp_path / "out", **RUN)
    path.write_bytes(b"PAR1 this is no parquet file")
    with pytest.raises(ValueError, match=r"records.parquet' is not a readable Parquet file \("):
        project_dataset(tiny, path, tmp_path / "out", **RUN)


def test_a_jsonl_line_that_is_not_utf8_names_its_line(tiny, tmp_path):
    path = tmp_path / "records.jsonl"
    lines = [json.dumps(r).encode() for r in RECORDS]
    path.write_bytes(lines[0] + b"\n" + b'{"id": "c", "prompt": "caf\xe9 au", "target": "lait"}\n' + lines[1] + b"\n")
    with pytest.raises(BadRecord, match=r"records.jsonl:2: not UTF-8 text \(byte 0xe9 at column 27\)"):
        project_dataset(tiny, path, tmp_path / "out", **RUN)
    out = project_dataset(tiny, path, tmp_path / "skipped", skip_bad=True, **RUN)
    assert sorted(read_results(out, "records")["id"]) == ["a", "b"]
    assert read_results(out, "rejected")["line"].tolist() == [2]


def test_a_json_list_that_is_not_utf8_names_the_file(tiny, tmp_path):
    path = tmp_path / "records.json"
    path.write_bytes(b'[{"id": "c", "prompt": "caf\xe9", "target": "lait"}]')
    with pytest.raises(ValueError, match=r"records.json' is not UTF-8 text \(byte 0xe9 at offset 27\)"):
        project_dataset(tiny, path, tmp_path / "out", **RUN)


def test_unknown_result_columns_are_named(tiny, tmp_path):
    out = project_dataset(tiny, RECORDS, tmp_path / "out", stats=True, stats_rank=2, **RUN)
    assert list(read_results(out, columns=["id", "rank"]).columns) == ["id", "rank"]
    for table, columns in (("rows", ["nope"]), ("records", ["id", "rank"]), ("rejected", ["why"]),
                           ("stats_norms", ["nope"])):
        with pytest.raises(ValueError, match=rf"columns=\[.*\]: the '{table}' table has the columns "):
            read_results(out, table, columns=columns)
    assert list(read_results(out, "rejected", columns=["id"]).columns) == ["id"]


def test_a_model_on_the_meta_device_is_refused_at_the_boundary(tokenizer):
    """It failed deep inside with torch's "Tensor.item() cannot be called on meta tensors"."""
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(TINY_CONFIGS["gpt2"]())
    with pytest.raises(ValueError, match="meta device .*'transformer.wte.weight'"):
        bind(model, tokenizer)
    with pytest.raises(ValueError, match="meta device"):
        lens(model, tokenizer, "The capital of France is", " Paris")
