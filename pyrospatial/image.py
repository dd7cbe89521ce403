"""Morphology features of spots from a tissue image (e.g. the H&E image readers put in
``uns['spatial']``), for the ``morphology`` modality of :func:`pyrospatial.domains`.

::

    from pyrospatial.image import add_image_features
    add_image_features(adata, key="morphology", obs_columns=("nucleus_count",))
    ps.domains(adata, n_domains=7, modalities=("counts", "morphology"))

:func:`spot_features` computes, in each spot's footprint (a disc of the spot's diameter
around its centre), colour statistics (mean and standard deviation of R, G, B and of the
haematoxylin, eosin and DAB channels of the colour deconvolution of H&E) and texture
statistics of the grey image (grey-level co-occurrence contrast, homogeneity, energy and
correlation, averaged over four directions), with scikit-image. Any precomputed embedding
(e.g. of a histology foundation model) can be put in ``obsm`` instead: the domains model reads
any numeric matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from pyrospatial.errors import InputError

__all__ = ["COLOUR_CHANNELS", "TEXTURE_PROPERTIES", "add_image_features", "spot_features"]

#: Colour channels summarised (mean and sd) in each footprint.
COLOUR_CHANNELS = ("red", "green", "blue", "haematoxylin", "eosin", "dab")

#: Grey-level co-occurrence properties (scikit-image ``graycoprops``) in each footprint.
TEXTURE_PROPERTIES = ("contrast", "homogeneity", "energy", "correlation")


def _as_rgb(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] not in (3, 4):
        raise InputError(f"image must be (H, W), (H, W, 3) or (H, W, 4), got shape {img.shape}.")
    img = img[..., :3]
    if np.issubdtype(img.dtype, np.integer):
        img = img.astype(np.float64) / (255.0 if img.max() <= 255 else float(np.iinfo(img.dtype).max))
    img = np.clip(img.astype(np.float64), 0.0, 1.0)
    return img


def spot_features(
    image: np.ndarray,
    coords: np.ndarray,
    scalefactor: float,
    *,
    spot_diameter: float | None = None,
    colour: bool = True,
    texture: bool = True,
    grey_levels: int = 32,
) -> pd.DataFrame:
    """Colour and texture statistics of the image in each spot's footprint.

    Parameters
    ----------
    image
        ``(H, W, 3)`` RGB image (floats in ``[0, 1]`` or integers), or ``(H, W)`` grey.
    coords
        ``(n, 2)`` spot centres ``(x, y)`` in the units of ``obsm['spatial']``.
    scalefactor
        Image pixels per coordinate unit (scanpy's ``tissue_{lowres,hires}_scalef``):
        pixel ``(column, row) = coords * scalefactor``.
    spot_diameter
        Footprint diameter in coordinate units (scanpy's ``spot_diameter_fullres``); ``None``:
        the median distance between nearest spot centres. The footprint is at least 3 pixels
        wide, so a low-resolution image still gives each spot a few pixels.
    colour, texture
        Which statistics to compute (at least one).
    grey_levels
        Grey levels of the co-occurrence matrices.

    Returns
    -------
    pandas.DataFrame
        ``(n, n_features)``: ``{channel}_{mean,sd}`` for :data:`COLOUR_CHANNELS` and
        ``texture_{property}`` for :data:`TEXTURE_PROPERTIES`. A spot whose footprint lies
        outside the image gets the averages over the other spots.
    """
    from scipy.spatial import cKDTree
    from skimage.color import rgb2gray, rgb2hed
    from skimage.feature import graycomatrix, graycoprops

    if not (colour or texture):
        raise InputError("spot_features needs colour=True or texture=True.")
    xy = np.asarray(coords, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2 or not np.isfinite(xy[:, :2]).all():
        raise InputError(f"coords must be a finite (n, 2) array of (x, y), got shape {xy.shape}.")
    if not (np.isfinite(scalefactor) and scalefactor > 0):
        raise InputError(f"scalefactor must be a positive number (image pixels per coordinate unit), got {scalefactor}.")
    xy = xy[:, :2]
    rgb = _as_rgb(image)
    height, width = rgb.shape[:2]
    if spot_diameter is None:
        if xy.shape[0] > 1:
            dist, _ = cKDTree(xy).query(xy, k=2)
            spot_diameter = float(np.median(dist[:, 1]))
        else:
            spot_diameter = 1.0 / scalefactor
    radius = max(0.5 * float(spot_diameter) * float(scalefactor), 1.5)
    r = int(np.ceil(radius))
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    disc = (dx**2 + dy**2) <= radius**2
    channels = np.concatenate([rgb, np.clip(rgb2hed(rgb), 0.0, None)], axis=-1) if colour else None
    grey = (np.clip(rgb2gray(rgb), 0, 1) * (grey_levels - 1)).round().astype(np.uint8) if texture else None
    names = ([f"{c}_{s}" for c in COLOUR_CHANNELS for s in ("mean", "sd")] if colour else [])
    names += [f"texture_{p}" for p in TEXTURE_PROPERTIES] if texture else []
    out = np.full((xy.shape[0], len(names)), np.nan)
    pix = xy * float(scalefactor)
    for i, (cx, cy) in enumerate(pix):
        col, row = round(cx), round(cy)
        rows, cols = row + dy[disc], col + dx[disc]
        inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
        if inside.sum() < 2:
            continue
        values = []
        if colour:
            px = channels[rows[inside], cols[inside]]
            values += list(np.stack([px.mean(0), px.std(0)], 1).reshape(-1))
        if texture:
            r0, r1 = max(row - r, 0), min(row + r + 1, height)
            c0, c1 = max(col - r, 0), min(col + r + 1, width)
            patch = grey[r0:r1, c0:c1]
            if min(patch.shape) < 2:
                values += [np.nan] * len(TEXTURE_PROPERTIES)
            else:
                glcm = graycomatrix(patch, [1], [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=grey_levels,
                                    symmetric=True, normed=True)
                values += [float(np.nanmean(graycoprops(glcm, p))) for p in TEXTURE_PROPERTIES]
        out[i] = values
    # spots off the image (or flat patches with undefined correlation): the column averages
    finite = np.isfinite(out)
    col_mean = np.array([out[finite[:, j], j].mean() if finite[:, j].any() else 0.0 for j in range(out.shape[1])])
    out = np.where(finite, out, col_mean[None, :])
    return pd.DataFrame(out, columns=names)


def add_image_features(
    adata,
    key: str = "morphology",
    *,
    library_id: str | None = None,
    image: str = "lowres",
    spatial_key: str = "spatial",
    obs_columns: Sequence[str] = (),
    colour: bool = True,
    texture: bool = True,
) -> pd.DataFrame:
    """Write :func:`spot_features` of ``adata``'s own image into ``adata.obsm[key]`` (in place).

    Reads ``uns['spatial'][library_id]['images'][image]`` and its scale factors
    (``tissue_{image}_scalef``, ``spot_diameter_fullres``: scanpy's layout, which
    :func:`pyrospatial.io.read_visium` writes), and appends the ``obs`` columns named in
    ``obs_columns`` (e.g. per-spot nucleus counts) as further features.

    Returns
    -------
    pandas.DataFrame
        The features written (also as a float32 array in ``obsm[key]``; names in
        ``uns[key + '_features']``).
    """
    spatial = adata.uns.get("spatial")
    if not isinstance(spatial, dict) or not spatial:
        raise InputError("adata.uns['spatial'] is missing: read the data with pyrospatial.io.read_visium (or put "
                         "scanpy's uns['spatial'][library_id] with images and scalefactors there), or pass a "
                         "precomputed feature matrix in obsm instead.")
    if library_id is None:
        library_id = next(iter(spatial))
    if library_id not in spatial:
        raise InputError(f"library_id={library_id!r} is not in adata.uns['spatial'] (has {list(spatial)}).")
    lib = spatial[library_id]
    images, factors = lib.get("images", {}), lib.get("scalefactors", {})
    if image not in images or f"tissue_{image}_scalef" not in factors:
        raise InputError(f"adata.uns['spatial'][{library_id!r}] has no '{image}' image with scale factor "
                         f"'tissue_{image}_scalef' (images: {list(images)}): pass image= naming one it has.")
    if spatial_key not in adata.obsm:
        raise InputError(f"adata.obsm['{spatial_key}'] is missing: spot centres are needed to place footprints.")
    frame = spot_features(images[image], np.asarray(adata.obsm[spatial_key])[:, :2],
                          float(factors[f"tissue_{image}_scalef"]),
                          spot_diameter=factors.get("spot_diameter_fullres"), colour=colour, texture=texture)
    for column in obs_columns:
        if column not in adata.obs:
            raise InputError(f"obs_columns names '{column}', which is not a column of adata.obs.")
        frame[column] = np.asarray(adata.obs[column], dtype=np.float64)
    adata.obsm[key] = frame.to_numpy(dtype=np.float32)
    adata.uns[f"{key}_features"] = np.asarray(frame.columns, dtype=str)
    return frame
