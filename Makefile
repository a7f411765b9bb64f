# Two commands matter: `make run` (the notebook series on the offline default) and `make test`.
# Both create .venv and install the project on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PRESET ?= tiny
JOBS   ?= 2

.PHONY: run test lab setup browser clean-runs gpu-headline

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# A CPU torch first: with none importable, a bare `torch` requirement would pull GBs of CUDA wheels.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev,lab]"
	touch $(STAMP)

setup: $(STAMP)

# browser: the figures' static PNGs are exported through a headless Chromium (HTML figures are written without it).
run: $(STAMP) browser
	$(BIN)/python -m overfill_lib.runner --preset $(PRESET) $(RUNFLAGS)

# Under pytest-xdist two workers share the cores: idle OpenMP threads must yield them instead of spinning (small models
# ran many times slower otherwise). Not for `make run` or benchmarks: there a sleeping thread's wake-up at each of a
# decode step's few hundred parallel kernels about doubles the step (benchmarks/cpu_decode.py).
test: export OMP_WAIT_POLICY ?= PASSIVE
test: $(STAMP) browser
	$(BIN)/python -m pytest -n $(JOBS) --dist loadgroup $(PYTEST_ARGS)

# The browser tests (tests/test_browser.py) and the PNG figures use Debian's Chromium, installed when missing and
# possible.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	      echo "apt-get could not install chromium: the browser tests will skip (or fail, under OVERFILL_REQUIRE_BROWSER=1)"; \
	  else echo "no Chromium: browser tests skip, figures are HTML only (apt-get install chromium, as root)"; fi

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root)

clean-runs:
	rm -rf runs/ artifacts/

# On a bare GPU machine (torch and transformers installed, no venv, no internet): the headline latency numbers in
# under 6 minutes, the JSON rewritten after every point. `python -m overfill_lib.headline --dry-run` shows the plan.
gpu-headline:
	$(PYTHON) -m overfill_lib.headline --device cuda --out results/gpu/headline.json
