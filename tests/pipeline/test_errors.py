"""Python errors as good as the CLI's (issue 24, item 6): a forgotten tokenizer is named, layers are spelled as on the
command line, bad values are one error naming them, an output folder that cannot be made is named, and a context
indexes as it unpacks."""
import pytest

import blens_fast
from blens_fast.context import bind

from ..helpers import make_tiny_model

PROMPT, TARGET = "The mother tongue of Danielle Darrieux is", " French"


@pytest.fixture(scope="module")
def ctx(tokenizer):
    return bind(make_tiny_model("gpt2"), tokenizer)


@pytest.mark.parametrize("call", [
    lambda model: blens_fast.lens(model, PROMPT, TARGET),
    lambda model: blens_fast.capture(model, [PROMPT], [TARGET]),
    lambda model: blens_fast.rank(model, [PROMPT], [TARGET]),
    lambda model: blens_fast.edit(model, PROMPT, TARGET),
])
def test_a_forgotten_tokenizer_is_named(ctx, call):
    with pytest.raises(TypeError, match=r"the tokenizer is missing .*The mother tongue"):
        call(ctx.model)


@pytest.mark.parametrize("spelling,expected", [
    ("0-1", (0, 1)), ("0,-1", (0, 1)), ("1", (1,)), ("all", (0, 1)), ("0-1,1", (0, 1)), ([1, 0], (1, 0)),
    (-1, (1,)),
])
def test_layers_are_spelled_as_on_the_command_line(ctx, spelling, expected):
    assert ctx.check_layers(spelling) == expected
    report = blens_fast.lens(ctx, PROMPT, TARGET, k=2, layers=spelling)
    assert tuple(report.layers) == expected


@pytest.mark.parametrize("layers,error,match", [
    (1.0, TypeError, r"layers=1\.0: expected layer indices.*got a float"),
    ([0, 1.0], TypeError, r"layers=\[0, 1\.0\]: expected layer indices.*got 1\.0, a float"),
    ("0.5", ValueError, r"layers='0\.5': expected layer indices"),
    ("1-0", ValueError, r"layers='1-0'.*runs backwards"),
    (True, TypeError, r"layers=True: expected layer indices.*got a bool"),
    ("0-7", ValueError, r"layer 2 is out of range: the model has 2 layers"),
])
def test_bad_layers_are_one_error_naming_the_value(ctx, layers, error, match):
    with pytest.raises(error, match=match):
        blens_fast.lens(ctx, PROMPT, TARGET, k=2, layers=layers)


def test_an_output_folder_that_cannot_be_made_is_named(ctx, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    report = blens_fast.lens(ctx, PROMPT, TARGET, k=2, layers=[1])
    with pytest.raises(ValueError, match=r"output folder '.*a_file/below': '.*a_file' is a file, not a folder"):
        report.save(blocker / "below")
    with pytest.raises(ValueError, match=r"output folder '/proc/.*' cannot be created"):
        report.save("/proc/blens_no_such_folder/out")


def test_a_context_indexes_as_it_unpacks(ctx):
    model, tokenizer = ctx
    assert ctx[0] is model and ctx[1] is tokenizer and ctx[-1] is tokenizer and len(ctx) == 2
    assert list(ctx) == [model, tokenizer]


def test_one_of_anything_is_singular(ctx):
    from blens_fast._ui import plural

    assert [plural(n, "prompt") for n in (0, 1, 2)] == ["0 prompts", "1 prompt", "2 prompts"]
    with pytest.raises(ValueError, match=r"^got 1 prompt but 2 targets: expected one target per prompt$"):
        blens_fast.rank(ctx, [PROMPT], [TARGET, TARGET])
    with pytest.raises(ValueError, match=r"captured 1 example$"):
        blens_fast.capture(ctx, [PROMPT], [TARGET], layers=[0]).gradient(0, "mlp.out", example=3)


def test_progress_false_prints_nothing(ctx, tmp_path, capfd):
    """Issue 24: the public calls with a ``progress`` switch are silent with ``progress=False`` (stdout and stderr, at
    the file descriptor: bars and summaries alike)."""
    records = blens_fast.counterfact.load(n=3)
    prompts, targets = [r["prompt"] for r in records], [r["target"] for r in records]
    blens_fast.rank(ctx, prompts * 4, targets * 4, layers=[0], batch_size=2, progress=False)
    blens_fast.gradient_stats(ctx, records, layers=[0], rank=2, progress=False)
    blens_fast.project_dataset(ctx, records, tmp_path / "out", k=1, layers=[0], progress=False)
    blens_fast.evaluate_counterfact(ctx, records, n=2, layer=1, scale=0.5, fluency=False, progress=False)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == "", captured
