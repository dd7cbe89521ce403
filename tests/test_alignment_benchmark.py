"""The scoring of the alignment benchmark (benchmarks/alignment.py) on hand-built couplings and
records: label mass, and the issue-20 targets, in which a reference is never the best peer."""

from __future__ import annotations

import numpy as np
import pytest

from benchmark_modules import load_benchmark


@pytest.fixture(scope="module")
def bench():
    """benchmarks/alignment.py, imported by path (benchmarks/ is not a package)."""
    return load_benchmark("alignment", "alignment_bench")


def test_label_mass_counts_only_the_mass_between_equal_labels(bench):
    la, lb = np.array(["x", "x", "y"]), np.array(["x", "y", "y"])
    coupling = np.array([[0.2, 0.1, 0.0], [0.0, 0.3, 0.0], [0.0, 0.1, 0.3]])
    # equal labels: (0, 0) 0.2, (2, 1) 0.1, (2, 2) 0.3 of a total 1.0
    assert bench.label_agreement(coupling, la, lb) == pytest.approx(0.6)


def _record(method: str, accuracy: float, case: str = "stahl_real") -> dict:
    return {"case": case, "slices": [1, 2], "method": method, "accuracy": accuracy, "finished": True,
            "match_ece": 0.2, "match_overconfidence": 0.01, "best_label_ece": 0.1, "label_ece": 0.1}


def test_a_reference_is_named_but_never_the_best_peer(bench):
    """The expression-only reference scores above every peer here; the target still compares
    pyrospatial with the best *peer* (FGW) and names the reference beside it. Counting the
    reference as a peer would report 'missed by 0.150'."""
    records = [_record("pyrospatial", 0.70), _record("pot_fgw", 0.75), _record("paste", 0.60),
               _record("expression_emd", 0.85)]
    row = next(line for line in bench.targets(records) if line.startswith("| stahl_real 1-2"))
    assert "best peer pot_fgw 0.750" in row
    assert "accuracy missed by 0.050" in row
    assert "expression_emd: 0.850" in row
    assert "expression_emd" in bench.REFERENCES and "expression_emd" not in bench.METHODS


def test_adjacent_label_agreement_counts_ring_one_pairs_at_any_scale(bench):
    """A 4 x 4 unit lattice, left half 'x', right half 'y': 42 adjacent pairs within 1.5 spacings
    (12 horizontal, 12 vertical, 18 diagonal), of which 32 share a label (8 horizontal, all 12
    vertical, the 12 diagonals not across the middle). The unit is the lattice's own spacing, so
    coordinates in microns give the same figure."""
    xy = np.array([(x, y) for x in range(4) for y in range(4)], dtype=float)
    labels = np.where(xy[:, 0] < 2, "x", "y")
    assert bench.neighbour_label_agreement(xy, labels) == pytest.approx(32 / 42)
    assert bench.neighbour_label_agreement(100.0 * xy, labels) == pytest.approx(32 / 42)
