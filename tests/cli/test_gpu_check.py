"""benchmarks/gpu_check.sh, the one GPU check, on a machine without a GPU: its syntax, its arguments, and the plan
its dry run prints (every stage time-boxed within the budget, the later stages keeping their minimum)."""
import re
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"


def run(*args):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def plan(tmp_path, *args):
    done = run("--dry-run", "--out", str(tmp_path), *args)
    assert done.returncode == 0, done.stderr
    stages = {}
    for line in (tmp_path / "stages.tsv").read_text().splitlines()[1:]:
        stage, rc, seconds, box = line.split("\t")
        stages[stage] = (rc, int(seconds), int(box))
    return done.stdout, stages


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_the_dry_run_plans_every_stage_within_the_budget(tmp_path):
    out, stages = plan(tmp_path)
    assert list(stages) == ["info", "build", "tests", "roofline", "lens", "training"]
    assert sum(seconds for _, seconds, _ in stages.values()) <= 560
    assert stages["lens"][2] == 190  # the optional training stage takes nothing from the stages before it
    assert "bench_gpu_roofline.py" in out and "profile_projection.py" in out
    assert re.search(r"blens_fast\.cli bench --model gpt-j --device cuda .*--prompts 1000", out)
    assert re.search(r"pytest .*-k cuda\\ or\\ triton\\ or\\ gpu", out)  # the GPU-only tests, by name
    assert (tmp_path / "gpu_check_log.txt").read_text() == out


def test_the_optional_training_stage_runs_in_the_time_the_others_leave(tmp_path):
    out, stages = plan(tmp_path, "--budget", "640")
    assert stages["training"][0] == "plan" and stages["lens"][2] == 200
    assert re.search(r"bench_training_lens\.py cost --device cuda", out)
    _, stages = plan(tmp_path, "--stages", "training")
    assert stages == {"training": ("plan", 70, 120)}


def test_a_small_budget_shortens_the_stages_and_skips_what_no_longer_fits(tmp_path):
    out, stages = plan(tmp_path, "--budget", "300", "--stages", "tests,roofline,lens")
    assert list(stages) == ["tests", "roofline", "lens"]
    assert all(seconds <= box for _, seconds, box in stages.values())
    assert "--prompts 100 " in out  # the lens stage runs fewer prompts in the time left
    _, stages = plan(tmp_path, "--budget", "150", "--stages", "roofline,lens")  # the lens keeps its 100 s
    assert stages["roofline"][0] == "skipped" and stages["lens"] == ("plan", 150, 150)


@pytest.mark.parametrize("args,message", [
    (["--bogus"], "unknown argument '--bogus'"),
    (["--stages", "build,nope"], "unknown stage 'nope'"),
    (["--budget", "0"], "--budget 0: expected a positive integer"),
    (["--prompts"], "--prompts needs a number"),
    ([], "this check needs a CUDA GPU"),
])
def test_bad_arguments_and_no_gpu_exit_2_with_one_line(args, message):
    done = run(*args)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.splitlines()) == 1
