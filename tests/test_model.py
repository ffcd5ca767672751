"""UNet shapes and patch-size validation; checkpoint safety."""

from __future__ import annotations

import pickle

import pytest
import torch

from segjointgene.methods.segjointgene.checkpoint import load_checkpoint, save_checkpoint
from segjointgene.errors import ConfigError, DataError, InputNotFoundError
from segjointgene.methods.segjointgene.unet import UNet, check_patch_size


@pytest.mark.parametrize("width, size", [(4, 64), (8, 32)])
def test_unet_output_shape(width, size):
    net = UNet(7, 4, base_channels=width)
    assert net(torch.randn(2, 7, size, size)).shape == (2, 4, size, size)
    assert net.downs[-1][1][0].out_channels == width * 16  # 4 levels: width..16*width


def test_unet_odd_sizes_pad_to_the_skip():
    assert UNet(3, 2, base_channels=4)(torch.randn(1, 3, 40, 40)).shape == (1, 2, 40, 40)


@pytest.mark.parametrize("size", [100, 8, 72])
def test_patch_size_the_unet_cannot_take(size):
    with pytest.raises(ConfigError, match="multiple of 16"):
        check_patch_size(size)


def test_checkpoint_round_trip(tmp_path):
    net = UNet(3, 2, base_channels=4)
    save_checkpoint(tmp_path / "net_1.pt", {"epoch": 1, "model": net.state_dict(), "config": {"a": 1.5, "b": [1, "x"]},
                                            "rng": {"g": torch.Generator().get_state()}})
    state = load_checkpoint(tmp_path / "net_1.pt")
    assert state["epoch"] == 1 and state["config"] == {"a": 1.5, "b": [1, "x"]}
    other = UNet(3, 2, base_channels=4)
    other.load_state_dict(state["model"])
    for a, b in zip(net.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)


class _Evil:
    def __reduce__(self):
        return (print, ("owned",))


def test_checkpoint_with_pickled_objects_is_refused(tmp_path, capsys):
    torch.save({"epoch": 1, "model": {}, "payload": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(DataError, match="refused"):
        load_checkpoint(tmp_path / "evil.pt")
    assert "owned" not in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_truncated_and_missing_checkpoints(tmp_path):
    save_checkpoint(tmp_path / "net_2.pt", {"epoch": 2, "model": UNet(3, 2, base_channels=4).state_dict()})
    data = (tmp_path / "net_2.pt").read_bytes()
    (tmp_path / "net_2.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_checkpoint(tmp_path / "net_2.pt")
    with pytest.raises(InputNotFoundError):
        load_checkpoint(tmp_path / "net_9.pt")
    (tmp_path / "plain.pt").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(DataError):
        load_checkpoint(tmp_path / "plain.pt")
