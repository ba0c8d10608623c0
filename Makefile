# Two entry points do every set-up step on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.moekit-installed
CHROMIUM_STAMP := $(VENV)/.chromium-installed
# pytest-xdist workers; CI machines have 2 cores.
WORKERS ?= 2

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch 2.13.0 lies on this machine's disk; pinning it first keeps
	# the resolver from fetching a multi-GB CUDA build for the open range in pyproject.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# The serving dashboard test drives headless Chromium (Debian's package). Installed here when missing
# and we are root; when it cannot be installed the test skips and says why.
$(CHROMIUM_STAMP): $(STAMP)
	if command -v chromium >/dev/null 2>&1; then touch $(CHROMIUM_STAMP); \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium) \
		&& touch $(CHROMIUM_STAMP) || echo "chromium could not be installed: the dashboard test will skip"; \
	else echo "chromium is missing and we are not root: the dashboard test will skip"; fi

demo: $(STAMP)
	$(PY) -m moekit demo

test: $(STAMP) $(CHROMIUM_STAMP)
	$(PY) -m pytest -q -n $(WORKERS) --durations=15

bench: $(STAMP)
	$(PY) benchmarks/moe_layer.py --quick

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
