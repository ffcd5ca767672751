"""The UNet (layer 2): reference §6.1, with the width and depth configurable.

Four levels by default: double 3x3 conv (no bias) + BatchNorm + ReLU blocks, 2x2 max-pool down, transposed-conv
up-sampling, skip concatenation, 1x1 head. Width 64 gives the published 64..1024 channels; 4-8 is enough for CPU
tests. Patch sizes must be divisible by ``2**depth`` (checked by :func:`check_patch_size`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from segjointgene.errors import ConfigError

__all__ = ["UNet", "check_patch_size"]


def check_patch_size(patch_size: int, depth: int = 4) -> None:
    """Raise :class:`ConfigError` when the UNet cannot take patches of this size."""
    if patch_size % (2**depth) or patch_size < 2**depth:
        raise ConfigError(f"--patch_size={patch_size}: the {depth}-level UNet halves the patch {depth} times; "
                          f"use a multiple of {2**depth} (e.g. 64, 128 or 256) and preprocess again")


class _DoubleConv(nn.Sequential):
    def __init__(self, c_in: int, c_out: int):
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        )


class _Up(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(c_in, c_in // 2, kernel_size=2, stride=2)
        self.conv = _DoubleConv(c_in // 2 + c_out, c_out)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        dy, dx = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
        if dy or dx:  # only for sizes not divisible by 2**depth
            x = F.pad(x, (dx // 2, dx - dx // 2, dy // 2, dy - dy // 2))
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """UNet mapping (B, in_channels, P, P) gene densities to (B, n_classes, P, P) cell-type logits.

    Parameters
    ----------
    in_channels : number of genes G.
    n_classes : K = cell types + 1 (class 0 = background).
    base_channels : width of the first level (64 as published).
    depth : number of down-sampling levels (4 as published).

    Examples
    --------
    >>> net = UNet(5, 3, base_channels=4)
    >>> net(torch.zeros(2, 5, 32, 32)).shape
    torch.Size([2, 3, 32, 32])
    """

    def __init__(self, in_channels: int, n_classes: int, base_channels: int = 64, depth: int = 4):
        super().__init__()
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.inc = _DoubleConv(in_channels, widths[0])
        self.downs = nn.ModuleList(nn.Sequential(nn.MaxPool2d(2), _DoubleConv(a, b)) for a, b in zip(widths, widths[1:]))
        self.ups = nn.ModuleList(_Up(b, a) for a, b in zip(reversed(widths[:-1]), reversed(widths[1:])))
        self.head = nn.Conv2d(widths[0], n_classes, kernel_size=1)
        self.in_channels, self.n_classes, self.depth = in_channels, n_classes, depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for up in self.ups:
            y = up(y, skips.pop())
        return self.head(y)
