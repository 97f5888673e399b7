"""The verifier's former single module, kept as the import path of its public names: the
comparison now lives in :mod:`.tensors` (the interval primitive), :mod:`.spikes` (flip rules),
:mod:`.verify` (a candidate against the golden files) and :mod:`.check` (refimpl against its
own committed files)."""
from .check import check, check_case, recompute, staleness  # noqa: F401
from .verify import compare_case, compare_tensor, verify, verify_file  # noqa: F401
