"""Multi-process training (issue 23, item 4): ``fit(..., strategy="ddp", devices=2,
accelerator="cpu")`` with the gloo backend, against the single-process fit with the same
effective batch.

Lightning's ``ddp`` strategy starts the other rank by re-running the command that started the
script, which under pytest would re-run pytest; so the DDP fit runs in a subprocess of its own
(this file run as a script, ``python tests/test_ddp.py OUT``), whose two ranks each write their
final parameters, loss history and the spots of every batch they trained on. The single-process
fit runs in the test's process.

Effective batch: with ``W`` ranks each rank takes ``b`` spots per step from a partition into
``ceil(n_spots / b)`` batches rounded up to a multiple of ``W``
(:class:`~pyrospatial.data.batching.SpotBatchSampler`), scales its loss by that number of
batches, and DDP averages the ranks' gradients: one step's gradient is that of the mean of
``W`` unbiased full-data estimates, i.e. of one estimate from ``W b`` spots. The
single-process reference therefore trains with ``batch_size = W b`` for the same number of
steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

N_CELLS, SEED, EPOCHS, BATCH_PER_RANK, WORLD = 1500, 3, 30, 8, 2


def _coral():
    from pyrospatial.data.sim import simulate_tissue
    from pyrospatial.methods.coral import CORAL

    tissue = simulate_tissue(n_cells=N_CELLS, n_types=3, n_proteins=10, n_genes=20, seed=SEED)
    return CORAL(tissue.cells, tissue.spots, cell_type_key="cell_type", spot_diameter=55.0, seed=SEED)


def _spot_recorder():
    import lightning as L

    class SpotRecorder(L.Callback):
        """The dataset indices of the spots of every training batch, with its epoch."""

        def __init__(self) -> None:
            self.seen: list[tuple[int, list[int]]] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.seen.append((int(trainer.current_epoch), batch.spot_index.cpu().tolist()))

    return SpotRecorder()


def _train(coral, batch_size: int, **kwargs):
    recorder = _spot_recorder()
    result = coral.train(max_epochs=EPOCHS, batch_size=batch_size, seed=SEED, device="cpu", progress=False,
                         lr=1e-2, callbacks=[recorder], **kwargs)
    return result, recorder


def _ddp_worker(out: Path) -> None:
    """Run by the subprocess (and by Lightning again as rank 1): the DDP fit, one file per rank."""
    import torch

    coral = _coral()
    result, recorder = _train(coral, BATCH_PER_RANK, strategy="ddp", devices=WORLD, accelerator="cpu")
    rank = int(result.module.global_rank)
    state = {k: v.detach().cpu() for k, v in result.module.state_dict().items()}
    torch.save(state, out / f"params_rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world_size": int(result.module.trainer.world_size), "elbo": result.elbo_history.tolist(),
        "seen": recorder.seen, "n_spots": int(coral.dataset.n_spots), "steps": int(result.settings["steps"]),
    }))


def _epoch_means(losses: np.ndarray, steps_per_epoch: int) -> np.ndarray:
    return losses[: len(losses) // steps_per_epoch * steps_per_epoch].reshape(-1, steps_per_epoch).mean(1)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_ddp_two_cpu_ranks_match_single_process(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("this torch build has no gloo backend for torch.distributed")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(20000 + os.getpid() % 20000))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(tmp_path)], check=False, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == WORLD for r in ranks)

    # 1. both ranks end with identical parameters (DDP all-reduces gradients and every rank
    # applies the same Adam update to the same starting point: equal to the last bit)
    p0, p1 = (torch.load(tmp_path / f"params_rank{r}.pt", weights_only=True) for r in range(WORLD))
    assert p0.keys() == p1.keys() and len(p0) > 0
    for name in p0:
        assert torch.equal(p0[name], p1[name]), name

    # 2. every spot is seen exactly once per epoch across the ranks (the distributed split of
    # SpotBatchSampler), and the ranks took the same number of steps
    n_spots = ranks[0]["n_spots"]
    assert ranks[0]["steps"] == ranks[1]["steps"] > 0
    for epoch in range(EPOCHS):
        seen = [s for r in ranks for e, spots in r["seen"] if e == epoch for s in spots]
        assert len(seen) == n_spots and sorted(seen) == list(range(n_spots)), epoch
        per_rank = [sorted(s for e, spots in r["seen"] if e == epoch for s in spots) for r in ranks]
        assert not set(per_rank[0]) & set(per_rank[1])

    # 3. the loss trajectory matches the single-process fit with the same effective batch
    coral = _coral()
    single, recorder = _train(coral, WORLD * BATCH_PER_RANK)
    steps_per_epoch = len(recorder.seen) // EPOCHS
    assert single.settings["steps"] == ranks[0]["steps"]
    # the DDP step's loss estimate is the mean of the ranks' (each a full-data estimate)
    ddp = np.mean([np.asarray(r["elbo"]) for r in ranks], axis=0)
    ddp_epochs, single_epochs = _epoch_means(ddp, steps_per_epoch), _epoch_means(single.elbo_history, steps_per_epoch)
    # Monte Carlo error of one epoch mean: the step-to-step noise of the loss around its trend
    # (half the variance of successive differences, which removes the slow trend), over the
    # steps of an epoch, for the difference of two independent runs. Both runs follow the same
    # optimisation path only up to that noise, so each epoch's difference must stay within
    # 5 standard errors (a two-sided 5-sigma band: a false alarm has probability < 1e-5 per
    # epoch), over the second half of training, where the fits have left the transient.
    noise = np.sqrt(0.5 * np.var(np.diff(single.elbo_history[len(single.elbo_history) // 2:])))
    se = noise * np.sqrt(2.0 / steps_per_epoch)
    half = slice(EPOCHS // 2, EPOCHS)
    diff = np.abs(ddp_epochs[half] - single_epochs[half])
    assert np.all(diff <= 5 * se), (diff / se).round(2).tolist()
    # and both runs descended by far more than that band
    assert single_epochs[0] - single_epochs[-1] > 20 * se and ddp_epochs[0] - ddp_epochs[-1] > 20 * se


if __name__ == "__main__":  # the DDP subprocess (and its second rank, started by Lightning)
    import warnings

    warnings.filterwarnings("ignore")
    _ddp_worker(Path(sys.argv[1]))
