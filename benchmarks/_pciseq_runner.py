"""Run pciSeq on one section (executed inside pciSeq's own virtual environment by ``peers.py``).

    python _pciseq_runner.py SPOTS_CSV NUCLEI_TIF REFERENCE_CSV RADIUS OUT_CSV

SPOTS_CSV: ``gene,spotX,spotY`` (raw file order); NUCLEI_TIF: nucleus label image (the same nuclei every method
gets); REFERENCE_CSV: ``celltype,gene,rate`` class means; writes OUT_CSV ``cell,prob`` in the spots' order.
"""

import sys

import numpy as np
import pandas as pd
import tifffile
from scipy.sparse import coo_matrix

pd.set_option("future.infer_string", False)  # pciSeq 0.0.61 breaks on pandas 3's string dtype

import pciSeq  # noqa: E402


def main(spots_csv, nuclei_tif, reference_csv, radius, out_csv):
    raw = pd.read_csv(spots_csv)
    spots = pd.DataFrame({"Gene": raw["gene"].astype(object), "x": raw["spotX"].to_numpy(), "y": raw["spotY"].to_numpy()})
    nuclei = tifffile.imread(nuclei_tif).astype(np.uint32)
    # pciSeq numbers cells by their rank among the labels present: give it consecutive labels, map back after
    present = np.unique(nuclei[nuclei > 0])
    nuclei = np.searchsorted(np.concatenate([[0], present]), nuclei).astype(np.uint32)
    ref = pd.read_csv(reference_csv).pivot(index="gene", columns="celltype", values="rate")
    # class means as integer counts (pciSeq takes uint32) at 10 per unit rate: pciSeq's best of 10-3000 on a basic
    # dense section (spot accuracy 0.81 at 10, 0.53-0.80 at 30-3000); at 10 only the markers stay non-zero
    ref = (ref * 10).round().astype(np.uint32)
    opts = {"launch_diagnostics": False, "cell_radius": float(radius), "save_data": False}
    _, genes = pciSeq.fit(spots=spots, coo=coo_matrix(nuclei), scRNAseq=ref, opts=opts)
    prob = np.array([float(np.max(p)) for p in genes["neighbour_prob"]])
    cell = np.concatenate([[0], present])[genes["neighbour"].to_numpy(np.int64)]
    if len(cell) != len(raw):
        raise SystemExit(f"pciSeq returned {len(cell)} spots for {len(raw)}")
    pd.DataFrame({"cell": cell, "prob": prob}).to_csv(out_csv, index=False)


if __name__ == "__main__":
    main(*sys.argv[1:6])
