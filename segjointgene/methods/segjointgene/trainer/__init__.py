"""Self-training (layer 3): the epoch loop ``self_train`` and the ``SegJointGene`` step (SPEC §3).

Where things are: :mod:`.epoch` holds :class:`~segjointgene.methods.segjointgene.trainer.epoch.EpochRunner`, whose
``run_epoch`` is the batch loop (train a batch, propagate it: predict, attribute, grow its labels; then the test
patches; end the epoch); :mod:`.state` what a checkpoint saves and a resume restores; :mod:`.section` the neighbouring
labels, nucleus seeds and the cell-calling score; :mod:`.run` the set-up of a run, ``self_train`` and the CLI step ``run_training``.

Per epoch: the network trains on the current labels of the train patches (epoch 0 is forward-only); after each
train batch, from ``--warmup_epochs`` on, the batch is *propagated*: one eval-mode forward with the just-updated
weights gives the predictions, attribution (CID / IG, from ``--attr_epoch``) is computed with the same weights, and
the label rule grows the labels, which go back into the shared label store. Test patches are propagated the same way
(transductive) after the training batches. Checkpoints and label caches are written every ``--save_interval``
epochs and at the end, as consistent pairs; ``train_log.csv`` gets one row per epoch.

Resuming from epoch E restores the weights, the optimizer, every random generator and the labels as they were at
the end of epoch E, and continues with epoch E+1: on CPU the result is bit-identical to an uninterrupted run.

Data-parallel (``torchrun --nproc_per_node=N main.py ...``; the plumbing is in
:mod:`segjointgene.methods.segjointgene.distributed`): the network is wrapped in ``DistributedDataParallel``;
``DistributedSampler`` shards the train patches (shuffled from ``--random_seed`` and the epoch, identically on every
rank) and the test patches. Each rank propagates only its own patches of each batch (not the sampler's padding, which
repeats another rank's); after every propagation step the new labels of all ranks are gathered into every rank's label
store, so all stores are identical whenever a step reads neighbouring patches (``SectionLabels.context``), an epoch ends
or a cache is saved. Within a step every rank sees the labels as they were after the previous step, across all ranks.
Per-epoch tallies and the (type x gene) attribution sums are summed over the ranks (the training loss and accuracy also
count the few patches the sampler repeats to even out the shards); rank 0 alone writes files, the others waiting for its
status. Guarantees: world size 1 (plain ``python main.py``) is the single-process run, unchanged; N ranks give a
consistent run that is deterministic for a fixed N and seed (given deterministic kernels), but not bit-identical to N =
1 (the batches and the order of label updates differ). Checkpoints hold the unwrapped model, rank 0's random states as
``rng``, every rank's as ``rng_ranks`` and the ``world_size``: resuming with the same N continues every rank's
streams; with another N (a DDP run resumed by one process or the reverse) the weights, optimizer, labels and
attribution sums are restored exactly and rank 0 continues its streams, while the shuffling differs.
"""

from .epoch import EpochPlan, EpochRunner, RunContext, Tally
from .run import TrainResult, resolve_device, run_training, self_train
from .section import SectionLabels, nucleus_seeds
from .state import AttributionState, TrainingState

__all__ = ["AttributionState", "EpochPlan", "EpochRunner", "RunContext", "SectionLabels", "Tally", "TrainResult",
           "TrainingState", "nucleus_seeds", "resolve_device", "run_training", "self_train"]
