"""Frozen configuration dataclasses, one per concern (layer 0).

Each field is declared with :func:`opt`, which records its command-line flag and help text; ``cli.build_parser``
reads flags, defaults, types and choices from here, so every default is defined exactly once. Field values are
validated in ``__post_init__`` and a bad value raises :class:`~segjointgene.errors.ConfigError` naming the flag.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

__all__ = [
    "AttributionConfig",
    "ClassifyConfig",
    "EmbedConfig",
    "EvaluateConfig",
    "LabelUpdateConfig",
    "PreprocessConfig",
    "RuntimeConfig",
    "Settings",
    "SimulateConfig",
    "StepOptions",
    "TileConfig",
    "TrainConfig",
    "opt",
]


def opt(default: Any, help: str, *, flag: str | None = None, choices: tuple | None = None) -> Any:
    """Declare a config field with its CLI flag (default ``--<field name>``), help and choices."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices})


def flag_of(cls: type, name: str) -> str:
    """The CLI flag of field ``name`` of config class ``cls``."""
    meta = {f.name: f.metadata for f in dataclasses.fields(cls)}[name]
    return meta.get("flag") or f"--{name}"


def _check(cond: bool, cls: type, name: str, value: Any, need: str) -> None:
    if not cond:
        raise ConfigError(f"{flag_of(cls, name)}={value!r} is invalid: {need}")


def _check_choices(obj: Any) -> None:
    for f in dataclasses.fields(obj):
        choices = f.metadata.get("choices")
        value = getattr(obj, f.name)
        _check(choices is None or value in choices, type(obj), f.name, value, f"choose one of {', '.join(map(str, choices or ()))}")


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how a step runs."""

    device: str = opt("auto", "auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    gpu_id: int = opt(0, "CUDA device index used by --device auto/cuda (ignored on CPU and under torchrun)")
    num_workers: int = opt(2, "worker processes for preprocessing and for the training data loader")
    num_threads: int = opt(0, "CPU threads of torch operations (0 = torch's default); 1 is often fastest for small "
                              "networks on a shared or 2-core machine")
    random_seed: int = opt(1234, "seed of every random draw of the run (recorded in the run metadata)")
    overwrite: bool = opt(False, "replace outputs that already exist and were made differently (a raw section, a "
                                 "preprocessed dataset, a run folder); without it such outputs are never touched")

    def __post_init__(self) -> None:
        d = self.device
        ok = d in ("auto", "cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit())
        _check(ok, RuntimeConfig, "device", d, "use auto, cpu, cuda or cuda:N")
        _check(self.num_workers >= 0, RuntimeConfig, "num_workers", self.num_workers, "must be >= 0")
        _check(self.gpu_id >= 0, RuntimeConfig, "gpu_id", self.gpu_id, "must be >= 0")
        _check(self.num_threads >= 0, RuntimeConfig, "num_threads", self.num_threads, "must be >= 0")


@dataclass(frozen=True)
class SimulateConfig:
    """Synthetic section with ground truth (``--step_name=simulate``)."""

    size_px: int = opt(512, "edge length of the simulated square section (pixels)", flag="--sim_size")
    n_genes: int = opt(30, "number of genes", flag="--sim_genes")
    n_celltypes: int = opt(6, "number of cell types", flag="--sim_celltypes")
    markers_per_type: int = opt(3, "marker genes per cell type", flag="--sim_markers")
    mode: str = opt("dense", "dense: touching cells fill the tissue; sparse: isolated cells with background between",
                    flag="--sim_mode", choices=("dense", "sparse"))
    noise_fraction: float = opt(0.1, "fraction of spots that are background noise (uniform, random gene)", flag="--sim_noise")
    cell_radius_px: float = opt(14.0, "mean cell radius (pixels); radii vary by type and cell", flag="--sim_cell_radius")
    spot_density: float = opt(0.03, "mean spots per pixel inside cells", flag="--sim_spot_density")
    preset: str = opt("basic", "basic: the first release's sections; hard: what breaks nucleus expansion in tissue "
                      "(log-normal sizes, elongated irregular cells, off-centre nuclei, over-dispersed per-cell "
                      "scale, a shared programme, leaky markers, ambient noise, tissue holes)",
                      flag="--sim_preset", choices=("basic", "hard"))

    def __post_init__(self) -> None:
        c = SimulateConfig
        _check(self.size_px >= 32, c, "size_px", self.size_px, "must be >= 32")
        _check(self.n_celltypes >= 1, c, "n_celltypes", self.n_celltypes, "must be >= 1")
        _check(self.markers_per_type >= 1, c, "markers_per_type", self.markers_per_type, "must be >= 1")
        need = self.n_celltypes * self.markers_per_type
        _check(self.n_genes >= need, c, "n_genes", self.n_genes, f"must be >= sim_celltypes * sim_markers = {need}")
        _check(0.0 <= self.noise_fraction < 1.0, c, "noise_fraction", self.noise_fraction, "must be in [0, 1)")
        _check(self.cell_radius_px >= 3, c, "cell_radius_px", self.cell_radius_px, "must be >= 3")
        _check(self.spot_density > 0, c, "spot_density", self.spot_density, "must be > 0")
        _check_choices(self)


@dataclass(frozen=True)
class PreprocessConfig:
    """Raw section -> patches (``--step_name=preprocess_CA1``)."""

    patch_size: int = opt(128, "patch edge (pixels); a multiple of 16 for the 4-level UNet")
    density_sigma: float = opt(5.0, "Gaussian sigma (pixels) of the per-gene spot density; 0 keeps raw counts")
    test_fraction: float = opt(0.2, "fraction of patches in the test split (transductive: their labels grow too)")
    split_seed: int = opt(42, "seed of the train/test split (recorded in metadata.json)")
    store_density: bool = opt(True, "write each patch's per-gene density image (false: patch files without it, "
                                    "rebuilt from the spots whenever a patch is read - for large panels and "
                                    "sections, where the images would fill the disk)")
    keep_empty: bool = opt(False, "also write patches with neither spots nor nuclei (they carry no information)")
    input_format: str = opt("auto", "layout of --raw_dir: auto (from its files), ca1 (the original CSV layout), xenium, "
                                    "merscope, cosmx", choices=("auto", "ca1", "xenium", "merscope", "cosmx"))
    n_celltypes: int = opt(0, "platform folders (no cell-type table): k of the k-means that types the nuclei "
                              "(0 = chosen by silhouette in 3..12; ignored with --reference_csv, which maps each "
                              "nucleus to the reference's most likely type)")
    min_qv: float = opt(20.0, "Xenium: drop transcripts with a quality value below this")
    nucleus_seeds: str = opt("region", "DAPI nuclei (no label image): region = seed discs, snapping and a local "
                                       "foreground, so that no seed is lost; point = the reference's one pixel per "
                                       "centroid", choices=("region", "point"))

    def __post_init__(self) -> None:
        c = PreprocessConfig
        _check(self.patch_size >= 16 and self.patch_size % 16 == 0, c, "patch_size", self.patch_size,
               "the 4-level UNet halves the patch 4 times; use a multiple of 16 such as 64, 128 or 256")
        _check(self.density_sigma >= 0, c, "density_sigma", self.density_sigma, "must be >= 0")
        _check(0.0 <= self.test_fraction < 1.0, c, "test_fraction", self.test_fraction, "must be in [0, 1)")


@dataclass(frozen=True)
class LabelUpdateConfig:
    """Self-training label update (SPEC §3, reference §9)."""

    method: str = opt("auto", "the engine: spotmodel = a per-cell model of the spots (a pixel partition, or the spot "
                              "density's watershed where spots are dense) with a UNet's evidence; segjointgene = the "
                              "published UNet self-training with the v1/v2 rule and CID / IG; auto = segjointgene "
                              "when a flag only it reads is given (e.g. --attr_method=CID), else spotmodel",
                      flag="--method", choices=("auto", "spotmodel", "segjointgene"))
    rule: str = opt("auto", "model: the spot-model engine's territories, refitted with the network's type posterior "
                            "in the last epoch (--method spotmodel); v1: the reference's rule - territory + "
                            "prediction + votes + dominant attributed type; v2: balanced dilation, attribution "
                            "top-ratio, island and hole clean-up (v1 and v2: --method segjointgene); auto: the "
                            "method's own (model, or v1)",
                    flag="--label_update", choices=("auto", "model", "v1", "v2"))
    model_net_weight: float = opt(0.5, "model: weight of the network's log type posterior (over its mean) in the "
                                       "refit of the last epoch (0 = the spot model alone; < 1 because the network "
                                       "learnt the spot model's own territories, so its evidence repeats their shapes)")
    model_background_weight: float = opt(0.25, "model: weight of the network's cell-versus-background evidence "
                                               "relative to its type evidence (1 = its full posterior)")
    model_temperature: float = opt(1.6, "model: the per-spot probability (spots_assigned.csv prob) is the spot "
                                        "model's posterior at this temperature (> 1 softens an overconfident "
                                        "posterior; the assignment does not depend on it)")
    model_shape_power: float = opt(2.0, "model: cell shape - generalised-Gaussian exponent (2 = Gaussian); <= 0: a "
                                        "uniform ellipse with a logistic edge that wide")
    model_neighbours: float = opt(0.0, "model: weight of the neighbouring spots' assignments (mean field; 0 = off)")
    model_cell_profile: float = opt(-1.0, "model: pseudo-spots of its type's profile in each cell's own gene profile "
                                          "(a spot leans to the cell that holds its gene, as under negative-binomial "
                                          "counts); < 0 = fitted to the nuclei's spots (0 when they show no "
                                          "over-dispersion); 0 = every cell has its type's profile")
    model_nucleus_size: bool = opt(True, "model: scale each cell's prior size with its nucleus's area (the exponent, "
                                         "0-1, regressed from the cells' own spots; 0 where nuclei say nothing of "
                                         "cell size)")
    model_tissue_bin: float = opt(4.0, "model: the background rate is per pixel of tissue, the square bins this many "
                                       "typical cell radii wide that hold a spot (0 = per pixel of the whole frame)")
    model_smoothness: float = opt(0.5, "model: the fitted cells refined into a partition of the pixels (a cellular "
                                       "Potts model; spots take their pixel's cell): energy per pair of unlike "
                                       "neighbouring pixels (0 = off: the fitted ellipses are the cells)")
    model_shape_weight: float = opt(0.5, "model: weight of the fitted ellipses as the partition's shape prior")
    model_partition_log_odds: float = opt(0.25, "model: log odds added to the spot model's posterior of the "
                                                "partition's label of a spot (its prob: the partition's neighbours "
                                                "are evidence the spot model lacks; chosen on development sections)")
    model_boundaries: str = opt("auto", "model: where cells end - density: a watershed of the spots' density from "
                                        "the nuclei, with de novo cells from dense peaks far from every nucleus "
                                        "(for thousands of spots per cell); partition: the spot model's cells "
                                        "refined into a pixel partition; auto: density when the density at a "
                                        "scale of 100 spots resolves the cells (sigma <= a quarter of the "
                                        "typical cell radius), else partition",
                                choices=("auto", "density", "partition"))
    model_ambient: str = opt("auto", "model: a spot on a cell's pixel goes to background when background explains "
                                     "its gene there better than the cell (ambient spots, as pciSeq's misreads: each "
                                     "spot to its more likely source); false: every spot takes its pixel's cell; "
                                     "auto: true with a --reference_csv (a reference's class profiles tell a misread "
                                     "from a cell's own gene), else false", choices=("auto", "true", "false"))
    expand_k: int = opt(3, "growth radius per update (pixels): a pixel can only join a cell within this distance")
    prediction_threshold: float = opt(0.3, "minimum 3x3-smoothed softmax confidence of a pixel joining a cell "
                                           "(--territory nucleus: of it not being background)")
    vote_min: int = opt(3, "v1: minimum agreeing pixels in the 3x3 neighbourhood (itself included)")
    territory: str = opt("nucleus", "v1: mask = a pixel joins the nearest cell (by its current mask) whose type the network "
                                 "predicts there (reference); nucleus = a foreground pixel joins the cell with the "
                                 "nearest nucleus within reach unless the prediction favours another reachable cell's "
                                 "type by --type_margin", choices=("mask", "nucleus"))
    type_margin: float = opt(0.5, "v1 --territory nucleus: smoothed probability margin by which a cell's type must beat "
                                  "the nearest-nucleus cell's type to take the pixel instead")
    top_ratio: float = opt(0.1, "v2: fraction of most-attributed anchors kept per patch", flag="--attr_top_ratio")
    repeats: int = opt(1, "applications of the rule per batch with the same logits (the reference ran v2 10 times; "
                          "growth per batch can reach repeats * expand_k pixels)", flag="--label_update_repeats")

    def __post_init__(self) -> None:
        c = LabelUpdateConfig
        _check(self.repeats >= 1, c, "repeats", self.repeats, "must be >= 1")
        _check(self.expand_k >= 1, c, "expand_k", self.expand_k, "must be >= 1")
        _check(self.model_net_weight >= 0, c, "model_net_weight", self.model_net_weight, "must be >= 0")
        _check(self.model_background_weight >= 0, c, "model_background_weight", self.model_background_weight,
               "must be >= 0")
        _check(self.model_temperature > 0, c, "model_temperature", self.model_temperature, "must be > 0")
        _check(self.model_tissue_bin >= 0, c, "model_tissue_bin", self.model_tissue_bin, "must be >= 0")
        _check(self.model_smoothness >= 0, c, "model_smoothness", self.model_smoothness, "must be >= 0")
        _check(self.model_shape_weight >= 0, c, "model_shape_weight", self.model_shape_weight, "must be >= 0")
        _check(math.isfinite(self.model_partition_log_odds), c, "model_partition_log_odds",
               self.model_partition_log_odds, "must be finite")
        _check(0.0 <= self.prediction_threshold < 1.0, c, "prediction_threshold", self.prediction_threshold, "must be in [0, 1)")
        _check(1 <= self.vote_min <= 9, c, "vote_min", self.vote_min, "must be in 1..9")
        _check(0.0 < self.top_ratio <= 1.0, c, "top_ratio", self.top_ratio, "must be in (0, 1]")
        _check(0.0 <= self.type_margin < 1.0, c, "type_margin", self.type_margin, "must be in [0, 1)")
        _check_choices(self)


@dataclass(frozen=True)
class AttributionConfig:
    """Attribution (CID or IG): when it runs, on which targets, and its optimisation budget (SPEC §4)."""

    method: str = opt("none", "attribution constraining growth and ranking genes (CID = the published method; off by "
                              "default: it did not improve the cells, see the README's ablation)", flag="--attr_method",
                      choices=("CID", "IG", "none"))
    start_epoch: int = opt(-1, "first epoch with attribution (-1 = --warmup_epochs, when the labels start to grow)",
                           flag="--attr_epoch")
    n_gene: int = opt(50, "target genes: the top N by total density (capped at the number of genes)", flag="--attr_n_gene")
    n_celltype: int = opt(59, "target cell types: the top N by pixel count, background excluded (capped)",
                          flag="--attr_n_celltype")
    every: int = opt(1, "attribute every N-th epoch from --attr_epoch on (labels grow without it in between)",
                     flag="--attr_every")
    cid_n_steps: int = opt(20, "CID: maximum optimisation steps per sample", flag="--CID_n_steps")
    cid_lr: float = opt(0.1, "CID: Adam learning rate of log sigma", flag="--CID_lr")
    cid_lambda: float = opt(0.01, "CID: weight of the noise-entropy term", flag="--CID_lambda_param")
    cid_beta: float = opt(1.2, "CID: early-stop ratio (of mean sigma for --CID_stop sigma, of output MSE for mse)",
                          flag="--CID_beta")
    cid_chunk_size: int = opt(8, "CID: cell types optimised together in one batched pass", flag="--CID_chunk_size")
    cid_stop: str = opt("steps", "CID stop rule: steps (run all --CID_n_steps), mse (output-MSE ratio with adaptive "
                                 "lambda, reference H) or sigma (mean-sigma ratio, reference B)",
                        flag="--CID_stop", choices=("steps", "mse", "sigma"))
    cid_init_log_sigma: float = opt(-5.0, "CID: initial log sigma (with --CID_warm_start: where the start level is "
                                          "probed)", flag="--CID_init_log_sigma")
    cid_warm_start: bool = opt(True, "CID: start each sample's log sigma at the uniform-noise optimum estimated from "
                                     "one noisy forward (scale-free); false: start at --CID_init_log_sigma as the "
                                     "reference does", flag="--CID_warm_start")
    ig_n_steps: int = opt(16, "IG: interpolation steps", flag="--IG_n_steps")
    cid_skip: bool = opt(True, "CID with --CID_types=all: skip patches whose label-update window holds no labelled "
                               "pixel (nothing there can change or be ranked; every used result is unchanged; "
                               "--CID_types=local always skips them)", flag="--CID_skip")
    cid_types: str = opt("local", "CID: local = per patch only the target types present in its label-update window "
                                  "(the types its pixels can join; gene ranking unchanged, the dominant attributed "
                                  "type is taken among them; 3-40x faster); all = every target type at every patch "
                                  "(the reference)",
                         flag="--CID_types", choices=("all", "local"))
    cid_compile: bool = opt(False, "CID: run the network through torch.compile (falls back to eager when compiling "
                                   "fails)", flag="--CID_compile")

    def __post_init__(self) -> None:
        c = AttributionConfig
        _check(self.start_epoch >= -1, c, "start_epoch", self.start_epoch, "must be >= 0 (or -1: --warmup_epochs)")
        _check(self.n_gene >= 1, c, "n_gene", self.n_gene, "must be >= 1")
        _check(self.n_celltype >= 1, c, "n_celltype", self.n_celltype, "must be >= 1")
        _check(self.every >= 1, c, "every", self.every, "must be >= 1")
        _check(self.cid_n_steps >= 1, c, "cid_n_steps", self.cid_n_steps, "must be >= 1")
        _check(self.cid_lr > 0, c, "cid_lr", self.cid_lr, "must be > 0")
        _check(self.cid_lambda >= 0, c, "cid_lambda", self.cid_lambda, "must be >= 0")
        _check(self.cid_beta > 1.0, c, "cid_beta", self.cid_beta, "must be > 1 (a growth ratio)")
        _check(self.cid_chunk_size >= 1, c, "cid_chunk_size", self.cid_chunk_size, "must be >= 1")
        _check(self.ig_n_steps >= 1, c, "ig_n_steps", self.ig_n_steps, "must be >= 1")
        _check_choices(self)


@dataclass(frozen=True)
class TrainConfig:
    """Self-training (``--step_name=SegJointGene``)."""

    net_epoch: int = opt(10, "last epoch (epochs 0..N; epoch 0 is forward-only; the published runs used 200)")
    net_batch_size: int = opt(8, "patches per batch")
    net_lr: float = opt(1e-3, "Adam learning rate (published: 1e-4 over 200 epochs)")
    net_weight_decay: float = opt(0.0, "Adam weight decay")
    net_width: int = opt(16, "UNet width (channels of the first level; 64 as published, 4-8 for CPU tests)")
    loss: str = opt("ce", "ce: cross-entropy on the current labels; ce_dice: class-weighted CE + soft Dice",
                    choices=("ce", "ce_dice"))
    warmup_epochs: int = opt(5, "labels are updated from this epoch on; before it the network only trains")
    ignore_margin: int = opt(8, "background pixels within this distance (px) of a labelled cell are left out of the "
                                "loss: they may be cytoplasm not labelled yet, and training them as background would "
                                "teach the network to stop growth at the current labels (0 = use every pixel)")
    background_density: float = opt(0.5, "background pixels whose total spot density is below this fraction of the median "
                                         "density at nucleus pixels are trained as background even near cells (0 = off)")
    train_targets: str = opt("nuclei", "what the loss trains on: current = the current (grown) labels; nuclei = only the "
                                        "certain labels, i.e. nucleus pixels and background away from every current label "
                                        "(predictions then reflect expression, not the label geometry)",
                             choices=("current", "nuclei"))
    augment: bool = opt(True, "random flips / 90-degree rotations of the training patches (same for image and labels)")
    passes_per_epoch: int = opt(1, "optimizer passes over the training patches per epoch (small sections need "
                                   "several so that predictions are trained before they drive growth)")
    save_interval: int = opt(10, "save a checkpoint and label cache every N epochs (and at the end)")
    pixel_distance: int = opt(5, "ring width (pixels) of the cell-calling score")
    amp: bool = opt(True, "mixed precision (bfloat16/float16 autocast) on CUDA; ignored on CPU")
    density_on_device: bool = opt(False, "build each batch's density images on the training device from the "
                                         "patches' spot lists (spots.npz) instead of reading the stored images: "
                                         "less I/O and host memory, equal within float32 rounding",
                                  flag="--density_on_device")
    cache_patches: str = opt("auto", "keep the patch images in memory: auto (when they fit in 1 GiB and 1/4 of RAM), "
                                     "yes, no",
                             choices=("auto", "yes", "no"))
    ddp_timeout_min: float = opt(60.0, "torchrun runs: minutes a rank may wait for the others (e.g. while rank 0 writes "
                                       "checkpoints or exports the results) before the job is stopped")

    def __post_init__(self) -> None:
        c = TrainConfig
        _check(self.ddp_timeout_min > 0, c, "ddp_timeout_min", self.ddp_timeout_min, "must be > 0")
        for name in ("net_epoch", "warmup_epochs", "ignore_margin", "background_density"):
            _check(getattr(self, name) >= 0, c, name, getattr(self, name), "must be >= 0")
        for name in ("net_batch_size", "net_width", "passes_per_epoch", "save_interval", "pixel_distance"):
            _check(getattr(self, name) >= 1, c, name, getattr(self, name), "must be >= 1")
        _check(self.net_lr > 0, c, "net_lr", self.net_lr, "must be > 0")
        _check(self.net_weight_decay >= 0, c, "net_weight_decay", self.net_weight_decay, "must be >= 0")
        _check_choices(self)


@dataclass(frozen=True)
class TileConfig:
    """Whole slides tile by tile on Dask (``--step_name=segment``)."""

    tile_px: int = opt(2048, "tile edge (pixels; rounded up to whole patches)")
    overlap_px: int = opt(0, "margin read around each tile (pixels); it should exceed a cell's diameter, so that a "
                             "tile sees every cell of its core whole (0 = 4 typical cell radii, from the nuclei)",
                          flag="--tile_overlap_px")
    scheduler: str = opt("", "address of a running Dask scheduler (e.g. tcp://host:8786 of a dask-jobqueue SLURM "
                              "cluster); empty: a LocalCluster on this machine")
    dask_workers: int = opt(0, "LocalCluster: worker processes of one thread (0 = one per core)")
    dask_memory: str = opt("auto", "LocalCluster: memory limit per worker (e.g. 3GB; auto = RAM / workers)")
    network_tiles: int = opt(0, "tiles drawn (weighted by their nuclei) to train the network once; every tile's spot "
                                "model then takes its evidence, as untiled runs do (--net_epoch, --net_width, --net_lr, "
                                "--net_batch_size, --model_net_weight, --model_background_weight). 0 = no network (the "
                                "default: it changed simulated cells by < 0.02 at ~3x the time; benchmarks/RESULTS.md)",
                             flag="--tile_network_tiles")

    def __post_init__(self) -> None:
        c = TileConfig
        _check(self.tile_px >= 16, c, "tile_px", self.tile_px, "must be >= 16")
        _check(self.overlap_px >= 0, c, "overlap_px", self.overlap_px, "must be >= 0")
        _check(self.dask_workers >= 0, c, "dask_workers", self.dask_workers, "must be >= 0")
        _check(self.network_tiles >= 0, c, "network_tiles", self.network_tiles, "must be >= 0")


@dataclass(frozen=True)
class EvaluateConfig:
    """Metrics and baselines (``--step_name=evaluate``)."""

    truth_dir: str = opt("", "ground-truth folder of a simulated section (default: <raw_dir>_truth when it exists)")
    reference_csv: str = opt("", "cell-type x gene reference profile (CSV: gene column + one column per type, mean "
                                 "expression, e.g. single-cell class means as pciSeq takes): preprocess types the "
                                 "nuclei of an instrument folder with it, SegJointGene fixes the spot model's "
                                 "profiles of the types it names, evaluate scores MECR and negative-marker purity")
    expand_px: str = opt("5,10,15", "nucleus-expansion baselines, comma-separated radii in pixels")
    density_fraction: float = opt(0.5, "density-watershed baseline: foreground where the total spot density exceeds "
                                       "this fraction of its median over nucleus pixels", flag="--watershed_fraction")
    mecr_fraction: float = opt(0.1, "MECR: a gene counts as expressed by a reference type when its mean there reaches "
                                    "this fraction of its highest mean; genes with disjoint expressing types are "
                                    "mutually exclusive", flag="--mecr_fraction")

    def __post_init__(self) -> None:
        c = EvaluateConfig
        self.radii()
        _check(0.0 < self.density_fraction <= 1.0, c, "density_fraction", self.density_fraction, "must be in (0, 1]")
        _check(0.0 < self.mecr_fraction <= 1.0, c, "mecr_fraction", self.mecr_fraction, "must be in (0, 1]")

    def radii(self) -> tuple[int, ...]:
        """The expansion radii of ``expand_px``, in pixels."""
        try:
            radii = tuple(int(v) for v in self.expand_px.split(",") if v.strip())
        except ValueError:
            radii = ()
        _check(bool(radii) and all(r > 0 for r in radii), EvaluateConfig, "expand_px", self.expand_px,
               "give positive integers separated by commas, e.g. 5,10,15")
        return radii


@dataclass(frozen=True)
class EmbedConfig:
    """SegCLR-style cell embeddings (``--step_name=embed``, docs/SEGCLR.md §2)."""

    preset: str = opt("tiny", "encoder size: micro (2 stages, tests), tiny (4 stages 16..128, CPU) or default "
                              "(4 stages 32..256, 2 blocks each)", flag="--embed_preset", choices=("micro", "tiny", "default"))
    crop_px: int = opt(0, "crop window edge in raw pixels (0 = auto: 1.25 x the 90th percentile of the cell extent, "
                          "i.e. the cell view; a smaller crop gives the local view)", flag="--embed_crop_px")
    input_px: int = opt(32, "edge of the encoder input: the crop is binned / resampled to this size",
                        flag="--embed_input_px")
    mask_mode: str = opt("masked+channel", "masked: content outside the cell (dilated 1 px) set to 0; channel: raw "
                                           "context + the cell mask as a channel; masked+channel: both; none: plain "
                                           "crops (no segmentation guidance, an ablation)",
                         flag="--embed_mask_mode", choices=("masked+channel", "masked", "channel", "none"))
    gene_pcs: int = opt(32, "gene channels: with more genes than this, project them on this many principal "
                            "components of the per-cell expression (eigengenes)", flag="--embed_gene_pcs")
    blur_sigma_px: float = opt(1.0, "Gaussian smoothing of the gene channels (raw pixels)", flag="--embed_blur_sigma")
    steps: int = opt(600, "contrastive training steps (more steps help more than larger batches on a CPU)",
                     flag="--embed_steps")
    batch_size: int = opt(32, "positive pairs per step (each cell at most once per batch)", flag="--embed_batch_size")
    lr: float = opt(3e-3, "AdamW learning rate (5%% linear warm-up, then cosine decay)", flag="--embed_lr")
    weight_decay: float = opt(1e-4, "AdamW weight decay (not on norm layers and biases)", flag="--embed_weight_decay")
    temperature: float = opt(0.1, "NT-Xent temperature", flag="--embed_temperature")
    embed_dim: int = opt(64, "embedding (bottleneck) dimension: what is exported", flag="--embed_dim")
    proj_dim: int = opt(16, "projection-head dimension (used by the loss only)", flag="--embed_proj_dim")
    norm: str = opt("auto", "normalisation layers: batch, group (GroupNorm; no norm in the heads) or auto (batch "
                            "when a step holds >= 8 pairs)",
                    flag="--embed_norm", choices=("auto", "batch", "group"))
    decorrelation: float = opt(0.0, "weight of the embedding decorrelation penalty", flag="--embed_decorrelation")
    augment: bool = opt(True, "augment the views (D4, thinning, gene dropout, blur, gain, mask erode/dilate, DAPI "
                              "jitter)", flag="--embed_augment")
    max_pair_dist_px: float = opt(0.0, "maximum distance between the two centres of a positive pair (0 = any two "
                                       "points of the cell)", flag="--embed_max_pair_dist")
    min_area_px: int = opt(20, "cells smaller than this are not used for training (debris)", flag="--embed_min_area")
    point_stride_px: int = opt(6, "export: grid stride of the points inside each cell (plus its centre point)",
                               flag="--embed_point_stride")
    max_points: int = opt(16, "export: at most this many points per cell (centre point kept)", flag="--embed_max_points")
    tta: int = opt(1, "export: average over this many D4 transforms (1, 2, 4 or 8)", flag="--embed_tta",
                   choices=(1, 2, 4, 8))
    agg_radius_um: float = opt(10.0, "radius of the SegCLR-style aggregated export (mean over points of the same "
                                     "cell within R; 0 skips it)", flag="--embed_agg_radius")
    pixel_size_um: float = opt(1.0, "pixel size (micrometres per pixel) for the exported coordinates",
                               flag="--embed_pixel_size")
    num_shards: int = opt(0, "CSV-ZIP shards (0 = ceil(cells / 1000))", flag="--embed_num_shards")
    shard_bytewidth: int = opt(8, "bytes of the little-endian cell id hashed by the MD5 sharder (SegCLR's public "
                                  "releases used 64)", flag="--embed_shard_bytewidth")
    infer_batch: int = opt(256, "crops per forward pass at export", flag="--embed_infer_batch")

    def __post_init__(self) -> None:
        c = EmbedConfig
        _check(self.crop_px == 0 or self.crop_px >= 8, c, "crop_px", self.crop_px, "use 0 (auto) or >= 8")
        _check(self.input_px >= 8 and self.input_px % 4 == 0, c, "input_px", self.input_px,
               "must be a multiple of 4 and >= 8 (the encoder halves it up to 3 times)")
        for name in ("gene_pcs", "steps", "embed_dim", "proj_dim", "point_stride_px", "max_points", "infer_batch"):
            _check(getattr(self, name) >= 1, c, name, getattr(self, name), "must be >= 1")
        _check(self.batch_size >= 2, c, "batch_size", self.batch_size, "must be >= 2 (the other pairs are the negatives)")
        _check(self.lr > 0, c, "lr", self.lr, "must be > 0")
        _check(self.weight_decay >= 0, c, "weight_decay", self.weight_decay, "must be >= 0")
        _check(self.temperature > 0, c, "temperature", self.temperature, "must be > 0")
        _check(self.blur_sigma_px >= 0, c, "blur_sigma_px", self.blur_sigma_px, "must be >= 0")
        _check(self.decorrelation >= 0, c, "decorrelation", self.decorrelation, "must be >= 0")
        _check(self.max_pair_dist_px >= 0, c, "max_pair_dist_px", self.max_pair_dist_px, "must be >= 0")
        _check(self.min_area_px >= 1, c, "min_area_px", self.min_area_px, "must be >= 1")
        _check(self.agg_radius_um >= 0, c, "agg_radius_um", self.agg_radius_um, "must be >= 0")
        _check(self.pixel_size_um > 0, c, "pixel_size_um", self.pixel_size_um, "must be > 0")
        _check(self.num_shards >= 0, c, "num_shards", self.num_shards, "must be >= 0")
        _check(1 <= self.shard_bytewidth <= 64, c, "shard_bytewidth", self.shard_bytewidth, "must be in 1..64")
        _check_choices(self)


@dataclass(frozen=True)
class ClassifyConfig:
    """SNGP cell-type classifier on the per-cell embeddings (``--step_name=classify``, docs/SEGCLR.md §2.10)."""

    labels: str = opt("nucleus", "training labels: nucleus (the nucleus-based calls of data/<name>/cells.csv) or run "
                                 "(results/cells.csv of the run)", flag="--classify_labels", choices=("nucleus", "run"))
    hidden: int = opt(128, "width of the residual MLP", flag="--classify_hidden")
    blocks: int = opt(2, "residual blocks", flag="--classify_blocks")
    dropout: float = opt(0.0, "dropout inside the residual blocks", flag="--classify_dropout")
    spec_norm_bound: float = opt(6.0, "bound c of the spectral norm of the residual layers (0 = no spectral "
                                      "normalisation)", flag="--classify_spec_norm_bound")
    gp_features: int = opt(1024, "random Fourier features of the Gaussian-process output layer (0 = a plain linear "
                                 "output, no variance)", flag="--classify_gp_features")
    gp_lengthscale: float = opt(0.0, "length-scale of the RBF kernel the random features approximate (0 = auto: "
                                     "1, 1/2 or 1/4 of the median pairwise distance of the GP inputs, chosen on the "
                                     "validation NLL)", flag="--classify_gp_lengthscale")
    gp_layernorm: bool = opt(True, "LayerNorm the hidden vector before the random features (SegCLR / edward2)",
                             flag="--classify_gp_layernorm")
    gp_ridge: float = opt(1e-3, "ridge of the posterior precision (r I + sum phi phi^T)", flag="--classify_gp_ridge")
    mean_field_factor: float = opt(0.39269908169872414, "lambda of the mean-field logits z / sqrt(1 + lambda var) "
                                                        "(pi/8; 0 disables)", flag="--classify_mean_field")
    l2: float = opt(1e-4, "L2 penalty on the output weights", flag="--classify_l2")
    lr: float = opt(1e-3, "Adam learning rate", flag="--classify_lr")
    batch_size: int = opt(128, "cells per batch", flag="--classify_batch_size")
    epochs: int = opt(200, "maximum epochs", flag="--classify_epochs")
    patience: int = opt(20, "early stopping: epochs without a better validation loss", flag="--classify_patience")
    balance: bool = opt(True, "class-balanced loss weights", flag="--classify_balance")
    val_fraction: float = opt(0.2, "fraction of cells (in spatial blocks) held out for early stopping and the OOD "
                                   "threshold", flag="--classify_val_fraction")
    block_px: int = opt(0, "edge of the spatial blocks of the validation split (0 = auto: 1/8 of the section)",
                        flag="--classify_block_px")
    ood_score: str = opt("variance", "score flagged by the OOD threshold: variance (GP predictive variance; the best "
                                     "OOD and merge detector in docs/SEGCLR_RESULTS.md), ds (Dempster-Shafer "
                                     "uncertainty of the mean-field logits) or maxprob (1 - max probability)",
                         flag="--classify_ood_score", choices=("variance", "ds", "maxprob"))
    ood_quantile: float = opt(0.95, "OOD threshold = this quantile of the OOD score of held-out in-distribution "
                                    "cells", flag="--classify_ood_quantile")
    min_cells: int = opt(5, "cell types with fewer training cells are left out of the classifier",
                         flag="--classify_min_cells")

    def __post_init__(self) -> None:
        c = ClassifyConfig
        for name in ("hidden", "batch_size", "epochs", "patience", "min_cells"):
            _check(getattr(self, name) >= 1, c, name, getattr(self, name), "must be >= 1")
        for name in ("blocks", "gp_features", "block_px"):
            _check(getattr(self, name) >= 0, c, name, getattr(self, name), "must be >= 0")
        _check(0.0 <= self.dropout < 1.0, c, "dropout", self.dropout, "must be in [0, 1)")
        _check(self.spec_norm_bound >= 0, c, "spec_norm_bound", self.spec_norm_bound, "must be >= 0 (0 = off)")
        _check(self.gp_lengthscale >= 0, c, "gp_lengthscale", self.gp_lengthscale, "must be >= 0 (0 = auto)")
        _check(self.gp_ridge > 0, c, "gp_ridge", self.gp_ridge, "must be > 0")
        _check(self.mean_field_factor >= 0, c, "mean_field_factor", self.mean_field_factor, "must be >= 0")
        _check(self.l2 >= 0, c, "l2", self.l2, "must be >= 0")
        _check(self.lr > 0, c, "lr", self.lr, "must be > 0")
        _check(0.0 < self.val_fraction < 1.0, c, "val_fraction", self.val_fraction, "must be in (0, 1)")
        _check(0.0 < self.ood_quantile < 1.0, c, "ood_quantile", self.ood_quantile, "must be in (0, 1)")
        _check_choices(self)


@dataclass(frozen=True)
class StepOptions:
    """Flags of one command that are not settings of a library step (the CLI fills them; tests may too)."""

    if_load_ckpt: bool = False  # resume training
    ckpt_load_epoch: int | None = None  # the epoch to resume from / export (None: the latest saved)
    quiet: bool = False  # no progress bars
    raw_dir: str | None = None  # the raw folder given with --raw_dir


@dataclass(frozen=True)
class Settings:
    """Every setting of one command: one config per concern plus the command's own flags."""

    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    simulate: SimulateConfig = field(default_factory=SimulateConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    labels: LabelUpdateConfig = field(default_factory=LabelUpdateConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tiles: TileConfig = field(default_factory=TileConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    step: StepOptions = field(default_factory=StepOptions)

    #: config field -> its class, in the order of the help groups.
    CONFIGS = (("runtime", RuntimeConfig), ("simulate", SimulateConfig), ("preprocess", PreprocessConfig),
               ("train", TrainConfig), ("labels", LabelUpdateConfig), ("attribution", AttributionConfig),
               ("evaluate", EvaluateConfig), ("tiles", TileConfig), ("embed", EmbedConfig),
               ("classify", ClassifyConfig))


def to_dict(config: Any) -> dict[str, Any]:
    """A plain dict of a config (for checkpoints and run metadata)."""
    return dataclasses.asdict(config)
