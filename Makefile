# bootd: `make demo` runs the main job, `make test` passes the tests. Every target runs the
# idempotent set-up first (Debian packages, venv, editable install); it skips what is already there.
SHELL := /bin/bash
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup assets test demo bench clean lint

setup:
	@bash deps/setup.sh

assets: setup
	@bash scripts/build-assets.sh

# Quality gates: ruff (lint + import order) on everything, mypy (strict on the sans-IO cores and the
# boot plan, see pyproject.toml), and the C helpers compiled with warnings as errors and hardening flags.
lint: setup
	@.venv/bin/ruff check .
	@.venv/bin/mypy
	@$(PY) scripts/check_c_helpers.py

test: setup assets
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

demo: setup assets
	@$(PY) scripts/demo.py

bench: setup assets
	@$(PY) benchmarks/run_all.py $(BENCH)

clean:
	rm -rf .cache .pytest_cache test-artifacts *.egg-info
