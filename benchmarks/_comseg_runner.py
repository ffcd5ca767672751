"""Run ComSeg on one section (executed inside ComSeg's own virtual environment by ``peers.py``).

    python _comseg_runner.py SPOTS_CSV NUCLEI_TIF RADIUS OUT_CSV

SPOTS_CSV: ``gene,spotX,spotY`` (raw file order); NUCLEI_TIF: nucleus label image (the nuclei every method gets);
RADIUS: half the mean_cell_diameter ComSeg gets, also half its max_cell_radius (pixels; ComSeg works in pixels here:
scale 1). Writes OUT_CSV ``cell`` in the spots' order (0 = not assigned).
"""

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile


def main(spots_csv, nuclei_tif, radius, out_csv):
    from comseg.dataset import ComSegDataset
    from comseg.dictionary import ComSegDict

    radius = float(radius)
    raw = pd.read_csv(spots_csv)
    work = Path(tempfile.mkdtemp(prefix="comseg_"))
    try:
        (work / "spots").mkdir()
        (work / "masks").mkdir()
        pd.DataFrame({"x": raw["spotX"], "y": raw["spotY"], "z": 0.0, "gene": raw["gene"]}).to_csv(
            work / "spots" / "section.csv", index=False)
        tifffile.imwrite(work / "masks" / "section.tiff", tifffile.imread(nuclei_tif).astype(np.uint32))
        dataset = ComSegDataset(path_dataset_folder=work / "spots", path_to_mask_prior=work / "masks",
                                mask_file_extension=".tiff", dict_scale={"x": 1, "y": 1, "z": 1},
                                mean_cell_diameter=2 * radius, gene_column="gene", prior_name="in_nucleus",
                                disable_tqdm=True)
        dataset.add_prior_from_mask(overwrite=True)
        dataset.compute_edge_weight()
        result = ComSegDict(dataset=dataset, mean_cell_diameter=2 * radius, community_detection="with_prior",
                            seed=0, disable_tqdm=True)
        result.run_all(max_cell_radius=2 * radius)
        cell = np.zeros(len(raw), np.int64)
        for _, node in result["section"].G.nodes(data=True):
            if "index" in node and node.get("cell_index_pred") not in (None, 0):
                cell[int(node["index"])] = int(node["cell_index_pred"])
        pd.DataFrame({"cell": cell}).to_csv(out_csv, index=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(*sys.argv[1:5])
