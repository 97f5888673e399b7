"""The largest sizes a conform example may have (without hypothesis: the CLI declares its
``--max-*`` options from :class:`Limits` when it starts, and imports the engine only when
``refimpl conform`` runs)."""
import dataclasses
import numbers

import numpy as np

#: Limits field -> the CLI option that sets it (error messages name the option).
OPTIONS = {"batch": "--max-batch", "channels": "--max-channels", "length": "--max-length",
           "state": "--max-state", "vocab": "--max-vocab", "features": "--max-features"}


@dataclasses.dataclass(frozen=True)
class Limits:
    """The largest sizes an example may have; every size is drawn in ``1 .. limit``.

    Parameters
    ----------
    batch : int, default 2
        ``B``.
    channels : int, default 16
        ``H``, the model width (also the width of GLU, GSU, the embedding and the decoder).
    length : int, default 128
        ``L``, the sequence length.
    state : int, default 16
        ``N``, the real state size of the S4D ops (even: ``N2 = N // 2`` complex modes).
    vocab : int, default 64
        ``V``: the vocabulary of the embedding and the LM decoder, the classes of the
        cross-entropy.
    features : int, default 32
        The input and output widths of ``linear`` (which are not ``H``).
    """

    batch: int = 2
    channels: int = 16
    length: int = 128
    state: int = 16
    vocab: int = 64
    features: int = 32

    def check(self):
        """Return ``self`` if every limit is an integer >= 1 (``state``: even, >= 2);
        ``TypeError``/``ValueError`` naming the CLI option otherwise."""
        for field, option in OPTIONS.items():
            value = getattr(self, field)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{option} must be an integer, got {value!r}")
            if value < 1:
                raise ValueError(f"{option} must be >= 1, got {value}")
        if self.state < 2 or self.state % 2:
            raise ValueError(f"--max-state must be even and >= 2 (the real state size N = 2 N2 "
                             f"of N2 complex modes), got {self.state}")
        return self
