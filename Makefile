# Two commands do all the set-up on a fresh machine (see README):
#   make bench   - the main job on the embedded default model
#   make test    - the test suite
# Each builds .venv itself: torch==2.13.0 (CPU wheel) first, then flexdiff, so pip keeps that torch.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.flexdiff-installed
RAY_STAMP := $(VENV)/.flexdiff-ray-installed
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
# after every install: still the pinned CPU torch, and no CUDA packages pulled in
CHECK_TORCH = $(BIN)/python -m pip list 2>/dev/null | grep -E '^torch +2\.13\.0' >/dev/null \
	|| { echo "torch is not 2.13.0 after install" >&2; exit 1; }; \
	! $(BIN)/python -m pip list 2>/dev/null | grep -i '^nvidia' \
	|| { echo "CUDA packages were pulled in" >&2; exit 1; }

.PHONY: setup bench bench-full test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(FIND_LINKS) torch==2.13.0
	$(BIN)/python -m pip install -q $(FIND_LINKS) -e '.[test]'
	@$(CHECK_TORCH)
	touch $(STAMP)

# The tests also run the distributed paths, so they install the optional ray extra (make bench does not).
$(RAY_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q $(FIND_LINKS) -e '.[test,ray]'
	@$(CHECK_TORCH)
	touch $(RAY_STAMP)

bench: $(STAMP)
	$(BIN)/flexdiff bench --preset quick --out runs/bench

bench-full: $(STAMP)
	$(BIN)/flexdiff bench --preset full --out runs/bench-full

test: $(RAY_STAMP)
	$(BIN)/ruff check src tests scripts
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
