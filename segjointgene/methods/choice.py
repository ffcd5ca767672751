"""Which engine a ``SegJointGene`` run uses, and which flags apply to it (layer 0: configs only).

Two methods segment the cells:

* ``spotmodel`` (the default: it measures better, see the README): a per-cell model of the spots, refined into a
  pixel partition - or, where the spots are dense enough to show the cells, a watershed of their density -, with a
  UNet trained on its territories whose type posterior enters a last refit (``--label_update model``);
* ``segjointgene``: the published method - a UNet self-trained from the nuclei, its labels grown by the v1 or v2
  rule from ``--warmup_epochs`` on, constrained by CID (or IG) attribution from ``--attr_epoch`` on.

``--method auto`` (the default) takes ``segjointgene`` when a flag that only the published method reads is on the
command line (so the original README's ``--attr_method=CID`` line runs it), else ``spotmodel``. A flag that the
chosen method does not read, or a setting under which a step of it never runs, is an error (exit status 2) with a
one-line reason: nothing is silently ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from dataclasses import dataclass

from ..config import LabelUpdateConfig, Settings, TrainConfig, flag_of
from ..errors import ConfigError

__all__ = ["METHODS", "ResolvedMethod", "default_run_name", "resolve_method"]

SPOTMODEL, PUBLISHED = "spotmodel", "segjointgene"
METHODS = ("auto", SPOTMODEL, PUBLISHED)

#: Flags (argparse destinations) that only the published method reads.
_V1_ONLY = ("vote_min", "territory", "type_margin")
_V2_ONLY = ("attr_top_ratio",)
_RULE = ("expand_k", "prediction_threshold", "label_update_repeats", *_V1_ONLY, *_V2_ONLY)
_CID_ONLY = ("CID_n_steps", "CID_lr", "CID_lambda_param", "CID_beta", "CID_chunk_size", "CID_stop",
             "CID_init_log_sigma", "CID_warm_start", "CID_skip", "CID_types", "CID_compile")
_IG_ONLY = ("IG_n_steps",)
_ATTRIBUTION = ("attr_method", "attr_epoch", "attr_n_gene", "attr_n_celltype", "attr_every", *_CID_ONLY, *_IG_ONLY)
PUBLISHED_ONLY = frozenset((*_RULE, *_ATTRIBUTION, "warmup_epochs", "train_targets"))
#: Flags that only the spot-model engine reads (every ``--model_*`` flag; the reference fixes its type profiles).
#: The tiled ``segment`` step reads them too, but for the network's two.
SPOTMODEL_ONLY = frozenset([*((f.metadata.get("flag") or f"--{f.name}").lstrip("-")
                              for f in dataclasses.fields(LabelUpdateConfig) if f.name.startswith("model_")),
                            "reference_csv"])


@dataclass(frozen=True)
class ResolvedMethod:
    """The method of a run, the settings it runs with, and why it was chosen (for the run's report)."""

    name: str
    settings: Settings
    reason: str

    def describe(self) -> str:
        labels, attr = self.settings.labels, self.settings.attribution
        if self.name == SPOTMODEL:
            return f"{SPOTMODEL} (spot model, UNet evidence; {self.reason})"
        cid = (f", {attr.method} from epoch {attr.start_epoch}" if attr.method != "none" else ", no attribution")
        return (f"{PUBLISHED} (published: UNet self-training, label rule {labels.rule} from epoch "
                f"{self.settings.train.warmup_epochs}{cid}; {self.reason})")


def _given(explicit: Collection[str], names: Collection[str]) -> list[str]:
    return sorted(f"--{n}" for n in names if n in explicit)


def resolve_method(settings: Settings, explicit: Collection[str]) -> ResolvedMethod:
    """The method of a ``SegJointGene`` command and its settings (label rule and attribution epoch resolved).

    Parameters
    ----------
    settings : the command's settings.
    explicit : argparse destinations of the flags given on the command line.

    Raises
    ------
    ConfigError : a flag the method does not read, or a setting under which a step never runs.
    """
    labels, attr, train = settings.labels, settings.attribution, settings.train
    if attr.method == "none":  # no attribution is what the spot-model engine does too
        explicit = set(explicit) - {"attr_method"}
    wants_published = _given(explicit, PUBLISHED_ONLY) + (
        [f"--label_update={labels.rule}"] if labels.rule in ("v1", "v2") else [])
    wants_spotmodel = _given(explicit, SPOTMODEL_ONLY) + (["--label_update=model"] if labels.rule == "model" else [])
    method = labels.method
    if method == "auto":
        if wants_published and wants_spotmodel:
            raise ConfigError(f"{', '.join(wants_published[:3])} (--method {PUBLISHED}) and "
                              f"{', '.join(wants_spotmodel[:3])} (--method {SPOTMODEL}) belong to different methods; "
                              "choose one")
        method, reason = ((PUBLISHED, f"chosen by {wants_published[0]}") if wants_published
                          else (SPOTMODEL, "the default"))
    else:
        reason = f"--method {method}"
        other = wants_spotmodel if method == PUBLISHED else wants_published
        if other:
            owner = SPOTMODEL if method == PUBLISHED else PUBLISHED
            raise ConfigError(f"{other[0]} applies to --method {owner} only, not to --method {method}; drop it or "
                              f"choose --method {owner}")
    if method == SPOTMODEL:
        resolved = dataclasses.replace(labels, method=method, rule="model")
        return ResolvedMethod(SPOTMODEL, dataclasses.replace(settings, labels=resolved), reason)
    rule = "v1" if labels.rule in ("auto", "model") else labels.rule
    start = attr.start_epoch if attr.start_epoch >= 0 else train.warmup_epochs
    _check_published(rule, attr.method, start, train, explicit)
    return ResolvedMethod(PUBLISHED, dataclasses.replace(
        settings, labels=dataclasses.replace(labels, method=method, rule=rule),
        attribution=dataclasses.replace(attr, start_epoch=start)), reason)


def _check_published(rule: str, attr_method: str, start: int, train: TrainConfig, explicit: Collection[str]) -> None:
    """Flags of another rule or attribution method, and steps that would never run (``start``: the first epoch of
    attribution)."""
    unused = {"v1": _V2_ONLY, "v2": _V1_ONLY}[rule]
    if _given(explicit, unused):
        raise ConfigError(f"{_given(explicit, unused)[0]} applies to the other label rule, not to --label_update={rule}")
    unused_attr = {"none": (*_ATTRIBUTION[1:],), "CID": _IG_ONLY, "IG": _CID_ONLY}[attr_method]
    if _given(explicit, unused_attr):
        raise ConfigError(f"{_given(explicit, unused_attr)[0]} has no effect with --attr_method={attr_method}")
    if train.warmup_epochs > train.net_epoch:
        raise ConfigError(f"{flag_of(TrainConfig, 'warmup_epochs')}={train.warmup_epochs} > "
                          f"{flag_of(TrainConfig, 'net_epoch')}={train.net_epoch}: the labels would never grow; lower "
                          "--warmup_epochs or raise --net_epoch")
    if attr_method != "none" and start > train.net_epoch:
        raise ConfigError(f"--attr_epoch={start} > --net_epoch={train.net_epoch}: {attr_method} would never run; "
                          "lower --attr_epoch or raise --net_epoch")


def default_run_name(method: str, attr_method: str) -> str:
    """The run folder's name when ``--net_sub_suffix`` is not given: the method (and attribution) that made it.

    Examples
    --------
    >>> default_run_name("spotmodel", "none"), default_run_name("segjointgene", "CID")
    ('spotmodel', 'SegJointGene_CID')
    """
    if method == PUBLISHED:
        return "SegJointGene" + ("" if attr_method == "none" else f"_{attr_method}")
    return method
