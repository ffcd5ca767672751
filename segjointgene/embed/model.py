"""Small 2-D ResNet encoder with SegCLR's bottleneck and projection heads (docs/SEGCLR.md §2.6).

Stem: a 3 x 3 convolution, stride 1, no max-pool (crops are small). Stages of BasicBlocks (two 3 x 3 convolutions
and a skip, pre-addition normalisation), the first block of every stage after the first with stride 2. Global
average pooling. Bottleneck MLP (width-preserving layers with bias, BatchNorm (none in group-norm mode) and ReLU,
then a bias-free linear layer to
``embed_dim``): **its output is the exported embedding**. Projection MLP to ``proj_dim``: used by the loss only.

Presets (widths per stage, blocks per stage): ``micro`` (8, 16) x 1 for tests, ``tiny`` (16, 32, 64, 128) x 1
(about 0.35 M parameters), ``default`` (32, 64, 128, 256) x 2 (about 2.9 M).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["PRESETS", "EncoderSpec", "SegCLRNet", "build_model"]


@dataclass(frozen=True)
class EncoderSpec:
    """Architecture of :class:`SegCLRNet` (stored with the weights so that a saved model can be rebuilt)."""

    in_channels: int
    widths: tuple[int, ...] = (16, 32, 64, 128)
    blocks: tuple[int, ...] = (1, 1, 1, 1)
    embed_dim: int = 64
    proj_dim: int = 16
    norm: str = "batch"  # batch | group


PRESETS: dict[str, dict] = {
    "micro": {"widths": (8, 16), "blocks": (1, 1)},
    "tiny": {"widths": (16, 32, 64, 128), "blocks": (1, 1, 1, 1)},
    "default": {"widths": (32, 64, 128, 256), "blocks": (2, 2, 2, 2)},
}


def _norm2d(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(min(8, channels), channels)


def _norm1d(kind: str, features: int) -> nn.Module:
    # group mode: no norm in the heads. GroupNorm over small groups of a feature vector keeps little more than
    # signs, and with LayerNorm heads NT-Xent training collapsed to a constant output in our runs
    if kind == "batch":
        return nn.BatchNorm1d(features)
    return nn.Identity()


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n1 = _norm2d(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.n2 = _norm2d(norm, cout)
        self.skip = None
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm2d(norm, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.n1(self.conv1(x)))
        y = self.n2(self.conv2(y))
        return torch.relu(y + (x if self.skip is None else self.skip(x)))


def _mlp(dim_in: int, dim_out: int, norm: str) -> nn.Sequential:
    """SegCLR head: two width-preserving layers (bias, norm, ReLU), then a bias-free linear layer."""
    layers: list[nn.Module] = []
    for _ in range(2):
        layers += [nn.Linear(dim_in, dim_in), _norm1d(norm, dim_in), nn.ReLU()]
    layers.append(nn.Linear(dim_in, dim_out, bias=False))
    return nn.Sequential(*layers)


class SegCLRNet(nn.Module):
    """Encoder + bottleneck (embedding) + projection (loss) heads.

    ``forward(x)`` with x (B, C, S, S) returns ``(embedding (B, embed_dim), projection (B, proj_dim))``;
    :meth:`embed` returns the embedding only.
    """

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        if len(spec.widths) != len(spec.blocks) or not spec.widths:
            raise ValueError(f"widths {spec.widths} and blocks {spec.blocks} must be non-empty and of equal length")
        self.spec = spec
        w0 = spec.widths[0]
        self.stem = nn.Sequential(nn.Conv2d(spec.in_channels, w0, 3, 1, 1, bias=False), _norm2d(spec.norm, w0),
                                  nn.ReLU())
        stages, cin = [], w0
        for i, (w, nb) in enumerate(zip(spec.widths, spec.blocks)):
            for j in range(nb):
                stages.append(_BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1, spec.norm))
                cin = w
        self.stages = nn.Sequential(*stages)
        self.bottleneck = _mlp(cin, spec.embed_dim, spec.norm)
        self.projection = _mlp(spec.embed_dim, spec.proj_dim, spec.norm)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> (B, embed_dim) bottleneck embedding."""
        h = self.stages(self.stem(x)).mean(dim=(2, 3))  # (B, width) global average pooling
        return self.bottleneck(h)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.embed(x)
        return e, self.projection(e)


def build_model(preset: str, in_channels: int, *, embed_dim: int = 64, proj_dim: int = 16, norm: str = "batch",
                generator: torch.Generator | None = None) -> SegCLRNet:
    """A :class:`SegCLRNet` of a preset, its weights drawn from ``generator``.

    Convolutions get Kaiming-normal weights (fan-out, ReLU), linear layers Kaiming-uniform weights and zero biases,
    norm layers weight 1 and bias 0; every draw comes from ``generator`` so the same seed gives the same model.

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> net = build_model("micro", 4, embed_dim=8, proj_dim=4, norm="group", generator=g)
    >>> [t.shape for t in net(torch.zeros(2, 4, 16, 16))]
    [torch.Size([2, 8]), torch.Size([2, 4])]
    """
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: choose one of {', '.join(PRESETS)}")
    if norm not in ("batch", "group"):
        raise ValueError(f"norm={norm!r}: choose batch or group")
    net = SegCLRNet(EncoderSpec(in_channels=in_channels, embed_dim=embed_dim, proj_dim=proj_dim, norm=norm,
                                **PRESETS[preset]))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=generator)
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_uniform_(m.weight, a=5 ** 0.5, generator=generator)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm, nn.LayerNorm)):
                m.weight.fill_(1.0)
                m.bias.zero_()
    return net
