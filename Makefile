# Two set-up commands on a fresh machine:  `make run` (install + start the daemon), `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel keeps tests light; on a GPU box install the torch build for your CUDA instead.
TORCH  ?= torch==2.13.0
# Four pytest workers (pytest-xdist) on two cores, a test module per worker so its daemon fixture is started
# once: most real-daemon tests wait on settle windows and drains, which then overlap (measured here on the
# same tree: -n 2 292 s, -n 4 203 s). PYTEST_ARGS= runs serially.
PYTEST_ARGS ?= -n 4 --dist loadfile

.PHONY: run test test-fast lint bench install install-remote clean systemd-check image-check

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[test,wav2lip,web,remote]'
	touch $@

# mypy reads the types of everything the code imports: the test venv plus the pinned linters.
$(VENV)/.installed-lint: $(VENV)/.installed-test
	$(BIN)/python -m pip install -q -e '.[test,wav2lip,web,remote,lint]'
	touch $@

install: $(VENV)/.installed

# A GPU host running `heygem-daemon worker`, or a daemon with workers.remote: the venv with Celery and redis-py.
$(VENV)/.installed-remote: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[remote]'
	touch $@

install-remote: $(VENV)/.installed-remote

run: $(VENV)/.installed
	$(BIN)/heygem-daemon -c config.yaml run

# Debian's systemd-analyze, chromium-driver, redis-server and nginx: the suite drives them (installed as root).
test: $(VENV)/.installed-test
	tests/system/packages.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The in-process part: everything but the tests that start the real daemon (pytest marker `daemon`).
test-fast: $(VENV)/.installed-test
	tests/system/packages.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS) -m "not daemon"

# Three gates, each failing with its own message: ruff (rules in pyproject.toml), mypy against the baseline
# that may only shrink (.ci/mypy_gate.py), and the package import contracts (import-linter, pyproject.toml).
lint: $(VENV)/.installed-lint
	@echo "=== ruff: pyflakes, pycodestyle at 120, bugbear, blocking calls in async code ==="
	$(BIN)/ruff check .
	@echo "=== mypy (pydantic plugin) against .ci/mypy-baseline.txt ==="
	$(BIN)/python .ci/mypy_gate.py
	@echo "=== import-linter: the direction of the package graph (docs/architecture.md) ==="
	$(BIN)/lint-imports --no-cache

bench: $(VENV)/.installed-test
	$(BIN)/python bench/intake.py
	$(BIN)/python bench/outputs.py
	$(BIN)/python bench/idle.py
	$(BIN)/python bench/delivery.py
	$(BIN)/python bench/preview.py
	$(BIN)/python bench/upload.py
	$(BIN)/python bench/zip.py
	$(BIN)/python bench/wav2lip.py
	$(BIN)/python bench/web.py
	$(BIN)/python bench/remote.py
	$(BIN)/python bench/remote_transfer.py
	$(BIN)/python bench/outage_wake.py
	$(BIN)/python bench/speech.py

# As root on a Debian/Ubuntu host: boots a container with systemd and replays README "Install as a service".
systemd-check:
	tests/system/systemd_check.sh

# As root on a Debian/Ubuntu host: builds the Containerfile with buildah (no registry, no docker daemon) and runs
# the image's own command, user and settings under systemd-nspawn (README "Run in containers").
image-check:
	tests/system/image_check.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .import_linter_cache .grimp_cache
