"""A killed fit resumes (issue 17, item 1): checkpoints are written during training, atomically,
and a fit killed with SIGKILL and resumed reaches the same parameters and posterior summaries
as an uninterrupted fit with the same seed.

The kill test runs real processes: an uninterrupted CORAL fit, a fit killed with SIGKILL at a
seeded random moment after its first checkpoint, and its resumption in a fresh process. All
three run on one CPU thread (``OMP_NUM_THREADS=1``), so the same arithmetic happens in the same
order and the comparison is exact.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from pyro.infer.autoguide import AutoNormal
from test_infer import Conjugate, GlobalLocal, NBRegression, make_dataset

from pyrospatial.engine.batch import batch_plates
from pyrospatial.engine.checkpoint import (
    CHECKPOINT_NAME,
    PeriodicCheckpoint,
    read_checkpoint,
)
from pyrospatial.engine.infer import fit
from pyrospatial.errors import CheckpointError, InputError

pytestmark = pytest.mark.filterwarnings(
    "ignore:Found plate statements in guide but not model",
    "ignore:.*does not have many workers",
    "ignore:CORAL.interactions",
)

#: the fit each process runs: CORAL on a small simulated tissue (200 cells), two spots
#: per minibatch (3 batches an epoch over 6 spots), a checkpoint every 7 steps as well as after every epoch
#: (so a resume may start in the middle of an epoch or at its start), 200 steps; then the
#: guide's posterior means.
WORKER = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
import torch
import pyrospatial as ps
from pyrospatial.data.sim import simulate_tissue
from pyrospatial.engine.infer import SVIModule

ck, out, resume = sys.argv[1], sys.argv[2], sys.argv[3] == "resume"
tissue = simulate_tissue(n_cells=200, n_types=3, n_proteins=10, n_genes=25, seed=3, cells_per_spot=8.0)
coral = ps.CORAL(tissue.cells, tissue.spots, cell_type_key="cell_type", spot_diameter=55.0)
result = coral.train(max_steps=200, max_epochs=None, batch_size=2, seed=4, progress=False,
                     checkpoint_dir=None if ck == "-" else ck, resume="last" if resume else None,
                     checkpoint_every_n_steps=7)
post = coral.sample(10, seed=5, method="guide", progress=False)
means = {k: torch.as_tensor(v).double().mean(0) for k, v in post.samples.items()}
torch.save({"state": SVIModule(coral.model, coral.guide).state_dict(), "means": means,
            "elbo": torch.as_tensor(result.elbo_history)}, out)
print(json.dumps({"steps": result.settings["steps"], "resumed_from": result.settings["resumed_from"]}))
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _start_worker(ck: str, out: Path, mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER, ck, str(out), mode], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> dict:
    stdout, stderr = process.communicate(timeout=200)
    assert process.returncode == 0, stderr[-2000:]
    return json.loads(stdout.strip().splitlines()[-1])


def _load_equal(a: Path, b: Path) -> None:
    """Parameters, posterior means and ELBO histories of two worker results are bit-identical
    (same arithmetic in the same order on one CPU thread)."""
    one, two = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert one["state"].keys() == two["state"].keys()
    for key in one["state"]:
        torch.testing.assert_close(two["state"][key], one["state"][key], rtol=0, atol=0, msg=key)
    assert one["means"].keys() == two["means"].keys() and one["means"]
    for key in one["means"]:
        torch.testing.assert_close(two["means"][key], one["means"][key], rtol=0, atol=0, msg=key)
    np.testing.assert_array_equal(two["elbo"].numpy(), one["elbo"].numpy())
    assert len(one["elbo"]) == 200


def test_sigkilled_coral_fit_resumes_to_the_uninterrupted_result(tmp_path):
    ck = tmp_path / "ck"
    killed = _start_worker(str(ck), tmp_path / "killed.pt", "fresh")
    deadline = time.monotonic() + 240
    while not (ck / CHECKPOINT_NAME).exists():
        assert killed.poll() is None, f"the fit ended before its first checkpoint: {killed.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.02)
    # a seeded random moment after the first checkpoint (the fit runs ~10 s more)
    time.sleep(random.Random(17).uniform(0.2, 2.5))
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed.pt").exists()  # it did not finish
    interrupted_at = int(read_checkpoint(ck / CHECKPOINT_NAME, for_resume=True)["global_step"])
    assert 0 < interrupted_at < 200
    assert all(p.name == CHECKPOINT_NAME or p.name.startswith(".last.ckpt.tmp-") for p in ck.iterdir())

    # the uninterrupted run (no checkpoints) and the resumption, side by side in fresh processes
    full = _start_worker("-", tmp_path / "full.pt", "fresh")
    resumed = _start_worker(str(ck), tmp_path / "resumed.pt", "resume")
    assert _finish(full)["steps"] == 200
    info = _finish(resumed)
    assert info["steps"] == 200 and info["resumed_from"].endswith(CHECKPOINT_NAME)
    _load_equal(tmp_path / "full.pt", tmp_path / "resumed.pt")



# ------------------------------------------------------------------------------ in process
def _pair(cls=GlobalLocal):
    model = cls()
    return model, AutoNormal(model, create_plates=batch_plates)


KW = {"batch_size": 20, "lr": 0.05, "lr_decay": 0.99, "seed": 7, "progress": False}


@pytest.fixture(scope="module")
def small_ds():
    return make_dataset()


@pytest.fixture(scope="module")
def uninterrupted(small_ds):
    model, guide = _pair()
    result = fit(model, guide, small_ds, max_epochs=4, **KW)
    return {k: v.detach().clone() for k, v in guide.state_dict().items()}, result.elbo_history


@pytest.mark.parametrize("stop", [3, 5, 8, 13])
def test_resume_from_the_middle_or_the_end_of_an_epoch_is_exact(small_ds, uninterrupted, tmp_path, stop):
    """5 batches an epoch: stops 3, 8, 13 are mid-epoch, 5 an epoch boundary."""
    model, guide = _pair()
    first = fit(model, guide, small_ds, max_epochs=4, max_steps=stop, checkpoint_dir=tmp_path, **KW)
    assert first.settings["steps"] == stop
    model, guide = _pair()
    resumed = fit(model, guide, small_ds, max_epochs=4, checkpoint_dir=tmp_path, resume="last", **KW)
    state, history = uninterrupted
    assert resumed.settings["steps"] == 20
    for key, value in guide.state_dict().items():
        assert torch.equal(value, state[key]), key
    np.testing.assert_array_equal(resumed.elbo_history, history)


def test_resuming_a_finished_fit_returns_it_as_it_was(small_ds, uninterrupted, tmp_path):
    model, guide = _pair()
    fit(model, guide, small_ds, max_epochs=4, checkpoint_dir=tmp_path, **KW)
    model, guide = _pair()
    again = fit(model, guide, small_ds, max_epochs=4, checkpoint_dir=tmp_path, resume="last", **KW)
    state, history = uninterrupted
    assert again.settings["steps"] == 20 and again.settings["resumed_from"].endswith(CHECKPOINT_NAME)
    for key, value in guide.state_dict().items():
        assert torch.equal(value, state[key]), key
    np.testing.assert_array_equal(again.elbo_history, history)


def test_checkpoints_are_written_during_training_at_the_intervals(small_ds, tmp_path, monkeypatch):
    """Every write is recorded with the step it holds; the file is replaced atomically."""
    writes: list[tuple[int, int, int]] = []
    replace = os.replace

    def recording_replace(src, dst):
        assert Path(src).parent == Path(dst).parent and Path(src).name.startswith(".last.ckpt.tmp-")
        state = torch.load(src, weights_only=True)  # complete before it is renamed
        writes.append((int(state["global_step"]), int(state["epoch"]), int(state["loops"]["fit_loop"]["state_dict"]
                                                                               .get("combined_loader", [{}])[0]
                                                                               .get("completed", -1))))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    model, guide = _pair()
    # 5 batches an epoch, 12 steps: by steps at 4 and 8, by epochs at 5 and 10, at the end 12
    fit(model, guide, small_ds, max_steps=12, checkpoint_dir=tmp_path, checkpoint_every_n_steps=4,
        checkpoint_every_n_epochs=1, checkpoint_every_seconds=None, **KW)
    assert [w[0] for w in writes] == [4, 5, 8, 10, 12]
    assert [w[2] for w in writes] == [4, 5, 3, 5, 2]  # batches of the epoch already trained on
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]
    # wall-time trigger: with a 0-second interval every step writes
    writes.clear()
    model, guide = _pair()
    fit(model, guide, small_ds, max_steps=7, checkpoint_dir=tmp_path / "t", checkpoint_every_n_epochs=None,
        checkpoint_every_seconds=1e-9, **KW)
    assert [w[0] for w in writes] == [1, 2, 3, 4, 5, 6, 7]


def test_truncated_or_random_checkpoint_gives_checkpoint_error(small_ds, tmp_path):
    model, guide = _pair()
    fit(model, guide, small_ds, max_steps=3, checkpoint_dir=tmp_path, **KW)
    path = tmp_path / CHECKPOINT_NAME
    data = path.read_bytes()
    for name, content in (("truncated", data[: len(data) // 2]),
                          ("random", np.random.default_rng(0).bytes(len(data))),
                          ("empty", b"")):
        path.write_bytes(content)
        model, guide = _pair()
        with pytest.raises(CheckpointError) as info:
            fit(model, guide, small_ds, max_steps=6, checkpoint_dir=tmp_path, resume="last", **KW)
        message = str(info.value)
        assert str(path) in message and "corrupt or truncated" in message, (name, message)
        assert "Delete it" in message and "without --resume" in message
    # a checkpoint of another model: the key mismatch is named
    path.write_bytes(data)
    other = NBRegression(small_ds.n_genes)
    with pytest.raises(CheckpointError, match="does not match the model/guide"):
        fit(other, AutoNormal(other, create_plates=batch_plates), small_ds, max_steps=6, checkpoint_dir=tmp_path,
            resume="last", **KW)
    # other settings than the interrupted fit's are refused, naming them
    model, guide = _pair()
    with pytest.raises(CheckpointError, match=r"seed: checkpoint 7 vs now 8.*|batch_size"):
        fit(model, guide, small_ds, max_steps=6, checkpoint_dir=tmp_path, resume="last", **{**KW, "seed": 8})
    # parameters only (not training state)
    torch.save({"state_dict": read_checkpoint(path)["state_dict"]}, tmp_path / "params.ckpt")
    model, guide = _pair()
    with pytest.raises(CheckpointError, match="no training state"):
        fit(model, guide, small_ds, max_steps=6, resume=tmp_path / "params.ckpt", **KW)
    # a stale temporary file of a process killed mid-write is removed by the next fit
    (tmp_path / ".last.ckpt.tmp-99999").write_bytes(b"partial")
    model, guide = _pair()
    fit(model, guide, small_ds, max_steps=6, checkpoint_dir=tmp_path, resume="last", **KW)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME, "params.ckpt"]


def test_epoch_mean_and_early_stopping_survive_a_mid_epoch_resume(small_ds, tmp_path):
    """The epoch mean (early stopping's metric) is accumulated in the checkpoint, so a fit
    resumed mid-epoch stops at the same epoch as an uninterrupted one."""
    stop = {"patience": 1, "min_delta": 0.0}
    model, guide = _pair(Conjugate)
    full = fit(model, guide, small_ds, max_epochs=40, early_stopping=stop, **KW)
    model, guide = _pair(Conjugate)
    fit(model, guide, small_ds, max_epochs=40, max_steps=7, early_stopping=stop, checkpoint_dir=tmp_path, **KW)
    model, guide = _pair(Conjugate)
    resumed = fit(model, guide, small_ds, max_epochs=40, early_stopping=stop, checkpoint_dir=tmp_path,
                  resume="last", **KW)
    assert resumed.settings["steps"] == full.settings["steps"]
    assert resumed.settings["epochs"] == full.settings["epochs"]
    np.testing.assert_array_equal(resumed.elbo_history, full.elbo_history)


def test_periodic_checkpoint_rejects_bad_intervals(tmp_path):
    with pytest.raises(InputError, match="checkpoint_every_n_steps"):
        PeriodicCheckpoint(tmp_path, every_n_steps=-1)
    with pytest.raises(InputError, match="checkpoint_every_seconds"):
        PeriodicCheckpoint(tmp_path, every_seconds="2 minutes")


def test_cli_checkpoint_flags_reach_the_fit(tmp_path, monkeypatch):
    import anndata as ad

    from pyrospatial import cli
    from pyrospatial.data.sim import simulate_tissue
    from pyrospatial.methods import coral as coral_module

    tissue = simulate_tissue(n_cells=200, n_types=3, n_proteins=10, n_genes=25, seed=3, cells_per_spot=8.0)
    tissue.cells.write_h5ad(tmp_path / "cells.h5ad")
    tissue.spots.write_h5ad(tmp_path / "spots.h5ad")
    seen: list[dict] = []
    real_fit = coral_module.fit

    def recording_fit(*args, **kwargs):
        seen.append({k: kwargs.get(k) for k in ("checkpoint_dir", "resume")})
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(coral_module, "fit", recording_fit)
    ck = tmp_path / "ck"
    base = ["coral", "--cells", str(tmp_path / "cells.h5ad"), "--spots", str(tmp_path / "spots.h5ad"),
            "--cell-type-key", "cell_type", "--spot-diameter", "55", "--max-epochs", "3", "--batch-size", "4",
            "--posterior", "guide", "--num-samples", "3", "--no-progress", "--checkpoint-dir", str(ck)]
    assert cli.main([*base, "--out", str(tmp_path / "out1")]) == 0
    assert seen[-1] == {"checkpoint_dir": str(ck), "resume": None}
    assert (ck / CHECKPOINT_NAME).is_file()
    assert cli.main([*base, "--out", str(tmp_path / "out2"), "--resume"]) == 0
    assert seen[-1] == {"checkpoint_dir": str(ck), "resume": "last"}
    first = ad.read_h5ad(tmp_path / "out1" / "cells.h5ad")
    second = ad.read_h5ad(tmp_path / "out2" / "cells.h5ad")
    np.testing.assert_array_equal(first.obsm["z_mean"], second.obsm["z_mean"])
    # --resume without --checkpoint-dir is a clear error (exit code 2)
    assert cli.main([*base[:-2], "--out", str(tmp_path / "out3"), "--resume"]) == 2
    parser = cli.build_parser()
    for argv in (["deconvolve", "--spots", "s", "--reference", "r", "--cell-type-key", "k", "--out", "o"],
                 ["align", "a", "b", "--out", "o"], ["fit", "--cells", "c", "--spots", "s", "--cell-type-key", "k",
                                                     "--out", "o"]):
        args = parser.parse_args([*argv, "--checkpoint-dir", "ck", "--resume"])
        assert cli.checkpoint_kwargs(args) == {"checkpoint_dir": "ck", "resume": "last"}
    # coral's default posterior checkpoints into the same folder (tests/test_posterior_resume.py)
    coral_argv = ["fit", "--cells", "c", "--spots", "s", "--cell-type-key", "k", "--out", "o"]
    args = parser.parse_args([*coral_argv, "--checkpoint-dir", "ck", "--resume"])
    assert cli.posterior_checkpoint_kwargs(args) == {"checkpoint": str(Path("ck") / "posterior.pt"), "resume": True}
    assert cli.posterior_checkpoint_kwargs(parser.parse_args([*coral_argv, "--checkpoint-dir", "ck"]))["resume"] is False
    assert cli.posterior_checkpoint_kwargs(parser.parse_args([*coral_argv, "--checkpoint-dir", "ck", "--posterior",
                                                              "guide"])) == {}
    assert cli.posterior_checkpoint_kwargs(parser.parse_args(coral_argv)) == {}
