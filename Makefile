# Two commands on a fresh machine: `make demo` (the Backward Lens on the shipped model) and `make test`.
PYTHON ?= python
STAMP := .cache/installed.stamp
DEMO_OUT ?= out/demo

.PHONY: install demo test test-all bench-cpu compile-check clean

install: $(STAMP)

$(STAMP): requirements.txt setup.py $(wildcard csrc/cpu/*.cpp)
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -r requirements.txt
	$(PYTHON) -m pip install --no-build-isolation -e .
	mkdir -p $(dir $@) && touch $@

demo: install
	blens lens --prompt "The mother tongue of Danielle Darrieux is" --target " French" --out $(DEMO_OUT)

test: install
	$(PYTHON) -m pytest -q -n 2 -m "not slow" tests

test-all: install
	$(PYTHON) -m pytest -q -n 2 tests

compile-check:
	bash csrc/compile_check.sh

clean:
	rm -rf build .cache out *.egg-info blens_fast/*.so
