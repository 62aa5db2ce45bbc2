"""``tiermem doctor`` on a kernel with userfaultfd RWP (Linux 7.3+): it selects the ``rwp`` backend."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers.timing import scaled

pytestmark = pytest.mark.rwp


def test_doctor_json_reports_rwp_and_selects_it() -> None:
    proc = subprocess.run([sys.executable, "-m", "tiermem", "doctor", "--json"], capture_output=True, text=True,
                          timeout=scaled(60))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.loads(proc.stdout)  # stdout is only the JSON
    assert rep["backends"]["rwp"] is True and rep["backends"]["uffd"] is True
    assert rep["selected_backend"] == "rwp"
    assert {"RWP", "RWP_ASYNC"} <= set(rep["uffd_features"])
