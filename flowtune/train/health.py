"""Which checkpoints are good to go back to: the rule, and the loss judge that applies it.

A checkpoint of step ``s`` is **good** when

1. every trainable weight in it is finite: checked before every save, and a checkpoint with a
   NaN or infinite weight is never written (the run stops as diverged instead);
2. the loss of step ``s`` is *normal*: that step's gradient produced the checkpoint's weights;
3. the loss of step ``s + 1`` is *normal*, once that step was trained: it is computed with exactly
   the checkpoint's weights, so it is their most direct judge.  Until it is known (the last
   checkpoint of a run, one written on a signal) conditions 1 and 2 decide.

A per-step loss (the mean over the step's global batch) is **normal** when it is finite and at
most :data:`FACTOR` (10) times the median of the run's last :data:`WINDOW` (256) normal per-step
losses before it.  The run's first step has nothing to compare with and only needs to be finite.
Abnormal losses never enter the reference, so a divergence cannot drag the median up with it.

The reference losses are saved in every checkpoint's ``trainer_state.json``
(``loss_reference``), so a resumed run judges exactly as the uninterrupted one would.  A checkpoint
that turns out bad is marked in its ``trainer_state.json`` (``health``, see
:func:`flowtune.train.checkpoint.mark_bad`); ``train.resume=latest`` skips it.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable

FACTOR = 10.0
WINDOW = 256


class LossJudge:
    """Judges each per-step loss of a run against the run's earlier normal losses.

    Args:
        reference: The normal per-step losses before the next step, oldest first (the
            ``loss_reference`` of the checkpoint a run resumes from); only the last
            :data:`WINDOW` are kept.
    """

    def __init__(self, reference: Iterable[float] = ()):
        self._reference: deque[float] = deque((float(x) for x in reference), maxlen=WINDOW)

    def judge(self, loss: float) -> str | None:
        """None when ``loss`` is normal (it then joins the reference), else why it is not."""
        if not math.isfinite(loss):
            return f"loss {loss}"
        if self._reference:
            median = statistics.median(self._reference)
            if loss > FACTOR * median:
                return (
                    f"loss {loss:.4g}, over {FACTOR:g} x the median {median:.4g} of the "
                    f"{len(self._reference)} steps before"
                )
        self._reference.append(loss)
        return None

    @property
    def reference(self) -> list[float]:
        """The losses judged against (for ``trainer_state.json``)."""
        return list(self._reference)
