"""The tile network: sampling, patch grids, a known-answer training, and the posterior read at the spots."""

import numpy as np
import torch

from segjointgene.methods.tiled.network import (NetworkSpec, TrainingWindow, load_network, patch_origins, sample_tiles,
                                  save_network, spot_log_posterior, train_network)


def test_sampling_is_seeded_weighted_and_skips_empty_tiles():
    w = np.array([0, 10, 0, 1, 1, 50])
    a, b = sample_tiles(w, 2, 7), sample_tiles(w, 2, 7)
    assert a.tolist() == b.tolist() and 0 not in a and 2 not in a and len(a) == 2
    hits = sum(5 in sample_tiles(w, 1, s) for s in range(200))
    assert hits > 150  # 50 of 62 of the weight
    assert sample_tiles(w, 10, 0).tolist() == [1, 3, 4, 5]


def test_patch_grid_covers_the_window():
    o = patch_origins((70, 130), 32)
    assert o.shape == (3 * 5, 2) and o[-1].tolist() == [64, 128]


def _toy(rng, n=1500):
    """Left half: cells of type 1 (gene 0); right half: type 2 (gene 1); gene 2 everywhere (noise)."""
    x, y = rng.uniform(0, 64, n), rng.uniform(0, 64, n)
    gene = np.where(rng.random(n) < 0.2, 2, (x >= 32).astype(int))
    labels = np.where(np.arange(64)[None, :] < 32, 1, 2).repeat(64, 0)
    return x, y, gene, labels


def test_a_known_answer_is_learnt_and_read_at_the_spots(tmp_path):
    rng = np.random.default_rng(0)
    x, y, gene, labels = _toy(rng)
    spec = NetworkSpec(n_genes=3, n_classes=3, patch_size=32, width=4, sigma=2.0, halo=6)
    net = train_network([TrainingWindow(x, y, gene, labels)], spec, epochs=30, batch_size=4, lr=1e-2, seed=1)
    save_network(tmp_path / "n.pt", net, spec, 30)
    net2, spec2 = load_network(tmp_path / "n.pt")
    assert spec2 == spec
    x2, y2, g2, _ = _toy(np.random.default_rng(1), 400)
    x2[:3], y2[:3] = [-1.0, 70.0, 5.0], [5.0, 5.0, 99.0]  # outside the window: no evidence
    lp = spot_log_posterior(net2, spec2, x2, y2, g2, (64, 64), batch_size=3)
    assert (lp[:3] == 0).all()
    inside = slice(3, None)
    truth = np.where(x2[inside] < 32, 1, 2)
    assert (lp[inside].argmax(1) == truth).mean() > 0.9
    np.testing.assert_allclose(np.exp(lp[inside]).sum(1), 1.0, atol=1e-5)
    # the posterior at a spot is the network's output at the spot's pixel of its patch
    with torch.no_grad():
        from segjointgene.methods.tiled.network import _forward

        full = torch.log_softmax(_forward(net2, x2, y2, g2, np.array([[0, 0]])), 1)[0].numpy()
    k = next(i for i in range(3, 400) if x2[i] < 32 and y2[i] < 32)
    np.testing.assert_allclose(lp[k], full[:, int(y2[k]), int(x2[k])], atol=1e-5)


def test_training_is_deterministic():
    x, y, gene, labels = _toy(np.random.default_rng(0), 300)
    spec = NetworkSpec(n_genes=3, n_classes=3, patch_size=32, width=2, sigma=2.0, halo=6)
    a = train_network([TrainingWindow(x, y, gene, labels)], spec, epochs=2, batch_size=2, lr=1e-2, seed=3)
    b = train_network([TrainingWindow(x, y, gene, labels)], spec, epochs=2, batch_size=2, lr=1e-2, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_the_first_layer_from_the_spots_is_the_convolution_of_the_densities():
    """K * (W * S) = W * (K * S): inside the patch (away from the zero padding of the image convolution) equal."""
    from segjointgene.preprocess.density import batch_density
    from segjointgene.methods.tiled.network import SpotUNet, _batch_spots

    rng = np.random.default_rng(2)
    spec = NetworkSpec(n_genes=5, n_classes=3, patch_size=32, width=4, sigma=2.0, halo=6)
    net = SpotUNet(spec)
    x, y, gene = rng.uniform(-8, 72, 600), rng.uniform(-8, 72, 600), rng.integers(0, 5, 600)
    origins = np.array([[0, 0], [32, 32]])
    with torch.no_grad():
        ours = net.first_layer(_batch_spots(x, y, gene, origins, 32, net.reach), 2)
        images = batch_density(_batch_spots(x, y, gene, origins, 32, spec.halo), 2, 5, 32, 2.0, halo=spec.halo)
        conv = torch.nn.functional.conv2d(images, net.first, padding=1)
    torch.testing.assert_close(ours[:, :, 1:-1, 1:-1], conv[:, :, 1:-1, 1:-1], atol=1e-5, rtol=1e-4)


def test_spots_turn_with_their_labels():
    from segjointgene.methods.tiled.network import _dihedral

    labels = torch.arange(16).view(1, 4, 4).repeat(8, 1, 1)
    spots = torch.tensor([[i, 0, r, c] for i in range(8) for r in range(4) for c in range(4)])
    for seed in range(4):  # 32 random codes of the 8
        turned_spots, turned = _dihedral(spots, labels, 4, torch.Generator().manual_seed(seed))
        for (i, _, r, c), (_, _, r0, c0) in zip(turned_spots.tolist(), spots.tolist()):
            assert turned[i, r, c] == labels[i, r0, c0]  # each spot still sits on its pixel's label
