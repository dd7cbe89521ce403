"""A killed default posterior resumes: CORAL's per-spot HMC writes its whole state
(``checkpoint=``), and a sampler killed with SIGKILL in the middle of its warm-up (after Monte
Carlo EM has moved the model's parameters) and resumed in a fresh process returns exactly the
draws of an uninterrupted run. A corrupt checkpoint, one of other settings and one of other
trained parameters are refused with an error that names the file or the difference.

All processes run on one CPU thread, so the same arithmetic happens in the same order and the
comparison is exact.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pyrospatial.errors import CheckpointError, InputError

pytestmark = pytest.mark.filterwarnings("ignore")

#: the sampler's settings in every process: 4 chains, 24 warm-up iterations (EM from the 6th,
#: a mass update after the 21st), 12 kept iterations; 3 chunks so the read-out's step sums over chunks
SAMPLER = dict(num_chains=4, num_warmup=24, thin=1, num_steps=4, max_cells_per_chunk=80)
NUM_SAMPLES = 48
TOTAL_ITERATIONS = 24 + 12

WORKER = r"""
import ast, sys, warnings
warnings.filterwarnings("ignore")
import numpy as np, torch
import pyrospatial as ps
from pyrospatial.data.sim import simulate_tissue

ck, out, resume = sys.argv[1], sys.argv[2], sys.argv[3] == "resume"
settings = ast.literal_eval(sys.argv[4])
tissue = simulate_tissue(n_cells=200, n_types=3, n_proteins=10, n_genes=25, seed=3, cells_per_spot=8.0)
coral = ps.CORAL(tissue.cells, tissue.spots, cell_type_key="cell_type", spot_diameter=55.0)
coral.train(max_epochs=30, batch_size=None, seed=4, progress=False)
extra = {} if ck == "-" else {"checkpoint": ck, "resume": resume, "checkpoint_every_s": 0.0}
post = coral.sample(int(sys.argv[5]), seed=5, **settings, **extra)
np.savez(out, **{k: np.asarray(v) for k, v in post.samples.items()},
         resumed_at=np.asarray(-1 if post.diagnostics["resumed_at"] is None else post.diagnostics["resumed_at"]))
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _start(ck: str, out: Path, mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER, ck, str(out), mode, repr(SAMPLER), str(NUM_SAMPLES)],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> None:
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-2000:]


def _iteration(path: Path) -> int:
    """The iteration of the checkpoint on disk (-1 while there is none; writes are atomic)."""
    if not path.is_file():
        return -1
    return int(torch.load(path, map_location="cpu", weights_only=True)["iteration"])


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("posterior_resume")
    ck = folder / "posterior.pt"
    uninterrupted = _start("-", folder / "uninterrupted.npz", "fresh")
    killed = _start(str(ck), folder / "never.npz", "fresh")
    deadline = time.monotonic() + 240
    while _iteration(ck) < 12 and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    killed_at = _iteration(ck)
    resumed = _start(str(ck), folder / "resumed.npz", "resume")
    _finish(resumed)
    _finish(uninterrupted)
    return folder, killed.returncode, killed_at


def test_killed_posterior_resumes_to_the_same_draws(killed_and_resumed):
    folder, returncode, killed_at = killed_and_resumed
    assert returncode == -signal.SIGKILL  # killed, not finished
    assert 12 <= killed_at < TOTAL_ITERATIONS  # in the warm-up or sampling, after EM began
    assert not (folder / "never.npz").exists()
    resumed, reference = np.load(folder / "resumed.npz"), np.load(folder / "uninterrupted.npz")
    assert int(resumed["resumed_at"]) == killed_at and int(reference["resumed_at"]) == -1
    names = sorted(k for k in reference.files if k != "resumed_at")
    assert {"z", "v", "cell_size"} <= set(names) and sorted(k for k in resumed.files if k != "resumed_at") == names
    for name in names:
        np.testing.assert_array_equal(resumed[name], reference[name], err_msg=name)
    # the finished run's checkpoint holds its last iteration: resuming it again draws nothing new
    assert _iteration(folder / "posterior.pt") == TOTAL_ITERATIONS


@pytest.fixture(scope="module")
def trained():
    import pyrospatial as ps
    from pyrospatial.data.sim import simulate_tissue

    torch.set_num_threads(1)
    tissue = simulate_tissue(n_cells=200, n_types=3, n_proteins=10, n_genes=25, seed=3, cells_per_spot=8.0)
    coral = ps.CORAL(tissue.cells, tissue.spots, cell_type_key="cell_type", spot_diameter=55.0)
    coral.train(max_epochs=30, batch_size=None, seed=4, progress=False)
    return coral


def test_finished_checkpoint_is_reused_and_bad_ones_are_refused(killed_and_resumed, trained, tmp_path):
    folder, _, _ = killed_and_resumed
    ck = tmp_path / "posterior.pt"
    ck.write_bytes((folder / "posterior.pt").read_bytes())
    reference = np.load(folder / "uninterrupted.npz")
    # the finished checkpoint continues at its end: the same draws without sampling again
    post = trained.sample(NUM_SAMPLES, seed=5, **SAMPLER, checkpoint=str(ck), resume=True)
    assert post.diagnostics["resumed_at"] == TOTAL_ITERATIONS
    np.testing.assert_array_equal(np.asarray(post.samples["z"]), reference["z"])

    with pytest.raises(CheckpointError, match="num_warmup: checkpoint 24, this run 30"):
        trained.sample(NUM_SAMPLES, seed=5, **{**SAMPLER, "num_warmup": 30}, checkpoint=str(ck), resume=True)
    with pytest.raises(CheckpointError, match="seed: checkpoint 5, this run 6"):
        trained.sample(NUM_SAMPLES, seed=6, **SAMPLER, checkpoint=str(ck), resume=True)
    saved = {name: value.detach().clone() for name, value in trained.model.named_parameters()}
    with torch.no_grad():
        next(iter(trained.model.parameters())).add_(1e-3)  # other trained weights
    try:
        with pytest.raises(CheckpointError, match="trained parameters"):
            trained.sample(NUM_SAMPLES, seed=5, **SAMPLER, checkpoint=str(ck), resume=True)
    finally:
        with torch.no_grad():
            for name, value in trained.model.named_parameters():
                value.copy_(saved[name])

    data = ck.read_bytes()
    ck.write_bytes(data[: len(data) // 2])  # a truncated file
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        trained.sample(NUM_SAMPLES, seed=5, **SAMPLER, checkpoint=str(ck), resume=True)
    assert ck.read_bytes() == data[: len(data) // 2]  # refused, not overwritten

    with pytest.raises(InputError, match="resume=True needs checkpoint"):
        trained.sample(NUM_SAMPLES, seed=5, **SAMPLER, resume=True)
    # no file yet: resume starts afresh and writes one
    fresh = tmp_path / "new" / "posterior.pt"
    trained.sample(8, seed=5, num_chains=4, num_warmup=2, thin=1, num_steps=2, checkpoint=str(fresh), resume=True)
    assert _iteration(fresh) == 2 + 2


class _Crash(Exception):
    pass


def test_per_block_step_sizes_resume_to_the_same_draws(trained, tmp_path, monkeypatch):
    """With ``block_steps`` each block's step size and its dual averaging are tensors: a run
    stopped after the checkpoint of iteration 15 (in the final step-size window) and resumed
    returns the draws of an uninterrupted run."""
    from pyrospatial.engine.local_checkpoint import SamplerCheckpoint

    settings = {**SAMPLER, "block_steps": True, "step_window": 8}
    # Monte Carlo EM leaves its estimates in the model (and CORAL then skips it): every run
    # starts from the trained weights, with EM
    weights = {k: v.clone() for k, v in trained.model.state_dict().items()}

    def as_trained():
        trained.model.load_state_dict(weights)
        trained.refined = False

    as_trained()
    reference = trained.sample(NUM_SAMPLES, seed=5, **settings)
    as_trained()
    ck = tmp_path / "posterior.pt"
    write = SamplerCheckpoint.write

    def write_then_stop(self, iteration, *args, **kwargs):
        write(self, iteration, *args, **kwargs)
        if iteration == 15:
            raise _Crash

    monkeypatch.setattr(SamplerCheckpoint, "write", write_then_stop)
    with pytest.raises(_Crash):
        trained.sample(NUM_SAMPLES, seed=5, **settings, checkpoint=str(ck), checkpoint_every_s=0.0)
    monkeypatch.undo()
    as_trained()
    saved = torch.load(ck, map_location="cpu", weights_only=True)
    assert saved["iteration"] == 15
    post = trained.sample(NUM_SAMPLES, seed=5, **settings, checkpoint=str(ck), resume=True)
    assert post.diagnostics["resumed_at"] == 15 and post.diagnostics["block_steps"] is True
    for name in ("z", "v", "cell_size"):
        np.testing.assert_array_equal(np.asarray(post.samples[name]), np.asarray(reference.samples[name]), err_msg=name)
    with pytest.raises(CheckpointError, match="block_steps: checkpoint True, this run False"):
        trained.sample(NUM_SAMPLES, seed=5, **{**settings, "block_steps": False}, checkpoint=str(ck), resume=True)
    as_trained()
