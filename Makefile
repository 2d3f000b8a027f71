# maest-cli: `make test` and `make demo` work on a fresh machine (they run `setup` first).
PYTHON ?= python3
VENV   ?= .venv
# CPU build of torch, found on local disk here. CUDA users: make setup TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128'
TORCH_SPEC ?= torch==2.13.0
PY  := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup test test-slow bench clean

setup: $(VENV)/.installed

# libsndfile (decoding) comes inside the soundfile wheel, so no Debian package is needed.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH_SPEC)
	$(PIP) install --quiet -e '.[dev]'
	touch $@

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	$(VENV)/bin/maest bench --model-only

clean:
	rm -rf $(VENV) build *.egg-info
