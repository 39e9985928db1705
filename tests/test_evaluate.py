"""evaluate_counterfact(), the exact last-layer sweep and the eval-counterfact command, on tiny models."""
import json

import pytest
import torch

from blens_fast import cli
from blens_fast.capture import batch_inputs, tokenize_examples
from blens_fast.default_model import fact_texts, load_counterfact
from blens_fast.edit import Edit, edit, ff2_whitening
from blens_fast.evaluate import (evaluate_counterfact, last_layer_sweep, markdown_table, neighborhood_at_efficacy,
                                 plot_tradeoff, write_results)
from test_edit import tiny

RECORDS = load_counterfact()[:3]
TEXTS = fact_texts(load_counterfact()[100:110])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # far faster for these small matrices on a busy machine
    yield
    torch.set_num_threads(threads)


def direct_scores(model, tokenizer, record):
    """Both metric families by the plain model forward, one pair at a time."""
    def run(prompt, obj):
        (example,) = tokenize_examples(tokenizer, [prompt], [obj])
        ids, mask = batch_inputs([example], 0, "cpu")
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
        total = sum(logp[p, t].item() for p, t in zip(example.loss_positions, example.target_ids))
        return total, logp[len(example.prompt_ids) - 1].argmax().item(), example.target_ids[0]

    r = record
    new_p, top_p, new_tok = run(r["prompt"], r["target_new"])
    true_p, _, _ = run(r["prompt"], r["ground_truth"])
    new_r, top_r, _ = run(r["rephrase_prompt"], r["target_new"])
    true_r, _, _ = run(r["rephrase_prompt"], r["ground_truth"])
    new_l, top_l, _ = run(r["locality_prompt"], r["target_new"])
    loc_l, _, loc_tok = run(r["locality_prompt"], r["locality_ground_truth"])
    return ({"efficacy": top_p == new_tok, "paraphrase": top_r == new_tok, "neighborhood": top_l == loc_tok},
            {"efficacy": new_p > true_p, "paraphrase": new_r > true_r, "neighborhood": loc_l > new_l})


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_scores_match_the_plain_model_forward(arch, tokenizer):
    model = tiny(arch, torch.float64)
    kwargs = dict(layer=-1, scale="auto", margin=0.01, normalize=True)
    row = evaluate_counterfact(model, tokenizer, RECORDS, method="forward_shift", progress=False, details=True,
                               fluency_texts=TEXTS[:3], **kwargs)
    assert row["revert_failures"] == 0 and row["parameters_restored"]
    for record, scored in zip(RECORDS, row["records"]):
        with edit(model, tokenizer, record["prompt"], record["target_new"], **kwargs):
            memit, rome = direct_scores(model, tokenizer, record)
        assert scored["memit"] == memit and scored["rome"] == rome
        assert scored["memit"]["efficacy"]  # the auto scale makes the new object the argmax
    unedited = evaluate_counterfact(model, tokenizer, RECORDS, method="none", progress=False, details=True,
                                    fluency_texts=TEXTS[:3])
    for record, scored in zip(RECORDS, unedited["records"]):
        memit, rome = direct_scores(model, tokenizer, record)
        assert scored["memit"] == memit and scored["rome"] == rome


def test_smoke_rows_for_every_method(tokenizer):
    model = tiny("gptj")
    rows = []
    for method, kwargs in [("none", {}), ("forward_shift", dict(layer=1, scale=1.0)),
                           ("forward_shift", dict(layer=1, scale=1.0, whiten=True)),
                           ("gradient", dict(layer=0, lr=1.0, steps=2))]:
        if kwargs.get("whiten"):
            kwargs["whiten"] = ff2_whitening(model, tokenizer, 1, TEXTS, file_cache=False)
        row = evaluate_counterfact(model, tokenizer, RECORDS, method=method, progress=False, fluency_texts=TEXTS[:3],
                                   **kwargs)
        assert row["n"] == 3 and row["revert_failures"] == 0 and row["parameters_restored"]
        for family in ("memit_argmax", "rome_probability"):
            assert set(row[family]) == {"efficacy", "paraphrase", "neighborhood"}
            assert all(0 <= v <= 100 for v in row[family].values())
        assert row["fluency_ppl"] > 1 and row["fluency_ppl_unedited"] > 1
        rows.append(row)
    assert rows[0]["fluency_ppl"] == pytest.approx(rows[0]["fluency_ppl_unedited"])
    table = markdown_table(rows)
    assert table.count("\n") == 2 + len(rows) and "Revert failures" in table


def test_a_broken_revert_is_counted_and_repaired(tokenizer, monkeypatch):
    model = tiny("gpt2")
    monkeypatch.setattr(Edit, "revert", lambda self: setattr(self, "_model", None))
    row = evaluate_counterfact(model, tokenizer, RECORDS, method="forward_shift", layer=0, scale=1.0,
                               skip_if_argmax=False, progress=False, fluency=False)
    assert row["revert_failures"] == 3
    assert row["parameters_restored"]  # repaired from the harness's own copy


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_exact_last_layer_sweep_matches_the_real_edits(arch, tokenizer):
    model = tiny(arch, torch.float64)
    records = load_counterfact()[:6]
    whitening = ff2_whitening(model, tokenizer, 1, TEXTS, file_cache=False)
    variants = {"paper": ({"layer": 1}, "scale", [0.5, 5.0]),
                "whitened": ({"layer": 1, "whiten": whitening}, "scale", [3.0]),
                "auto": ({"layer": 1, "normalize": True, "scale": "auto"}, "margin", [0.0, 0.02])}
    points = last_layer_sweep(model, tokenizer, records, variants, progress=False)
    options = {"paper": {}, "whitened": {"whiten": whitening}, "auto": {"normalize": True, "scale": "auto"}}
    efficacies = set()
    for point in points:
        row = evaluate_counterfact(model, tokenizer, records, method="forward_shift", layer=1, fluency=False,
                                   progress=False, **{**options[point["variant"]], point["key"]: point["value"]})
        assert point["memit_argmax"] == row["memit_argmax"], point
        assert point["rome_probability"] == row["rome_probability"], point
        assert point["skipped"] == row["skipped"]
        efficacies.add(point["memit_argmax"]["efficacy"])
    assert len(efficacies) > 1  # the settings differ, so the comparison means something
    with pytest.raises(ValueError, match="not the last layer"):
        last_layer_sweep(model, tokenizer, records, {"x": ({"layer": 0}, "scale", [1.0])}, progress=False)


def test_interpolation_plot_and_merged_results(tmp_path):
    curve = [{"variant": "v", "value": s, "memit_argmax": {"efficacy": e, "paraphrase": 0.0, "neighborhood": nb},
              "rome_probability": {"efficacy": e, "paraphrase": 0.0, "neighborhood": nb}}
             for s, e, nb in [(1, 50.0, 90.0), (2, 90.0, 50.0), (4, 100.0, 10.0)]]
    assert neighborhood_at_efficacy(curve, 70.0) == pytest.approx(70.0)
    assert neighborhood_at_efficacy(curve, 95.0) == pytest.approx(30.0)
    assert neighborhood_at_efficacy(curve, 20.0) == pytest.approx(90.0)  # the curve does better than asked
    assert neighborhood_at_efficacy(curve, 100.5) is None
    plot_tradeoff(curve, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 1000
    row = {"label": "a", "method": "forward_shift", "n": 3, **{k: curve[0][k] for k in ("memit_argmax",
                                                                                          "rome_probability")}}
    write_results([row], tmp_path)
    write_results([{**row, "label": "b", "method": "none"}], tmp_path)
    saved = json.loads((tmp_path / "counterfact_eval.json").read_text())
    assert [r["label"] for r in saved["rows"]] == ["b", "a"]


def test_command_writes_the_table_and_rejects_bad_input(tokenizer, tmp_path, capsys):
    model = tiny("gpt2")
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    code = cli.main(["eval-counterfact", "--model", str(tmp_path / "model"), "--n", "2", "--layer", "1",
                     "--scale", "0.5", "--out", str(out), "--quiet", "--no-fluency", "--threads", "1"])
    assert code == 0
    saved = json.loads((out / "counterfact_eval.json").read_text())
    assert [r["method"] for r in saved["rows"]] == ["none", "forward_shift"]
    assert all(r["revert_failures"] == 0 for r in saved["rows"])
    assert "MEMIT-style" in (out / "counterfact_eval.md").read_text()
    for argv, message in [(["--n", "0"], "--n"), (["--model", str(tmp_path / "nowhere")], "no such directory"),
                          (["--method", "rome"], "--method"), (["--scale", "-1"], "scale")]:
        args = ["eval-counterfact", "--model", str(tmp_path / "model"), "--layer", "1", "--n", "1", "--quiet",
                "--out", str(out)]
        assert cli.main(args + argv) == 2
        assert message in capsys.readouterr().err
