"""Issue 10.5-10.6: the supported peft range, its check at import, and the peft bug workarounds' gates."""

from __future__ import annotations

import configparser
import importlib.util

import peft
import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from conftest import REPO
from monai_peft import _peft_compat
from monai_peft._peft_compat import PEFT_WORKAROUNDS, SUPPORTED_PEFT, check_peft_version


def test_setup_cfg_declares_the_range_that_the_import_checks():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    requirements = [Requirement(line) for line in cfg["options"]["install_requires"].split("\n") if line.strip()]
    (peft_req,) = [r for r in requirements if r.name == "peft"]
    assert peft_req.specifier == SpecifierSet(SUPPORTED_PEFT)
    assert peft.__version__ in SpecifierSet(SUPPORTED_PEFT), "the peft this suite runs on must be a supported one"


@pytest.mark.parametrize("version", ["0.20.0", "0.17.1", "0.22.0", "0.22.0.dev0", "1.0", "not-a-version"])
def test_unsupported_peft_is_an_import_error_naming_both_versions(monkeypatch, version):
    monkeypatch.setattr(peft, "__version__", version)
    with pytest.raises(ImportError) as err:
        check_peft_version()
    assert f"peft {version} is installed" in str(err.value) and SUPPORTED_PEFT in str(err.value)


@pytest.mark.parametrize("version", ["0.21.0", "0.21.2", "0.21.3.dev0"])
def test_supported_peft_passes(monkeypatch, version):
    monkeypatch.setattr(peft, "__version__", version)
    check_peft_version()


def test_import_monai_peft_checks_the_peft_version(monkeypatch):
    """Runs the package's ``__init__`` (as a fresh module) with an unsupported peft version."""
    monkeypatch.setattr(peft, "__version__", "0.20.0")
    spec = importlib.util.spec_from_file_location("monai_peft_import_probe", REPO / "monai_peft" / "__init__.py")
    with pytest.raises(ImportError, match=r"peft 0\.20\.0 is installed.*peft>=0\.21,<0\.22"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


@pytest.mark.parametrize("key", sorted(PEFT_WORKAROUNDS))
def test_workaround_is_still_needed_by_the_installed_peft(key):
    """Fails once peft fixes the bug: then delete the entry (and what it patches) from PEFT_WORKAROUNDS."""
    workaround = PEFT_WORKAROUNDS[key]
    assert workaround.still_needed(), (
        f"peft {peft.__version__} fixes {workaround.issue} ({workaround.summary}): remove the workaround '{key}' "
        "from monai_peft/_peft_compat.py."
    )
    assert workaround.gated_on(), f"peft {peft.__version__} still has {workaround.issue}; the workaround is gated off"
    assert key in _peft_compat.apply_peft_workarounds()  # applied at import (idempotent)


def test_workaround_gates_follow_the_fix_release():
    merge_fix = PEFT_WORKAROUNDS["lora-conv3d-pointwise-merge"]
    assert merge_fix.gated_on("0.21.2") and not merge_fix.gated_on(merge_fix.fixed_in)
    unfixed = PEFT_WORKAROUNDS["lora-conv-dilation-padding-mode"]
    assert unfixed.fixed_in is None and unfixed.gated_on("9.0")
