"""Keeping freed memory in the process: no page faults for the arrays a training step reuses.

A training step allocates and frees the same few dozen arrays every step (activations, caches,
gradients; 1.3 MB each at ``B=64 H=64 L=40``, 33-67 MB at ``B=32 H=128 L=1024``). With glibc's
defaults every block of 128 KiB or more (a threshold that adapts upwards up to 32 MiB) is
``mmap``-ed and given back to the kernel when freed, and the heap's free top beyond 128 KiB is
trimmed: so each step faults all of them in again, one page fault (and a zeroed page) per 4 KiB.
Measured (issue 13): 1,900 faults per step at ``L=40`` and 30,000-35,000 at ``L=1024`` (gelu,
float64), 15-25 % of the step on the 2-core machine.

:func:`retain_freed_memory` asks glibc's ``malloc`` (``mallopt``) to serve every block from
the heap (``M_MMAP_MAX = 0``) and to keep up to 2 GiB of free memory at the heap's top
(``M_TRIM_THRESHOLD``, an ``int``): the step's arrays are then reused from the process's own
memory. Resident memory stays at the largest step's peak (what the step needs anyway); results
are unchanged (this is memory placement only). :class:`refimpl.train.TrainingRun` calls it, so
``refimpl train`` runs this way; a program that calls :func:`refimpl.model.loss_and_grads` in
its own loop may call it too. Elsewhere than glibc (macOS, musl) it does nothing and says so.
"""
import ctypes
import ctypes.util

#: ``mallopt`` parameters (glibc ``malloc.h``).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

#: Free memory kept at the top of the heap (the largest value ``mallopt``'s ``int`` takes).
TRIM_THRESHOLD = 2**31 - 1

_STATE = {"applied": None}


def retain_freed_memory():
    """Keep freed memory for reuse (see the module docstring); returns True when applied (glibc),
    False where ``mallopt`` is not available. Idempotent; process-wide."""
    if _STATE["applied"] is None:
        _STATE["applied"] = _apply()
    return _STATE["applied"]


def _apply():
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
