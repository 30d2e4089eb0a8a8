"""Fixtures for the end-to-end tests: the client assets and a per-test artifacts directory."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from harness import ROOT, ensure_assets

E2E_ARTIFACTS = ROOT / "test-artifacts" / "e2e"


@pytest.fixture(scope="session")
def assets():
    return ensure_assets()


def artifacts_for(name: str) -> Path:
    """Serial logs and bootd's log of a test: kept in test-artifacts/e2e/<name>/ (CI uploads them)."""
    d = E2E_ARTIFACTS / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


@pytest.fixture
def pc_logs(request):
    return artifacts_for(request.node.name)
