"""Keep OpenBLAS's worker threads from spinning on the cores that torch needs next.

quantlm runs one BLAS routine outside torch: the Hessian sums of GPTQ are scipy's ``ssyrk`` (OpenBLAS), half the
work of a matmul. After each call OpenBLAS's workers busy-wait for 2^28 cycles (its default, about 0.1 s) before
they sleep, while torch's own threads already run the next op on the same cores. On a 2-core machine that stole
about a quarter of the calibration time (a 2-block GPTQ run at 48 x 2048 tokens: 49.8 s, 36.8 s with short
waits).

Importing quantlm therefore sets ``OPENBLAS_THREAD_TIMEOUT=4`` (OpenBLAS's shortest wait) unless it is set already.
OpenBLAS reads it once, when the library loads, and scipy's copy loads with ``scipy.linalg``: if that happened
before quantlm was imported, with the variable unset, the setting comes too late; ``syrk_would_spin()`` says so,
and the Hessians then use torch's matmul instead.
"""

from __future__ import annotations

import os
import sys

TIMEOUT_ENV = "OPENBLAS_THREAD_TIMEOUT"
SHORT_TIMEOUT = "4"

_SET_BY_USER = TIMEOUT_ENV in os.environ
_SCIPY_BLAS_LOADED_BEFORE = "scipy.linalg" in sys.modules
os.environ.setdefault(TIMEOUT_ENV, SHORT_TIMEOUT)


def syrk_would_spin() -> bool:
    """True when scipy's OpenBLAS was loaded before quantlm could shorten its threads' wait (and the user had not
    chosen a wait): its workers would then spin after every call and slow the torch ops around it."""
    return _SCIPY_BLAS_LOADED_BEFORE and not _SET_BY_USER
