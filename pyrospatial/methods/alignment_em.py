"""The M-step of the alignment's match noise, as a Lightning callback of :func:`pyrospatial.fit`.

:class:`~pyrospatial.guides.alignment.AlignmentGuide` only samples (it keeps its last plan in
``last_draw``); :class:`NoiseMStep` turns each SVI step into one round of variational EM by
updating :class:`~pyrospatial.models.alignment.AlignmentModel`'s noise buffers from that plan
once the step is done.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback

__all__ = ["NoiseMStep"]


class NoiseMStep(Callback):
    """After every training step, :meth:`AlignmentModel.update_noise` from the guide's last draw.

    Parameters
    ----------
    model, guide
        The :class:`~pyrospatial.models.alignment.AlignmentModel` whose noise is updated and the
        :class:`~pyrospatial.guides.alignment.AlignmentGuide` whose ``last_draw`` (the plan T and
        its candidates, moved coordinates and embeddings) gives the M-step's statistics.

    ``steps`` counts the M-steps run.
    """

    def __init__(self, model: Any, guide: Any) -> None:
        self.model, self.guide = model, guide
        self.steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        draw = self.guide.last_draw
        if draw is None:
            return
        self.model.update_noise(draw["T"], draw["moved"], draw["coords_b"], draw["u_a"], draw["u_b"],
                                draw["candidates"], draw["valid"])
        self.guide.last_draw = None
        self.steps += 1
