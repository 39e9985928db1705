"""evaluate_counterfact(), the exact last-layer sweep and the eval-counterfact command, on tiny models."""
import json

import pytest
import torch

from blens_fast import bind
from blens_fast.counterfact import fact_texts, load
from blens_fast.counterfact.harness import evaluate_counterfact
from blens_fast.counterfact.tradeoff import (Sweep, last_layer_sweep, neighborhood_at_efficacy, plot_tradeoff,
                                             results_table, write_results)
from blens_fast.editing import Edit, edit, ff2_whitening, resolve_settings
from tests.helpers import prompt_target_ids
from tests.pipeline.test_edit import tiny

pytestmark = pytest.mark.usefixtures("one_thread")
RECORDS = load(n=3)
TEXTS = fact_texts(load()[100:110])


def direct_scores(model, tokenizer, record):
    """Both metric families by the plain model forward, one pair at a time, tokenized here."""
    def run(prompt, obj):
        p, t = prompt_target_ids(tokenizer, prompt, obj)
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([p + t[:-1]])).logits[0].float().log_softmax(-1)
        total = sum(logp[len(p) - 1 + j, token].item() for j, token in enumerate(t))
        return total, logp[len(p) - 1].argmax().item(), t[0]

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
    kwargs = dict(layer=-1, scale="auto", margin=0.01, normalize_key=True)
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
            kwargs["whiten"] = ff2_whitening(model, tokenizer, 1, TEXTS, file_cache=False, progress=False)
        row = evaluate_counterfact(model, tokenizer, RECORDS, method=method, progress=False, fluency_texts=TEXTS[:3],
                                   **kwargs)
        assert row["n"] == 3 and row["revert_failures"] == 0 and row["parameters_restored"]
        for family in ("memit_argmax", "rome_probability"):
            assert set(row[family]) == {"efficacy", "paraphrase", "neighborhood"}
            assert all(0 <= v <= 100 for v in row[family].values())
        assert row["fluency_ppl"] > 1 and row["fluency_ppl_unedited"] > 1
        rows.append(row)
    assert rows[0]["fluency_ppl"] == pytest.approx(rows[0]["fluency_ppl_unedited"])
    table = results_table(rows)
    assert table.count("\n") == 2 + len(rows) and "Revert failures" in table


def test_settings_resolved_once_give_the_rows_of_the_keywords(tokenizer):
    """evaluate_counterfact(settings=...) scores what the same keywords score; the row records the variant and where
    the settings came from; keywords beside settings= are refused."""
    ctx = bind(tiny("gpt2"), tokenizer)
    settings = resolve_settings(ctx, layer=1, scale=1.0, skip_if_argmax=False)
    reused = evaluate_counterfact(ctx, RECORDS, settings=settings, progress=False, fluency=False)
    direct = evaluate_counterfact(ctx, RECORDS, layer=1, scale=1.0, skip_if_argmax=False, progress=False,
                                  fluency=False)
    for family in ("memit_argmax", "rome_probability"):
        assert reused[family] == direct[family]
    assert reused["settings"] == direct["settings"] == {"layer": 1, "scale": 1.0, "skip_if_argmax": False,
                                                        "variant": "forward_shift", "source": "given"}
    with pytest.raises(ValueError, match="leave out layer"):
        evaluate_counterfact(ctx, RECORDS, settings=settings, layer=0, progress=False)
    with pytest.raises(ValueError, match="method='forward_shift'"):
        evaluate_counterfact(ctx, RECORDS, method="gradient", settings=settings, progress=False)


def test_a_broken_revert_is_counted_and_repaired(tokenizer, monkeypatch):
    model = tiny("gpt2")
    monkeypatch.setattr(Edit, "revert", lambda self: setattr(self, "_ctx", None))
    row = evaluate_counterfact(model, tokenizer, RECORDS, method="forward_shift", layer=0, scale=1.0,
                               skip_if_argmax=False, progress=False, fluency=False)
    assert row["revert_failures"] == 3
    assert row["parameters_restored"]  # repaired from the harness's own copy


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_exact_last_layer_sweep_matches_the_real_edits(arch, tokenizer):
    model = tiny(arch, torch.float64)
    records = load(n=6)
    whitening = ff2_whitening(model, tokenizer, 1, TEXTS, file_cache=False, progress=False)
    variants = {"paper": Sweep({"layer": 1}, "scale", (0.5, 5.0)),
                "whitened": Sweep({"layer": 1, "whiten": whitening}, "scale", (3.0,)),
                "auto": Sweep({"layer": 1, "normalize_key": True, "scale": "auto"}, "margin", (0.0, 0.02))}
    points = last_layer_sweep(bind(model, tokenizer), records, variants, progress=False)
    options = {"paper": {}, "whitened": {"whiten": whitening}, "auto": {"normalize_key": True, "scale": "auto"}}
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
        last_layer_sweep(bind(model, tokenizer), records, {"x": Sweep({"layer": 0}, "scale", (1.0,))}, progress=False)


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
