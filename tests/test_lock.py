"""requirements.lock is what `make test` / `.ci/run` install, and the environment under test holds
exactly it (`make test-latest` tests the newest versions instead and sets RACC_UNLOCKED)."""

from __future__ import annotations

import os
import re
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"


def _pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        assert match, f"requirements.lock: '{line}' is not name==version"
        pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def test_the_lock_pins_every_dependency_torch_and_torchvision_included():
    pins = _pins()
    for name in ("torch", "torchvision", "onnxruntime", "onnx", "numpy", "pip", "pytest"):
        assert name in pins, name
    requires = metadata.requires("racc") or []
    for requirement in requires:
        name = re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0).lower().replace("_", "-")
        assert name in pins or name == "racc", f"{name} (a racc dependency) is not in the lock"


def test_make_installs_from_the_lock_and_nothing_else():
    makefile = (ROOT / "Makefile").read_text()
    install = makefile.split("$(STAMP): ")[1].split("\n\n")[0]
    assert "--no-deps -r $(LOCK)" in install and "pip check" in install
    assert "test-latest:" in makefile and "RACC_UNLOCKED" in makefile


@pytest.mark.skipif(bool(os.environ.get("RACC_UNLOCKED")), reason="make test-latest: unlocked")
def test_this_environment_holds_the_locked_versions():
    wrong = {}
    for name, version in _pins().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            wrong[name] = (version, installed)
    assert not wrong, f"locked vs installed: {wrong}; run make install"
