"""Process-wide numerical configuration.

Every Numba kernel takes its ``fastmath`` flag from :data:`FASTMATH`, never from a literal
(STYLE.md; stumpy PR #1048: ``reassoc`` changes results). The reference path, and everything
that writes golden data, runs with ``FASTMATH = False``. Set the environment variable
``REFIMPL_FASTMATH=1`` *before* importing refimpl to build a fast-math variant for speed
experiments; golden generation refuses to run in that mode.
"""
import os

FASTMATH: bool = os.environ.get("REFIMPL_FASTMATH", "0") not in ("", "0", "false", "False")

#: Options shared by all serial leaf kernels (cached on disk, deterministic).
NJIT_OPTS = dict(cache=True, fastmath=FASTMATH, nogil=True)

#: No kernel is compiled with ``parallel=True``: refimpl's threads are its own pool
#: (:mod:`refimpl.threads`), which calls these cached serial kernels on row ranges.
