"""Hypothesis strategies for the SSM core: physically valid parameters, small shapes, no NaN."""
import numpy as np
from hypothesis import strategies as st

from refimpl.ssm import DISCRETIZATIONS, INITS, s4d_init

inits = st.sampled_from(sorted(INITS))
discs = st.sampled_from(sorted(DISCRETIZATIONS))
# dt at the extremes of the default range and a log-uniform value in between
dts = st.one_of(st.sampled_from([1e-3, 1e-1]), st.floats(np.log(1e-3), np.log(1e-1)).map(np.exp))
# sequence lengths: tiny, powers of two, and (mostly) not powers of two
lengths = st.one_of(st.sampled_from([1, 2, 3, 64, 100, 127, 129, 257]), st.integers(1, 300))


@st.composite
def ssm_cases(draw, max_L=300, bidirectional=None, trainable_B=None):
    """(params, u, disc) with u (B, H, L) ~ N(0, 1) and S4D params from ``s4d_init``."""
    H = draw(st.integers(1, 3))
    N = 2 * draw(st.integers(1, 6))
    L = draw(lengths.filter(lambda l: l <= max_L))
    Bsz = draw(st.integers(1, 2))
    bi = draw(st.booleans()) if bidirectional is None else bidirectional
    tb = draw(st.booleans()) if trainable_B is None else trainable_B
    dt = draw(dts)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    p = s4d_init(H, N, init=draw(inits), seed=rng, dt_min=dt, dt_max=dt,
                 bidirectional=bi, trainable_B=tb)
    if tb:  # move B away from its init so its gradient is exercised in general position
        p["B_re"] = p["B_re"] + 0.3 * rng.normal(size=p["B_re"].shape)
        p["B_im"] = 0.3 * rng.normal(size=p["B_im"].shape)
    u = rng.normal(size=(Bsz, H, L))  # (B, H, L)
    return p, u, draw(discs)
