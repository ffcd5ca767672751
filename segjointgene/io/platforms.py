"""Instrument output folders as raw sections: 10x Xenium, Vizgen MERSCOPE, NanoString CosMx (layer 1.6).

:func:`detect_format` names the layout of a folder from its files; :func:`read_platform` turns it into the same
:class:`~segjointgene.io.files.Section` the CA1 layout gives, in a pixel frame of the platform's image (Xenium: the
morphology image at ``pixel_size`` from ``experiment.xenium``; MERSCOPE: the DAPI mosaic through
``micron_to_mosaic_pixel_transform.csv``; CosMx: the global pixel coordinates of the flat files), with the µm <-> pixel
transform recorded (``Section.um_per_px``, ``Section.origin_um``: ``x_um = origin_um[0] + x_px * um_per_px``).

* control, blank and negative-control probes are dropped (and Xenium transcripts with ``qv`` below ``min_qv``);
* nuclei: Xenium ``nucleus_boundaries.parquet`` rasterised; otherwise the DAPI (Xenium, MERSCOPE) with the cell
  centroids as seeds (the preprocess step's seeded watershed); a MERSCOPE folder without ``cell_metadata.csv``
  (no centroids at all): nuclei found in the DAPI itself (:func:`detect_nuclei`); CosMx (no image read): a disc of 3 um
  (at most 0.3 x the median centre spacing) at each centroid;
* cell types: a folder has none, so each nucleus is given one - by the highest multinomial likelihood under a
  reference profile (``reference``: cell type x gene means, as pciSeq takes) or, without one, by k-means of its
  cells' normalised counts (``n_celltypes``, or the silhouette's best k in 3..12); ``Section.celltype_source``
  says how.

Parquet needs ``pyarrow`` (``pip install segjointgene[platforms]``); Xenium's ``transcripts.csv.gz`` does not.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ColumnError, DataError, InputNotFoundError
from ..evaluate.metrics import cell_gene_counts
from ..results.ranking import normalise_counts
from .dapi import detect_nuclei
from .files import Section
from .polygons import PolygonLabels
from .windows import TiffWindows, frame_values_at

log = logging.getLogger(__name__)

__all__ = ["FORMATS", "derive_celltypes", "detect_format", "read_platform"]

FORMATS = ("auto", "ca1", "xenium", "merscope", "cosmx")
#: Probe names that are not genes (prefixes, case-insensitive).
CONTROL_PREFIXES = ("negcontrol", "blank", "unassignedcodeword", "deprecatedcodeword", "intergenic", "antisense",
                    "negprb", "systemcontrol", "falsecode")


def detect_format(folder: str | os.PathLike) -> str:
    """``xenium``, ``merscope``, ``cosmx`` or ``ca1`` from the files of ``folder``."""
    folder = Path(folder)
    if (folder / "experiment.xenium").is_file() or any(folder.glob("transcripts.parquet")) or any(
            folder.glob("transcripts.csv.gz")):
        return "xenium"
    if any(folder.glob("detected_transcripts.csv")):
        return "merscope"
    if any(folder.glob("*_tx_file.csv*")):
        return "cosmx"
    return "ca1"


def _is_control(genes: pd.Series) -> np.ndarray:
    """Per row: a control / blank probe (judged once per distinct name: 20 M rows stay cheap)."""
    codes, names = pd.factorize(genes)
    return np.asarray(pd.Index(names).astype(str).str.lower().str.startswith(CONTROL_PREFIXES))[codes]


def _gene_index(genes: pd.Series, order: list[str]) -> np.ndarray:
    """Per row: the index of its gene in ``order`` (every gene listed there), through the distinct names."""
    codes, names = pd.factorize(genes)
    return pd.Series(np.arange(len(order)), index=order)[np.asarray(names, str)].to_numpy()[codes]


def _need(table: pd.DataFrame, columns: tuple[str, ...], path: Path, fix: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ColumnError(f"{path}: missing column(s) {missing} (has {list(table.columns)[:12]}); {fix}")


@contextlib.contextmanager
def _parquet_errors(path: Path):
    """A damaged parquet file (truncated by a copy, or not parquet at all) as a clear error naming it."""
    import pyarrow

    try:
        yield
    except (pyarrow.ArrowInvalid, pyarrow.ArrowIOError, OSError) as err:
        raise DataError(f"{path}: not a readable parquet file ({str(err).splitlines()[0]}); it may be truncated or "
                        "damaged - copy it again from the instrument's output folder") from None


def _read_table(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise InputNotFoundError(f"{path} is a parquet file and pyarrow is not installed; pip install pyarrow "
                                     "(or segjointgene[platforms])") from None
        with _parquet_errors(path):
            names = set(pq.ParquetFile(path).schema_arrow.names)
            table = pq.read_table(path, columns=[c for c in columns if c in names] if columns else None)
        frame = table.to_pandas()
        for c in frame.columns:  # Xenium stores ids and names as bytes in some versions
            if frame[c].dtype == object and len(frame) and isinstance(frame[c].iloc[0], bytes):
                frame[c] = frame[c].str.decode("utf-8")
        return frame
    return pd.read_csv(path, usecols=lambda c: columns is None or c in columns)


def _batches(pf, path: Path, batch_rows: int, columns: list[str]):
    """The record batches of a parquet file; a damaged row group is a clear error naming the file."""
    with _parquet_errors(path):
        yield from pf.iter_batches(batch_size=batch_rows, columns=columns)


def read_transcripts_parquet(path: Path, *, gene: str, x: str, y: str, cell: str | None, qv: str | None,
                             min_qv: float, scale: float, id_of: dict | None, batch_rows: int = 1 << 20) -> pd.DataFrame:
    """Stream a transcript parquet by record batches in bounded memory: control probes and rows with ``qv`` below
    ``min_qv`` dropped per batch, kept rows written into preallocated arrays (float32 coordinates, int16 gene codes,
    int32 cell ids: 22 bytes per transcript), one batch in flight; no Python string per transcript. Returns ``gene``
    (categorical), ``x``, ``y`` (px = um / scale), ``row`` (in the file), ``owner`` (the platform's cell as an id of ``id_of``, 0 = none)."""
    import pyarrow.parquet as pq

    with _parquet_errors(path):
        pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    columns = [c for c in (gene, x, y, cell, qv) if c and c in names]
    total = pf.metadata.num_rows
    xs, ys = np.empty(total, np.float32), np.empty(total, np.float32)
    rows, owners, codes = np.empty(total, np.int64), np.zeros(total, np.int32), np.empty(total, np.int16)
    vocab: dict[str, int] = {}
    n_kept = start = 0
    for batch in _batches(pf, path, batch_rows, columns):
        frame = batch.to_pandas(strings_to_categorical=True)
        n = len(frame)
        g = pd.Categorical(frame[gene])
        cat = [str(c) for c in g.categories]
        to_vocab = np.array([vocab.setdefault(c, len(vocab)) for c in cat] + [-1], np.int16)
        keep = ~np.append(_is_control(pd.Series(cat, dtype=object)), True)[g.codes]
        if qv in frame.columns:
            keep &= frame[qv].to_numpy() >= min_qv
        k = int(keep.sum())
        sl = slice(n_kept, n_kept + k)
        codes[sl] = to_vocab[g.codes][keep]
        xs[sl] = frame[x].to_numpy()[keep] / scale
        ys[sl] = frame[y].to_numpy()[keep] / scale
        rows[sl] = np.flatnonzero(keep) + start
        if cell in frame.columns and id_of:
            c = pd.Categorical(frame[cell])
            lut = np.array([id_of.get(v, 0) for v in c.categories] + [0], np.int32)
            owners[sl] = lut[c.codes][keep]  # code -1 (missing) -> the trailing 0
        n_kept += k
        start += n
    vocab_names = np.array(sorted(vocab, key=vocab.get), dtype=object)
    gene_col = pd.Categorical.from_codes(codes[:n_kept], categories=vocab_names) if n_kept else pd.Categorical([])
    return pd.DataFrame({"gene": gene_col, "x": xs[:n_kept], "y": ys[:n_kept], "row": rows[:n_kept],
                         "owner": owners[:n_kept]}, copy=False)


def _first(folder: Path, patterns: tuple[str, ...], what: str, *, required: bool = True) -> Path | None:
    for pattern in patterns:
        hits = sorted(folder.glob(pattern))
        if hits:
            return hits[0]
    if required:
        raise InputNotFoundError(f"{folder}: no {what} (looked for {', '.join(patterns)})")
    return None


def _read_dapi(path: Path | None):
    """The DAPI as a frame read window by window (a 2-D plane, zarr installed), else whole (a z-stack: its maximum
    projection)."""
    if path is None:
        return None
    try:
        return TiffWindows(path)
    except ImportError:
        log.info("%s: zarr is not installed (pip install segjointgene[platforms]); reading the image whole", path)
    except ValueError:  # a z-stack or channels
        pass
    import tifffile

    image = tifffile.imread(path)
    while image.ndim > 2:  # z-stack or channels: the maximum over the leading axes
        image = image.max(0)
    return image


# ------------------------------------------------------------------------------------------------ cell types
def derive_celltypes(counts: np.ndarray, genes: list[str], *, reference: pd.DataFrame | None = None,
                     n_celltypes: int | None = None, seed: int = 0) -> tuple[list[str], str]:
    """A type name per row of ``counts`` (cells x genes) and how it was obtained.

    With ``reference`` (genes as columns, one row per type; any genes missing from it are left out), the type of
    highest multinomial log-likelihood; else k-means (k-means++, ``seed``) of the log1p counts normalised to the
    median total, k = ``n_celltypes`` or the silhouette's best in 3..12 on up to 3000 cells.
    """
    counts = np.asarray(counts, np.float64)
    if reference is not None:
        shared = [g for g in genes if g in reference.columns]
        if not shared:
            raise DataError("the reference profile shares no gene with the section's panel; check its gene names")
        idx = [genes.index(g) for g in shared]
        prof = reference[shared].to_numpy(np.float64) + 1e-3
        logp = np.log(prof / prof.sum(1, keepdims=True))
        best = np.argmax(counts[:, idx] @ logp.T, axis=1)
        return [str(reference.index[b]) for b in best], f"reference mapping ({len(shared)} genes, multinomial)"
    if not np.asarray(counts).any():
        log.warning("no transcript lies in a nucleus or a platform cell: every cell gets one type, Cluster1")
        return ["Cluster1"] * len(counts), "none (no counts to cluster)"
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.metrics import silhouette_score

    x = normalise_counts(counts)
    x = PCA(n_components=max(1, min(20, x.shape[1] - 1, x.shape[0] - 1)), random_state=seed).fit_transform(x)
    rng = np.random.default_rng(seed)
    if n_celltypes is None:
        sample = rng.choice(len(x), min(3000, len(x)), replace=False)
        scores = {}
        for k in range(3, min(12, len(sample) - 1) + 1):
            labels = KMeans(k, n_init=4, random_state=seed).fit_predict(x[sample])
            if np.unique(labels).size > 1:
                scores[k] = silhouette_score(x[sample], labels)
        n_celltypes = max(scores, key=scores.get) if scores else 1
        how = f"k-means of normalised counts, k = {n_celltypes} by silhouette"
    else:
        how = f"k-means of normalised counts, k = {n_celltypes} (--n_celltypes)"
    labels = KMeans(n_celltypes, n_init=4, random_state=seed).fit_predict(x)
    return [f"Cluster{int(c) + 1}" for c in labels], how


def _nucleus_counts(spots: pd.DataFrame, cells: pd.DataFrame, nuclei: np.ndarray | None, genes: list[str],
                    spot_cell: np.ndarray | None) -> np.ndarray:
    """cells x genes counts for typing: the platform's own cell assignment when it made one (whole cells carry more
    spots than nuclei), else the spots on each nucleus."""
    gene_idx = _gene_index(spots["gene"], genes)
    if (spot_cell is None or not (spot_cell > 0).any()) and nuclei is not None:
        iy = np.clip(spots["y"].to_numpy().astype(np.int64), 0, nuclei.shape[0] - 1)
        ix = np.clip(spots["x"].to_numpy().astype(np.int64), 0, nuclei.shape[1] - 1)
        spot_cell = frame_values_at(nuclei, iy, ix)
    return cell_gene_counts(spot_cell, gene_idx, len(genes), cell_ids=cells["cell"].to_numpy()).toarray()


# ------------------------------------------------------------------------------------------------ assembling
def _assemble(fmt: str, spots: pd.DataFrame, cells: pd.DataFrame, *, shape: tuple[int, int], dapi, nuclei,
              um_per_px: float, origin_um: tuple[float, float], files: dict[str, Path], reference, n_celltypes,
              seed: int) -> Section:
    """``spots``: gene, x, y (px), row (in the file), owner (the platform's cell, 0 = none); ``cells``: cell, x, y."""
    control = _is_control(spots["gene"])
    inside = (spots["x"] >= 0) & (spots["y"] >= 0) & (spots["x"] < shape[1]) & (spots["y"] < shape[0])
    n_out = int((~inside & ~control).sum())
    kept = spots[~control & inside].reset_index(drop=True)
    if kept.empty:
        raise DataError(f"{files['spots']}: no transcript of a gene inside the {shape[0]} x {shape[1]} frame")
    genes = sorted(kept["gene"].unique())
    counts = _nucleus_counts(kept, cells, nuclei, genes, kept["owner"].to_numpy(np.int64))
    names, how = derive_celltypes(counts, genes, reference=reference, n_celltypes=n_celltypes, seed=seed)
    cells = cells.assign(celltype=names)
    log.info("%s folder: %d transcripts kept (%d control / blank probes and %d outside the frame dropped), %d cells, "
             "%.4f um per pixel; cell types by %s", fmt, len(kept), int(control.sum()), n_out, len(cells),
             um_per_px, how)
    return Section(spots=kept[["gene", "x", "y"]].copy(), cells=cells, shape=shape, dapi=dapi, nuclei=nuclei,
                   files={k: str(v) for k, v in files.items()}, spot_rows_in_file=kept["row"].to_numpy(np.int64),
                   n_spots_outside=n_out, um_per_px=um_per_px, origin_um=origin_um, celltype_source=how, format=fmt)


def _nucleus_polygons(boundaries: pd.DataFrame, id_of: dict, shape: tuple[int, int], um_per_px: float) -> PolygonLabels:
    """Nucleus labels from polygon vertices (``cell_id, vertex_x, vertex_y`` in um, a polygon's rows together),
    drawn a window at a time."""
    known = boundaries["cell_id"].isin(id_of).to_numpy()
    b = boundaries[known]
    codes, cells = pd.factorize(b["cell_id"])  # painting order: first appearance, as the file lists them
    order = np.argsort(codes, kind="stable")
    starts = np.searchsorted(codes[order], np.arange(len(cells) + 1))
    ys, xs = (b[v].to_numpy(float)[order] / um_per_px for v in ("vertex_y", "vertex_x"))
    return PolygonLabels(ys, xs, starts, np.array([id_of[c] for c in cells], np.uint32), shape)


# ------------------------------------------------------------------------------------------------ readers
def _read_xenium(folder: Path, *, min_qv: float, **kw) -> Section:
    tx_path = _first(folder, ("transcripts.parquet", "transcripts.csv.gz", "transcripts.csv"), "transcript table")
    px = 0.2125
    exp = folder / "experiment.xenium"
    if exp.is_file():
        px = float(json.loads(exp.read_text()).get("pixel_size", px))
    else:
        log.warning("%s: no experiment.xenium; assuming Xenium's 0.2125 um per pixel", folder)
    cells_path = _first(folder, ("cells.parquet", "cells.csv.gz", "cells.csv"), "cell table (cells.parquet)")
    cells_raw = _read_table(cells_path, ["cell_id", "x_centroid", "y_centroid"])
    _need(cells_raw, ("cell_id", "x_centroid", "y_centroid"), cells_path, "Xenium's cells table has them")
    id_of = {c: i + 1 for i, c in enumerate(cells_raw["cell_id"].tolist())}
    cells = pd.DataFrame({"cell": np.arange(1, len(cells_raw) + 1), "x": cells_raw["x_centroid"].to_numpy() / px,
                          "y": cells_raw["y_centroid"].to_numpy() / px})
    dapi_path = _first(folder, ("morphology_focus/*.ome.tif", "morphology_focus.ome.tif", "morphology_mip.ome.tif",
                                "morphology.ome.tif"), "DAPI", required=False)
    dapi = _read_dapi(dapi_path)
    spots = _xenium_transcripts(tx_path, min_qv=min_qv, px=px, id_of=id_of)
    shape = dapi.shape if dapi is not None else (int(np.ceil(spots["y"].max())) + 1, int(np.ceil(spots["x"].max())) + 1)
    bounds = _first(folder, ("nucleus_boundaries.parquet", "nucleus_boundaries.csv.gz"), "nuclei", required=False)
    nuclei = _nucleus_polygons(_read_table(bounds), id_of, shape, px) if bounds is not None else None
    files = {"spots": tx_path, "cells": cells_path, **({"dapi": dapi_path} if dapi_path else {}),
             **({"nuclei": bounds} if bounds else {})}
    return _assemble("xenium", spots, cells, shape=tuple(shape), dapi=dapi, nuclei=nuclei, um_per_px=px,
                     origin_um=(0.0, 0.0), files=files, **kw)


def _xenium_transcripts(tx_path: Path, *, min_qv: float, px: float, id_of: dict) -> pd.DataFrame:
    """``gene, x, y, row, owner`` of Xenium's transcripts (parquet streamed; csv(.gz) read whole), low qv dropped."""
    cols = {"gene": "feature_name", "x": "x_location", "y": "y_location", "cell": "cell_id", "qv": "qv"}
    if tx_path.suffix == ".parquet":
        spots = read_transcripts_parquet(tx_path, min_qv=min_qv, scale=px, id_of=id_of, **cols)
    else:
        tx = _read_table(tx_path, list(cols.values()))
        _need(tx, ("feature_name", "x_location", "y_location"), tx_path, "is this a Xenium output folder?")
        ok = tx["qv"].to_numpy() >= min_qv if "qv" in tx.columns else np.ones(len(tx), bool)
        owner = tx["cell_id"].map(id_of).fillna(0).to_numpy(np.int64) if "cell_id" in tx.columns else 0
        spots = pd.DataFrame({"gene": tx["feature_name"].astype(str), "x": tx["x_location"] / px,
                              "y": tx["y_location"] / px, "row": np.arange(len(tx)), "owner": owner})[ok]
    if spots.empty:
        raise DataError(f"{tx_path}: no transcript left after dropping qv < {min_qv:g}; lower --min_qv")
    return spots


def _read_merscope(folder: Path, **kw) -> Section:
    tx_path = _first(folder, ("detected_transcripts.csv",), "detected_transcripts.csv")
    tx = _read_table(tx_path, ["gene", "global_x", "global_y", "cell_id"])
    _need(tx, ("gene", "global_x", "global_y"), tx_path, "is this a MERSCOPE output folder?")
    tr_path = _first(folder, ("images/micron_to_mosaic_pixel_transform.csv",), "micron-to-pixel transform")
    a = np.loadtxt(tr_path)
    if a.shape != (3, 3):
        raise DataError(f"{tr_path}: expected a 3 x 3 affine matrix, got shape {a.shape}")
    to_px = lambda xu, yu: (a[0, 0] * xu + a[0, 1] * yu + a[0, 2], a[1, 0] * xu + a[1, 1] * yu + a[1, 2])  # noqa: E731
    dapi_path = _first(folder, ("images/mosaic_DAPI_z3.tif", "images/mosaic_DAPI_z*.tif"), "DAPI mosaic")
    dapi = _read_dapi(dapi_path)
    cells_path = _first(folder, ("cell_metadata.csv",), "cell_metadata.csv (cell centroids)", required=False)
    nuclei, id_of = None, {}
    if cells_path is None:  # no centroids at all: the nuclei come from the DAPI image itself
        nuclei, cells = detect_nuclei(np.asarray(dapi))  # held whole
    else:
        meta = pd.read_csv(cells_path)
        _need(meta, ("center_x", "center_y"), cells_path, "MERSCOPE's cell metadata has them")
        key = meta["EntityID"] if "EntityID" in meta.columns else meta.iloc[:, 0]
        id_of = {k: i + 1 for i, k in enumerate(key.tolist())}
        cx, cy = to_px(meta["center_x"].to_numpy(), meta["center_y"].to_numpy())
        cells = pd.DataFrame({"cell": np.arange(1, len(meta) + 1), "x": cx, "y": cy})
    x, y = to_px(tx["global_x"].to_numpy(), tx["global_y"].to_numpy())
    owner = (tx["cell_id"].map(id_of).fillna(0).to_numpy(np.int64) if "cell_id" in tx.columns and id_of
             else np.zeros(len(tx), np.int64))
    spots = pd.DataFrame({"gene": tx["gene"].astype(str), "x": x, "y": y, "row": np.arange(len(tx)), "owner": owner})
    um_per_px = 1.0 / float(a[0, 0])
    origin = (-a[0, 2] * um_per_px, -a[1, 2] / float(a[1, 1]))
    files = {"spots": tx_path, "dapi": dapi_path, **({"cells": cells_path} if cells_path else {})}
    return _assemble("merscope", spots, cells, shape=tuple(dapi.shape), dapi=dapi, nuclei=nuclei, um_per_px=um_per_px,
                     origin_um=origin, files=files, **kw)


#: CosMx: microns per pixel of the global pixel frame (NanoString's flat-file documentation).
COSMX_UM_PER_PX = 0.12028


def _read_cosmx(folder: Path, *, nucleus_radius_um: float = 3.0, **kw) -> Section:
    tx_path = _first(folder, ("*_tx_file.csv.gz", "*_tx_file.csv"), "transcript file (*_tx_file.csv)")
    tx = pd.read_csv(tx_path)
    _need(tx, ("target", "x_global_px", "y_global_px"), tx_path, "is this a CosMx flat-file export?")
    meta_path = _first(folder, ("*_metadata_file.csv.gz", "*_metadata_file.csv"), "cell metadata (*_metadata_file.csv)")
    meta = pd.read_csv(meta_path)
    _need(meta, ("fov", "cell_ID", "CenterX_global_px", "CenterY_global_px"), meta_path, "CosMx's metadata has them")
    lo = np.floor(np.minimum(tx[["x_global_px", "y_global_px"]].min().to_numpy(),
                             meta[["CenterX_global_px", "CenterY_global_px"]].min().to_numpy())) - 8
    id_of = {k: i + 1 for i, k in enumerate(zip(meta["fov"].tolist(), meta["cell_ID"].tolist()))}
    cells = pd.DataFrame({"cell": np.arange(1, len(meta) + 1), "x": meta["CenterX_global_px"].to_numpy() - lo[0],
                          "y": meta["CenterY_global_px"].to_numpy() - lo[1]})
    x, y = tx["x_global_px"].to_numpy() - lo[0], tx["y_global_px"].to_numpy() - lo[1]
    shape = (int(np.ceil(max(y.max(), cells["y"].max()))) + 9, int(np.ceil(max(x.max(), cells["x"].max()))) + 9)
    keys = list(zip(tx["fov"].tolist(), tx["cell_ID"].tolist())) if {"fov", "cell_ID"} <= set(tx.columns) else []
    owner = np.array([id_of.get(k, 0) for k in keys], np.int64) if keys else np.zeros(len(tx), np.int64)
    spots = pd.DataFrame({"gene": tx["target"].astype(str), "x": x, "y": y, "row": np.arange(len(tx)), "owner": owner})
    radius = nucleus_radius_um / COSMX_UM_PER_PX
    if len(cells) > 1:  # never wider than 0.3 x the typical centre spacing: discs must not overlap
        from scipy.spatial import cKDTree

        xy = cells[["x", "y"]].to_numpy()
        radius = min(radius, 0.3 * float(np.median(cKDTree(xy).query(xy, k=2)[0][:, 1])))
    nuclei = _discs(cells, shape, radius)
    log.info("%s: no nucleus image read; nuclei are discs of %.1f px (%.2f um) at the cell centres", folder, radius,
             radius * COSMX_UM_PER_PX)
    return _assemble("cosmx", spots, cells, shape=shape, dapi=None, nuclei=nuclei, um_per_px=COSMX_UM_PER_PX,
                     origin_um=(lo[0] * COSMX_UM_PER_PX, lo[1] * COSMX_UM_PER_PX),
                     files={"spots": tx_path, "cells": meta_path}, **kw)


def _discs(cells: pd.DataFrame, shape: tuple[int, int], radius: float) -> np.ndarray:
    """A disc of ``radius`` px at every centroid (later cells win overlaps); ids = ``cell``."""
    out = np.zeros(shape, np.uint32)
    r = int(np.ceil(radius))
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    inside = dy * dy + dx * dx <= radius * radius
    for cell, cx, cy in cells[["cell", "x", "y"]].itertuples(index=False):
        yy, xx = int(cy) + dy[inside], int(cx) + dx[inside]
        ok = (yy >= 0) & (xx >= 0) & (yy < shape[0]) & (xx < shape[1])
        out[yy[ok], xx[ok]] = cell
    return out


def read_platform(folder: str | os.PathLike, fmt: str = "auto", *, min_qv: float = 20.0,
                  reference: pd.DataFrame | None = None, n_celltypes: int | None = None, seed: int = 0) -> Section:
    """Read an instrument's output folder (see the module docstring); ``fmt`` = one of :data:`FORMATS` but ca1."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputNotFoundError(f"{folder}: not a folder; pass --raw_dir with the instrument's output folder")
    fmt = detect_format(folder) if fmt == "auto" else fmt
    kw = {"reference": reference, "n_celltypes": n_celltypes, "seed": seed}
    if fmt == "xenium":
        return _read_xenium(folder, min_qv=min_qv, **kw)
    if fmt == "merscope":
        return _read_merscope(folder, **kw)
    if fmt == "cosmx":
        return _read_cosmx(folder, **kw)
    raise ValueError(f"{fmt}: not a platform format (one of xenium, merscope, cosmx); the CA1 layout is read by "
                     "segjointgene.io.files.read_section")
