# bootd: `make demo` runs the main job, `make test` passes the tests. Every target runs the
# idempotent set-up first (Debian packages, venv, editable install); it skips what is already there.
SHELL := /bin/bash
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup assets test demo demo-real bench clean lint deb test-systemd test-secureboot test-dashboard test-client demo-client \
	test-postgres test-failover

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

# The Debian package (README "Install on a server"): bootd_<version>_<arch>.deb in the repository root.
deb: setup
	@bash scripts/build-deb.sh

# The package under a real systemd as PID 1 (debootstrap + systemd-nspawn -b; several minutes, see README).
test-systemd: setup
	@BOOTD_SYSTEMD_TEST=1 $(PY) -m pytest -s tests/e2e/test_installed_unit.py $(PYTEST_ARGS)

# Secure Boot (OVMF with Microsoft's keys: shim -> signed GRUB -> signed kernel) and UEFI HTTP boot, on
# real firmware under TCG; times per phase in test-artifacts/e2e/secureboot/phases.md (~2 min, README).
test-secureboot: setup assets
	@BOOTD_SECUREBOOT_TEST=1 $(PY) -m pytest tests/e2e/test_secureboot_qemu.py $(PYTEST_ARGS)

# The dashboard watched in chromium while a QEMU PC boots three times (v1, promote v2, roll back): ~1 min, README.
test-dashboard: setup assets
	@BOOTD_DASHBOARD_TEST=1 $(PY) -m pytest tests/e2e/test_dashboard_qemu.py $(PYTEST_ARGS)

# The lab PC's screen end to end (issue 19): the client root (built by `bootctl clientroot build`, cached)
# over NBD and over NFS, two QEMU instances on VT7/VT8 under Xorg and VNC viewers, checked on the PC's own
# display; a broken client-root update promoted and rolled back. Screenshots and times in
# test-artifacts/client-screen/ (~7 min with the client-root build, ~5 min cached; README).
test-client: setup assets
	@BOOTD_CLIENT_TEST=1 $(PY) -m pytest tests/e2e/test_client_screen_qemu.py $(PYTEST_ARGS)

demo-client: setup assets
	@BOOTD_CLIENT_TEST=1 $(PY) -m pytest -s -p no:cacheprovider tests/e2e/test_client_screen_qemu.py $(PYTEST_ARGS)
	@echo "screenshots: test-artifacts/client-screen/{nbd,nfs}/*.png, times: test-artifacts/client-screen/*/result.json"

# The whole default suite with the state in PostgreSQL (issue 20): the tests start Debian's postgresql 15
# (initdb + pg_ctl in a temporary directory, Unix socket only) and give each test a database of its own;
# tests of the SQLite file itself are skipped (README "Several servers").
test-postgres: setup assets
	@BOOTD_TEST_STATE=postgresql $(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-postgres: pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

# Two bootd servers on one PostgreSQL: kill -9 the active one mid-storm (a QEMU PC and 40 simulated PCs),
# every PC boots from the standby, no address given twice (~30 s, README "Several servers").
test-failover: setup assets
	@BOOTD_FAILOVER_TEST=1 $(PY) -m pytest tests/e2e/test_failover_qemu.py $(PYTEST_ARGS)

# DEMO_ARGS=--uefi (OVMF) or --secureboot (OVMF, Secure Boot on: shim -> signed GRUB -> signed kernel)
demo: setup assets
	@$(PY) scripts/demo.py $(DEMO_ARGS)

# A real Debian 12 (built by scripts/build-real-os.sh) imported as a native image: the lab PC boots the
# snapshot's own kernel with its root over NBD; update -> new kernel; rollback -> old one (minutes, README).
demo-real: setup assets
	@BOOTD_REALOS_TEST=1 $(PY) -m pytest -s -p no:cacheprovider tests/e2e/test_real_os.py $(PYTEST_ARGS)

bench: setup assets
	@$(PY) benchmarks/run_all.py $(BENCH)

clean:
	rm -rf .cache .pytest_cache test-artifacts *.egg-info bootd_*.deb
