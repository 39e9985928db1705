# Two commands on a fresh machine: `make demo` (the Backward Lens on the shipped model) and `make test`.
PYTHON ?= python
STAMP := .cache/installed.stamp
DEMO_OUT ?= out/demo

.PHONY: install demo test test-realistic test-all bench bench-check mutate compile-check clean

install: $(STAMP)

$(STAMP): requirements.txt setup.py blens_fast/ops/build_flags.py $(wildcard csrc/cpu/*.cpp csrc/cpu/*.h)
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -r requirements.txt
	$(PYTHON) -m pip install --no-build-isolation -e .
	mkdir -p $(dir $@) && touch $@

demo: install
	blens lens --prompt "The mother tongue of Danielle Darrieux is" --target " French" --out $(DEMO_OUT)

# the default suite, the realistic-size tier (GPT-2-small dimensions) included
test: install
	$(PYTHON) -m pytest -q -n 2 -m "not slow" tests

test-realistic: install
	$(PYTHON) -m pytest -q -n 2 -m realistic tests

test-all: install
	$(PYTHON) -m pytest -q -n 2 tests

compile-check:
	bash csrc/compile_check.sh

clean:
	rm -rf build .cache out mutants *.egg-info blens_fast/*.so

# micro-benchmarks (not part of `make test`): ratios fast path / yardstick, written to benchmarks/results/micro_*.json
bench: install
	$(PYTHON) -m pytest benchmarks/micro

# fails when a ratio is worse than the committed one of this machine by more than its margin (15%; 35% under 5 ms)
bench-check: install
	rm -rf out/bench-check
	$(PYTHON) -m pytest benchmarks/micro --micro-results out/bench-check
	$(PYTHON) benchmarks/check_micro.py out/bench-check

# mutation testing of the core (not part of `make test`): mutmut, time-boxed and resumable (a rerun goes on where
# the last one stopped); the report with every survivor goes to tests/MUTATION.md
MUTATE_MINUTES ?= 75
mutate: install
	$(PYTHON) -m tests.mutate run --minutes $(MUTATE_MINUTES)
	$(PYTHON) -m tests.mutate report
