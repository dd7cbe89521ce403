"""Geometry sanity checks by statistics: units mismatches and spot layouts that lose cells.

A cells table in pixels and a spots table in microns overlap when the pixel size is not far
from 1 µm, so an extent test alone lets mismatches of 2-20x through, and the fit then trains
on a handful of cells. These checks measure, in the coordinates given:

- ``in_array``: the fraction of cells near the spot array (within ``0.75 x pitch`` of a spot
  centre, or ``spot_diameter / 2`` when larger); cells in a frame 2x larger leave ~3/4 of
  them outside it;
- ``cells_in_spots`` against ``area_in_spots``: the fraction of cells inside any spot against
  the fraction of the array's area the spots cover (both over the array region, the area by
  Monte Carlo), so that Visium-like gaps, which legitimately leave most cells outside every
  spot, are not mistaken for a mismatch;
- ``cells_per_spot`` against ``expected_per_spot``: the mean number of cells within
  ``spot_diameter / 2`` of a spot centre over all spots, against the local cell density (from
  neighbour counts) times the spot area; cells in a frame 2x smaller fill ~1/4 of the spots;
- ``cell_spacing`` (median nearest-neighbour distance of cells) against ``pitch`` (that of the
  spots): cells spaced wider than the spots means pixels against microns;
- spots that tile the plane (``pitch <= 1.05 x spot_diameter``: bins, square pseudo-spots) with ``assignment="radius"``:
  the cells between the disks (~21% on square tiles) would be dropped while their molecules
  stay in the spot counts.

A check that fails raises :class:`~pyrospatial.errors.GeometryError` naming the measured numbers
and the likely fix. ``check_geometry=False`` (or the :func:`skip_geometry_checks` context, used
by the CLI's ``--skip-geometry-checks``) turns the statistical checks off for the rare real case.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
from scipy.spatial import cKDTree

from pyrospatial.errors import CoordinateError, GeometryError, InputError

__all__ = [
    "GeometryStats",
    "check_overlap",
    "check_section_spacing",
    "check_spot_geometry",
    "checked_diameter",
    "geometry_checks_enabled",
    "median_spacing",
    "skip_geometry_checks",
]

#: below this ratio (observed / expected) a coverage statistic fails (a 2x linear mismatch gives ~0.25)
MIN_RATIO = 0.5
#: a spot layout tiles the plane when the pitch is at most this many spot diameters
TILING_PITCH = 1.05
#: fewer cells (or spots) than these and the statistics are too noisy to judge
MIN_CELLS, MIN_SPOTS = 30, 4
#: sections whose cell spacings differ by more than this factor are in different units
MAX_SECTION_RATIO = 1.6
OVERRIDE = "check_geometry=False (CLI: --skip-geometry-checks)"

_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("pyrospatial_geometry_checks", default=True)


@contextlib.contextmanager
def skip_geometry_checks() -> Iterator[None]:
    """Within this block the statistical geometry checks are off (for the rare real case, e.g.
    cells that cover only part of a spot array on purpose); extent checks still run."""
    token = _ENABLED.set(False)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def geometry_checks_enabled(check_geometry: bool = True) -> bool:
    """Whether the statistical checks run: ``check_geometry`` and no :func:`skip_geometry_checks`."""
    return bool(check_geometry) and _ENABLED.get()


def median_spacing(xy: np.ndarray) -> float:
    """Median distance of each point to its nearest other point (0.0 with < 2 points)."""
    if xy.shape[0] < 2:
        return 0.0
    return float(np.median(cKDTree(xy).query(xy, k=2)[0][:, 1]))


def checked_diameter(spot_diameter: object) -> float | None:
    """``spot_diameter`` as a float (None stays None); anything but a real number, e.g. the
    string ``"55"``, is an :class:`InputError` naming the argument."""
    if spot_diameter is None:
        return None
    if isinstance(spot_diameter, bool) or not isinstance(spot_diameter, (int, float, np.integer, np.floating)):
        raise InputError(
            f"spot_diameter must be a number in the coordinate unit (e.g. 55.0 for Visium in µm), got "
            f"{type(spot_diameter).__name__} {spot_diameter!r}; pass spot_diameter=float(...)."
        )
    value = float(spot_diameter)
    if not np.isfinite(value):
        raise InputError(f"spot_diameter must be finite and > 0, got {value}.")
    return value


def _fmt(xy: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in xy) + ")"


def check_overlap(cell_xy: np.ndarray, spot_xy: np.ndarray) -> None:
    """Cells and spots must share one coordinate frame: their boxes overlap and their extents
    agree within 20x. A single cell or spot has no extent: it must lie inside the other's box
    (grown by a margin), with its own message."""
    c_lo, c_hi = cell_xy.min(0), cell_xy.max(0)
    s_lo, s_hi = spot_xy.min(0), spot_xy.max(0)
    c_extent = float(np.max(c_hi - c_lo))
    s_extent = float(np.max(s_hi - s_lo))
    if c_extent == 0.0 or s_extent == 0.0:
        if c_extent == 0.0 and s_extent == 0.0:
            if np.allclose(c_lo, s_lo):
                return
            point_what, point, box_lo, box_hi = "cells", c_lo, s_lo, s_hi
        elif s_extent == 0.0:
            point_what, point, box_lo, box_hi = "spots", s_lo, c_lo, c_hi
        else:
            point_what, point, box_lo, box_hi = "cells", c_lo, s_lo, s_hi
        other = "spots" if point_what == "cells" else "cells"
        margin = max(c_extent, s_extent, 1e-12) * 0.5
        if np.any(point < box_lo - margin) or np.any(point > box_hi + margin):
            n_points = spot_xy.shape[0] if point_what == "spots" else cell_xy.shape[0]
            raise CoordinateError(
                f"all {n_points} {point_what} sit at one position {_fmt(point)}, outside the {other}' span "
                f"{_fmt(box_lo)}..{_fmt(box_hi)}: check that {point_what}.obsm['spatial'] holds the "
                f"positions in the same frame as {other}.obsm['spatial']."
            )
        return
    ratio = max(c_extent / s_extent, s_extent / c_extent)
    disjoint = bool(np.any(c_hi < s_lo) or np.any(s_hi < c_lo))
    if disjoint or ratio > 20:
        raise CoordinateError(
            "cells.obsm['spatial'] and spots.obsm['spatial'] do not overlap "
            f"(cells span {c_lo.round(1).tolist()}..{c_hi.round(1).tolist()}, "
            f"spots span {s_lo.round(1).tolist()}..{s_hi.round(1).tolist()}, extent ratio {ratio:.1f}). "
            "This is usually a units mismatch (e.g. pixels vs microns) or an unregistered section: "
            "rescale one of them (e.g. multiply pixel coordinates by the pixel size in µm) "
            "or register the two first."
        )


@dataclass(frozen=True)
class GeometryStats:
    """What :func:`check_spot_geometry` measured (all in the coordinate unit given)."""

    n_cells: int
    n_spots: int
    cell_spacing: float
    pitch: float
    spot_diameter: float | None
    in_array: float
    cells_in_spots: float
    area_in_spots: float
    cells_per_spot: float
    expected_per_spot: float

    def as_dict(self) -> dict:
        return asdict(self)


def _local_density(cell_xy: np.ndarray, spacing: float) -> float:
    """Cells per unit area around the median cell: neighbours within 4 cell spacings."""
    radius = 4.0 * spacing
    tree = cKDTree(cell_xy)
    # at most 5000 query cells (a fixed, evenly spaced subset): the median is stable, big data stays fast
    queries = cell_xy[np.linspace(0, cell_xy.shape[0] - 1, min(cell_xy.shape[0], 5000)).astype(int)]
    counts = tree.query_ball_point(queries, radius, return_length=True).astype(float)
    return float(np.median(counts) / (np.pi * radius**2))


def measure_spot_geometry(cell_xy: np.ndarray, spot_xy: np.ndarray, spot_diameter: float | None,
                          *, seed: int = 0) -> GeometryStats:
    """The statistics of the module docstring (needs >= 2 cells and >= 2 spots)."""
    spacing = median_spacing(cell_xy)
    pitch = median_spacing(spot_xy)
    radius = spot_diameter / 2.0 if spot_diameter else pitch / 2.0
    reach = max(0.75 * pitch, radius)
    spot_tree = cKDTree(spot_xy)
    cell_dist = spot_tree.query(cell_xy, k=1)[0]
    near = cell_dist <= reach
    in_array = float(near.mean())
    in_spot = cell_dist <= radius
    cells_in_spots = float(in_spot[near].mean()) if near.any() else 0.0
    # the area the spots cover within the array region, by Monte Carlo over the spots' box
    rng = np.random.default_rng(seed)
    lo, hi = spot_xy.min(0) - reach, spot_xy.max(0) + reach
    points = rng.uniform(lo, hi, size=(20000, 2))
    point_dist = spot_tree.query(points, k=1)[0]
    region = point_dist <= reach
    area_in_spots = float((point_dist[region] <= radius).mean()) if region.any() else 0.0
    # each cell counted once, at its nearest spot
    cells_per_spot = float(in_spot.sum() / spot_xy.shape[0])
    density = _local_density(cell_xy, spacing) if spacing > 0 else 0.0
    return GeometryStats(
        n_cells=int(cell_xy.shape[0]), n_spots=int(spot_xy.shape[0]), cell_spacing=spacing, pitch=pitch,
        spot_diameter=None if spot_diameter is None else float(spot_diameter), in_array=in_array,
        cells_in_spots=cells_in_spots, area_in_spots=area_in_spots, cells_per_spot=cells_per_spot,
        expected_per_spot=density * np.pi * radius**2,
    )


def check_spot_geometry(cell_xy: np.ndarray, spot_xy: np.ndarray, spot_diameter: float | None,
                        assignment: str, *, check_geometry: bool = True) -> GeometryStats | None:
    """Raise :class:`GeometryError` when cells and spots look like different units or the
    layout loses cells (module docstring); return the measured statistics, or None when the
    checks are off or there are too few cells or spots to judge."""
    if not geometry_checks_enabled(check_geometry):
        return None
    if cell_xy.shape[0] < MIN_CELLS or spot_xy.shape[0] < MIN_SPOTS:
        return None
    stats = measure_spot_geometry(cell_xy, spot_xy, spot_diameter)
    if not (stats.cell_spacing > 0 and stats.pitch > 0):
        return None
    measured = (f"measured: {stats.n_cells} cells, median cell spacing {stats.cell_spacing:.4g}; {stats.n_spots} "
                f"spots, pitch {stats.pitch:.4g}, spot_diameter {spot_diameter}; {stats.in_array:.1%} of cells "
                f"near the spot array; mean cells per spot {stats.cells_per_spot:.3g} against "
                f"{stats.expected_per_spot:.3g} expected from the cell density")
    if spot_diameter and spot_diameter > 2.0 * stats.pitch:
        raise GeometryError(
            f"spot_diameter={spot_diameter} is {spot_diameter / stats.pitch:.2g}x the spot pitch {stats.pitch:.4g} "
            "(the median distance between spot centres): spots would overlap. spot_diameter is likely in another "
            f"unit than spots.obsm['spatial']; give it in the coordinate unit (e.g. 55 µm for Visium with "
            f"coordinates in µm). Override with {OVERRIDE}."
        )
    if stats.cell_spacing > stats.pitch:
        factor = stats.cell_spacing / stats.pitch * 10.0
        raise GeometryError(
            f"cells are spaced wider than the spots ({measured}). Cells are usually ~5-20x denser than spots: "
            f"this looks like pixels against microns; rescale the cells' coordinates by about 1/{factor:.2g} "
            f"(or the spots' by about {factor:.2g}), e.g. multiply pixel coordinates by the pixel size in µm. "
            f"Override with {OVERRIDE}."
        )
    if stats.in_array < MIN_RATIO:
        scale = float(np.sqrt(stats.in_array))
        raise GeometryError(
            f"only {stats.in_array:.1%} of cells lie near the spot array ({measured}); cells in a coordinate "
            f"frame larger than the spots' (pixels vs microns) do this. Rescale the cells' coordinates by about "
            f"{scale:.2g} (or the spots' by about {1 / scale:.2g}); if the cells really extend beyond the spots, "
            f"drop the cells outside the array or override with {OVERRIDE}."
        )
    # below ~1 expected cell per spot (tiny spots or bins) the count says nothing
    if stats.expected_per_spot >= 1.0 and stats.cells_per_spot < MIN_RATIO * stats.expected_per_spot:
        ratio = stats.cells_per_spot / stats.expected_per_spot
        scale = 1.0 / float(np.sqrt(max(ratio, 1e-12)))
        raise GeometryError(
            f"the spots hold {ratio:.2g}x the cells the cell density predicts ({measured}; "
            f"{stats.cells_in_spots:.1%} of cells near the array lie inside a spot, against "
            f"{stats.area_in_spots:.1%} of its area): cells in a coordinate frame smaller than the spots' "
            f"(microns vs pixels) fill only part of the array. Rescale the cells' coordinates by about {scale:.2g} "
            f"(or the spots' by about {1 / scale:.2g}); if the cells really cover only part of the spot array, "
            f"drop the spots outside it or override with {OVERRIDE}."
        )
    if assignment == "radius" and spot_diameter and stats.pitch <= TILING_PITCH * spot_diameter:
        outside = 1.0 - stats.cells_in_spots
        if outside > 0.05:
            raise GeometryError(
                f"the spots tile the plane (pitch {stats.pitch:.4g} against spot_diameter {spot_diameter}, e.g. "
                f"square pseudo-spots or bins) but assignment='radius' leaves {outside:.1%} of the cells near the "
                "array outside every disk while their molecules stay in the spot counts: use "
                f"assignment='nearest' (CLI: --assignment nearest). Override with {OVERRIDE}."
            )
    return stats


def check_section_spacing(xy_a: np.ndarray, xy_b: np.ndarray, *, check_geometry: bool = True,
                          names: tuple[str, str] = ("a", "b")) -> float | None:
    """Raise :class:`GeometryError` when two sections' median cell spacings differ by more than
    :data:`MAX_SECTION_RATIO` (a section in pixels against one in microns); return the ratio
    ``spacing_a / spacing_b``, or None when off or not measurable."""
    if not geometry_checks_enabled(check_geometry):
        return None
    if min(xy_a.shape[0], xy_b.shape[0]) < MIN_SPOTS:
        return None
    s_a, s_b = median_spacing(xy_a), median_spacing(xy_b)
    if not (s_a > 0 and s_b > 0):
        return None
    ratio = s_a / s_b
    if max(ratio, 1.0 / ratio) > MAX_SECTION_RATIO:
        a, b = names
        raise GeometryError(
            f"the median cell spacing of {a} ({s_a:.4g}) is {ratio:.3g}x that of {b} ({s_b:.4g}): the two sections "
            f"look like different units (e.g. pixels vs microns). Rescale {a}'s coordinates by about {1 / ratio:.3g} "
            f"(e.g. multiply pixel coordinates by the pixel size in µm) so both are in one unit. If the densities "
            f"really differ that much, override with {OVERRIDE}."
        )
    return ratio
