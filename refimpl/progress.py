"""The progress events every training loop reports (the library draws nothing).

A loop takes ``progress=None`` or a callable and calls it with a :class:`Step` after every
update and an :class:`EpochEnd` after every epoch. The command line turns both into one
progress bar (``refimpl.cli.common.progress_bar``); a library user may log them instead.
"""
from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class Step:
    """One optimizer update.

    ``epoch`` counts from 0; ``step`` is the update's index within the epoch and ``global_step``
    over the run (both from 0; ``global_step`` continues across a resume); ``rate`` is the mean
    firing rate of the batch where the model spikes, else None.
    """
    epoch: int
    epochs: int
    step: int
    steps_per_epoch: int
    global_step: int
    total_steps: int
    loss: float
    rate: Optional[float] = None


@dataclass(frozen=True)
class EpochEnd:
    """The end of an epoch: its mean training loss and whatever the loop measured then."""
    epoch: int
    epochs: int
    loss: float
    metrics: dict = field(default_factory=dict)
