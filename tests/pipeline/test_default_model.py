"""Quick tests of the embedded default model (tokenizer, loader, shipped weights) and of the scripts that trained and
measured it (scripts/, outside the package)."""
import sys
from pathlib import Path

import pytest
import torch

from blens_fast import load_default_model, load_model
from blens_fast.counterfact import fact_queries, fact_texts, load as load_counterfact
from blens_fast.default_model import MODEL_DIR, load_default_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))  # as `python scripts/<name>.py` runs them
from _default_model import first_token_top1  # noqa: E402

WEIGHTS = MODEL_DIR / "model.safetensors"
needs_weights = pytest.mark.skipif(
    not WEIGHTS.is_file(),
    reason="default model weights not trained yet (python scripts/train_default_model.py)",
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_default_tokenizer()


@pytest.fixture(scope="module")
def model_and_tok():
    torch.set_num_threads(1)
    return tuple(load_default_model())


def test_tokenizer_invariants(tokenizer):
    assert len(tokenizer) == 50257
    assert tokenizer(" Paris").input_ids == [6342]
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token == tokenizer.eos_token
    assert tokenizer.pad_token_id == 50256
    assert tokenizer.padding_side == "right"
    # a batch pads on the right with the eos id
    enc = tokenizer(["The capital of France is", "Paris"], padding=True)
    paris = tokenizer("Paris").input_ids
    assert enc.input_ids[1][: len(paris)] == paris
    assert enc.input_ids[1][-1] == 50256 and enc.attention_mask[1][-1] == 0


def test_counterfact_and_fact_texts(tmp_path):
    records = load_counterfact()
    assert len(records) == 10000
    r = records[0]
    assert r["id"] == r["case_id"] == 0 and r["target"] == r["ground_truth"] == "French"
    assert load_counterfact(n=3) == records[:3]
    lines = tmp_path / "cf.jsonl"
    lines.write_text("\n".join(__import__("json").dumps({k: v for k, v in x.items() if k not in ("id", "target")})
                               for x in records[:4]) + "\n")
    assert load_counterfact(lines) == records[:4]
    texts = fact_texts(records[:2])
    assert len(texts) == 6
    assert texts[0] == r["prompt"] + " " + r["ground_truth"]
    assert texts[1] == r["rephrase_prompt"] + " " + r["ground_truth"]
    assert texts[2] == r["locality_prompt"] + " " + r["locality_ground_truth"]
    prompts, objects = fact_queries(records[:1], "locality_prompt")
    assert prompts == [r["locality_prompt"]] and objects == [" " + r["locality_ground_truth"]]


def test_missing_weights_raise_clear_error(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        load_model(tmp_path)


@needs_weights
def test_weights_file_small_enough():
    assert WEIGHTS.stat().st_size <= 40 * 1024 * 1024


@needs_weights
def test_load_default_model(model_and_tok):
    from transformers import GPT2LMHeadModel

    model, tok = model_and_tok
    assert isinstance(model, GPT2LMHeadModel)
    assert not model.training
    assert model.dtype == torch.float32
    assert model.config.vocab_size == len(tok) == 50257
    assert model.lm_head.weight.shape == (50257, model.config.n_embd)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied


@needs_weights
def test_predicts_true_objects_of_training_prompts(model_and_tok):
    model, tok = model_and_tok
    prompts, objects = fact_queries(load_counterfact()[:50], "prompt")
    hits = first_token_top1(model, tok, prompts, objects)
    assert sum(hits) >= 45, f"only {sum(hits)}/50 training facts predicted"


@needs_weights
def test_padding_does_not_change_predictions(model_and_tok):
    model, tok = model_and_tok
    prompts, objects = fact_queries(load_counterfact()[:8], "prompt")
    batched = first_token_top1(model, tok, prompts, objects, batch_size=8)
    single = [first_token_top1(model, tok, [p], [o])[0] for p, o in zip(prompts, objects)]
    assert batched == single


def test_training_writes_a_loadable_folder_and_never_the_shipped_one(tmp_path):
    """The training command's default output is a new folder (running it as documented must not overwrite the
    shipped model), the folder holds the tokenizer beside the weights, and a resumed run reads its checkpoint with
    weights_only=True."""
    import train_default_model as train

    from blens_fast import lens

    assert train.parse_args([]).model_dir == "out/default_model"
    args = ["--epochs", "2", "--max-records", "4", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
            "--batch-size", "4", "--eval-every", "100", "--threads", "1", "--out", str(tmp_path / "ckpt"),
            "--model-dir", str(tmp_path / "model")]
    train.main(args + ["--stop-after", "1"])
    assert not (tmp_path / "model").exists()
    train.main(args + ["--resume"])
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "model").iterdir()}
    report = lens(load_model(tmp_path / "model"), "The mother tongue of Danielle Darrieux is", " French", k=2)
    assert report.layers == (0,)


def test_the_package_keeps_the_weights_and_the_loader_only():
    """Training and measuring are scripts (scripts/): the package's default_model folder holds no Python but its
    loader."""
    assert sorted(p.name for p in MODEL_DIR.glob("*.py")) == ["__init__.py"]
    quality = Path(__file__).resolve().parents[2] / "scripts" / "default_model_quality.py"
    assert "def main(" in quality.read_text()


def test_padded_batches_pass_their_attention_mask(tokenizer):
    """Issue 24: the training and quality scripts and first_token_top1 pad on the right and pass the mask, so
    transformers does not warn about padded input without an attention mask."""
    import logging

    import transformers

    import default_model_quality as quality
    import train_default_model as train

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=50257,
                                                                 pad_token_id=tokenizer.pad_token_id)).eval()
    texts = ["The cat sat", "A much longer sentence than that one"]
    ids, labels = train.pad_batch([tokenizer(t).input_ids for t in texts], [0, 1], tokenizer.pad_token_id)
    library = transformers.utils.logging.get_logger("transformers")
    collect = Collect()
    library.addHandler(collect)
    try:
        logging.Logger.warning_once.cache_clear()  # transformers warns once per process
        first_token_top1(model, tokenizer, texts, [" on", " now"])
        quality.perplexity(model, tokenizer, texts)
        train.lm_loss(model, ids, labels)
        assert not [m for m in collect.messages if "attention_mask" in m]
        model.transformer(input_ids=ids)  # the check above can fail: without the mask, transformers warns
        assert [m for m in collect.messages if "attention_mask" in m]
    finally:
        library.removeHandler(collect)


def test_auto_tokenizer_reads_the_shipped_tokenizer_folder(tokenizer_without_pad, tmp_path):
    """Issue 24: ``AutoTokenizer.from_pretrained`` on the shipped folder (and on a copy of it, as a user would make)
    gives the GPT-2 tokenizer that the raw vocab.json/merges.txt define, with the pad token load_default_tokenizer
    sets."""
    import shutil

    import transformers

    from blens_fast.default_model import TOKENIZER_DIR

    copy = shutil.copytree(TOKENIZER_DIR, tmp_path / "tokenizer")
    texts = [r["prompt"] + " " + r["target_new"] for r in load_counterfact()[:300]]
    texts += ["a<|endoftext|>b", "  two  spaces\n\nand lines", "héllo wörld 日本語", ""]
    for folder in (TOKENIZER_DIR, copy):
        auto = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        assert len(auto) == 50257 and auto.get_vocab() == tokenizer_without_pad.get_vocab()
        assert [auto(t).input_ids for t in texts] == [tokenizer_without_pad(t).input_ids for t in texts]
        assert auto.pad_token == auto.eos_token == "<|endoftext|>" and auto.padding_side == "right"
