# maest-cli. On a fresh machine: `make demo` (the main job on the bundled model) and
# `make test` (the test suite); both set up .venv first.
PYTHON  ?= python3
VENV    ?= .venv
# CPU build of torch (on local disk here). CUDA users, e.g.:
#   make setup TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128'
TORCH_SPEC ?= torch==2.13.0
CORPUS  ?= corpus
WORKERS ?= 2
PY  := $(VENV)/bin/python
PIP := $(PY) -m pip
MAEST := $(VENV)/bin/maest
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test test-slow corpus corpus-deps bench bench-audio bench-train bench-probe bench-mels findings maest-tiny clean

setup: $(VENV)/.installed

# Decoding needs libsndfile, which comes inside the soundfile wheel: no Debian package for that.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH_SPEC)
	$(PIP) install --quiet -e '.[dev]'
	touch $@

# The main job: embeddings (and style/instrument activations) of a few bundled music clips with
# the bundled model maest-tiny. Nothing is downloaded.
demo: setup
	$(MAEST) extract examples/music --model maest-tiny --scores --out demo-embeddings --overwrite
	$(PY) examples/show_embeddings.py demo-embeddings

# One test renders a real clip with FluidSynth, so the tests need the corpus tools too. The 15
# slowest tests are listed at the end.
test: setup corpus-deps
	$(PY) -m pytest -q --durations=15

test-slow: setup corpus-deps
	$(PY) -m pytest -q -m slow

# The demo corpus is rendered by FluidSynth with the FluidR3 General MIDI soundfont: Debian
# packages, not on PyPI. --no-install-recommends skips qsynth (a Qt GUI we do not need).
corpus-deps:
	@if command -v fluidsynth >/dev/null 2>&1 && [ -f /usr/share/sounds/sf2/FluidR3_GM.sf2 ]; then :; else \
	  echo "Installing the Debian packages fluidsynth and fluid-soundfont-gm: 'maest corpus' renders scores with FluidSynth and the FluidR3 GM soundfont"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends fluidsynth fluid-soundfont-gm; fi

corpus: setup corpus-deps
	nice -n 10 $(MAEST) corpus build $(CORPUS) --workers $(WORKERS)
	$(MAEST) corpus info $(CORPUS)

# How the bundled model was made (18.5 min on 2 cores of a Zen 4 with native bf16, about 40 min
# without): prepare the pre-training mels of the corpus, train, and copy the weights chosen on
# validation (fp16) into the package.
maest-tiny: corpus
	$(MAEST) prepare-mels $(CORPUS)/pretrain --out mels-pretrain --labels $(CORPUS)/pretrain/labels.tsv --crop full --workers $(WORKERS)
	$(MAEST) train --data mels-pretrain --out runs/maest-tiny --config maest-tiny
	$(MAEST) models bundle runs/maest-tiny maest_cli/weights/maest-tiny --weights best

# The paper's findings at small scale (README "Findings"): on the demo corpus (built first when
# absent), the bundled maest-tiny against EfficientNet-B0 trained here on the same data and budget,
# random weights and mel statistics; every block and the three patchout presets probed (at the
# dtype `auto` gives). Resumable: rerun after a kill.
findings: corpus
	$(MAEST) findings findings --corpus $(CORPUS) --jobs $(WORKERS) --presets fast,faster,fastest

# Speed: every preset against EfficientNet-B0, same process, same threads (README "Speed").
bench: setup
	$(MAEST) bench --presets all --compile --repeats 7 --out bench.json

bench-audio: setup
	$(PY) -c "from maest_cli.audio.synth import write_corpus; write_corpus('bench-corpus', 16, min_s=30, max_s=180)"
	$(MAEST) bench --presets all --compile --repeats 7 --audio bench-corpus --plot bench.png --out bench-audio.json

bench-train: setup
	$(MAEST) bench train --variant 30s --batch-size 4 --repeats 5 --out bench-train.json

# prepare-mels against the machine's decode limit: 20 three-minute MP3 and OGG files each, 1 and 2
# workers, 3 interleaved rounds (issue 4's figures; about 6 minutes).
bench-mels: setup
	$(MAEST) bench mels --files 20 --repeats 3 --work bench-mels-data --out bench-mels.json

# The probe's quick grid on catalogue-sized synthetic embeddings (25,000 x 2304, 50 tags).
bench-probe: setup
	$(MAEST) bench probe --tracks 25000 --dim 2304 --grid quick --seeds 3 --work bench-probe-data --out bench-probe.json

clean:
	rm -rf $(VENV) build *.egg-info demo-embeddings bench-probe-data bench-mels-data
