# ray-mff: two commands set everything up on a fresh machine.
#   make run   - create .venv, install, fuse the bundled example stacks into out/
#   make test  - create .venv, install, run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: run test install bench clean

# torch first, pinned to the CPU wheel this machine carries, so no dependency pulls a CUDA build;
# constraints.txt pins the S3 client stack that pip's resolver otherwise backtracks through.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[cpu,test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/ray-mff fuse examples out --save-decision-maps

test: $(STAMP)
	$(VENV)/bin/pytest -q

bench: $(STAMP)
	$(PY) bench/methods.py

clean:
	rm -rf out .pytest_cache
