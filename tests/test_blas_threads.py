"""quantlm.blas_threads: OpenBLAS's workers told to sleep right after each call, and the Hessians' fallback when
that comes too late. Each case runs in a fresh interpreter: the setting only acts before OpenBLAS loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, os, sys
{before}
import torch
import quantlm
from quantlm.blas_threads import syrk_would_spin
from quantlm.methods.gptq import HessianAccumulator
x = torch.randn(3, 40, 16, generator=torch.Generator().manual_seed(0))
acc = HessianAccumulator(16, "cpu", first_token_weight=4.0)
acc.add(x)
w = torch.ones(3, 40, 1)
w[:, 0] = 4.0
rows = (x * w.sqrt()).reshape(-1, 16).double()
expected = rows.T @ rows * (2.0 / 120)
print(json.dumps({{
    "timeout": os.environ.get("OPENBLAS_THREAD_TIMEOUT"),
    "would_spin": syrk_would_spin(),
    "syrk": acc._syrk is not None,
    "error": float((acc.hessian().double() - expected).abs().max() / expected.abs().max()),
}}))
"""


def _probe(before: str = "", **env) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    environ.update(env)
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(before=before)], env=environ, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_shortens_the_wait_and_the_hessian_uses_syrk():
    got = _probe()
    assert got["timeout"] == "4"
    assert not got["would_spin"] and got["syrk"]
    assert got["error"] < 1e-5


def test_a_wait_the_user_chose_is_kept():
    got = _probe(OPENBLAS_THREAD_TIMEOUT="12")
    assert got["timeout"] == "12"
    assert got["syrk"]


@pytest.mark.parametrize("user_timeout", [None, "28"])
def test_scipy_blas_loaded_first_falls_back_to_torch_unless_the_user_chose(user_timeout):
    env = {} if user_timeout is None else {"OPENBLAS_THREAD_TIMEOUT": user_timeout}
    got = _probe(before="import scipy.linalg", **env)
    assert got["would_spin"] is (user_timeout is None)
    assert got["syrk"] is (user_timeout is not None)
    assert got["error"] < 1e-5  # the same Hessian either way
