"""Attribution: target selection, CID and IG on toy models whose answer is known, device-side summaries."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

from segjointgene.attribution import (CID, IG, SCORE_SCALE, AttributionOutOfMemoryError, AttributionSummary,
                                      MaskedClassSum, prediction_masks, select_targets, summarize)
from segjointgene.config import AttributionConfig

DEFAULT = AttributionConfig(method="CID")
#: The budget of the default configuration (what the trainer runs), as CID keyword arguments.
DEFAULT_BUDGET = dict(n_steps=DEFAULT.cid_n_steps, lr=DEFAULT.cid_lr, lambda_=DEFAULT.cid_lambda, beta=DEFAULT.cid_beta,
                      stop=DEFAULT.cid_stop, init_log_sigma=DEFAULT.cid_init_log_sigma,
                      warm_start=DEFAULT.cid_warm_start)
#: The public reference's version-B defaults (SPEC §4).
REFERENCE_B = dict(n_steps=20, lr=0.2, lambda_=0.01, beta=1.2, stop="sigma", init_log_sigma=-5.0, warm_start=False)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------------ toy models
class WeightedBlur(nn.Module):
    """Analytic model: logits[:, k] = tanh(blur(sum_g W[k, g] x_g)). Channel g matters to class k by |W[k, g]|."""

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("W", torch.as_tensor(weights, dtype=torch.float32))  # (K, G)
        k = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("kernel", (k[:, None] * k[None, :] / 16).view(1, 1, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.einsum("kg,bghw->bkhw", self.W, x)
        y = F.conv2d(y.reshape(-1, 1, *y.shape[2:]), self.kernel, padding=1).view_as(y)
        return torch.tanh(y)


#: (K=3, G=6): class 0 needs channel 5 most, class 1 channel 1, class 2 channel 3; nobody uses channel 0.
TOY_W = torch.tensor([[0.0, 0.05, 0.2, 0.5, 1.0, 3.0],
                      [0.0, 3.0, 1.0, 0.5, 0.2, 0.05],
                      [0.0, 0.2, 0.5, 3.0, 1.0, 0.05]])


class BNConvNet(nn.Module):
    """Random conv net with BatchNorm; input channel ``ignore`` is disconnected, channel ``strong`` amplified."""

    def __init__(self, g: int = 8, k: int = 3, width: int = 8, *, ignore: int = 0, strong: int = 5, gain: float = 8.0,
                 seed: int = 0) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(g, width, 3, padding=1), nn.BatchNorm2d(width)
        self.c2, self.b2 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        self.head = nn.Conv2d(width, k, 1)
        g_ = gen(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g_) * (0.3 if p.ndim > 1 else 0.1))
            self.c1.weight[:, ignore] = 0
            self.c1.weight[:, strong] *= gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.head(x)


def density(b: int, g: int, size: int, seed: int) -> torch.Tensor:
    """Smoothed sparse spot counts, like the patch densities."""
    g_ = gen(seed)
    spots = torch.poisson(torch.full((b * g, 1, size, size), 0.03), generator=g_)
    k = torch.exp(-torch.arange(-4, 5.0) ** 2 / 4.5)
    k = k / k.sum()
    x = F.conv2d(spots, k.view(1, 1, 1, -1), padding=(0, 4))
    return 10 * F.conv2d(x, k.view(1, 1, -1, 1), padding=(4, 0)).view(b, g, size, size)


def warmed_bn_net(x: torch.Tensor, **kw) -> BNConvNet:
    """A BN net with non-trivial running statistics, left in train mode."""
    net = BNConvNet(g=x.shape[1], **kw)
    with torch.no_grad():
        for _ in range(3):
            net(x)
    return net


def channel_scores(attributions: torch.Tensor) -> torch.Tensor:
    """(B, T, G) mean score over pixels."""
    return attributions.mean(dim=(3, 4))


@pytest.fixture(scope="module")
def toy():
    return WeightedBlur(TOY_W), torch.rand(3, 6, 16, 16, generator=gen(5)) + 0.2


@pytest.fixture(scope="module")
def bn_case():
    x = density(2, 8, 20, seed=1)
    return warmed_bn_net(x), x


# -------------------------------------------------------------------------------------------------- select_targets
@pytest.mark.parametrize("totals, pixels, n_gene, n_type, genes, classes", [
    # ties by lower id; background (index 0) excluded even when largest
    ([1.0, 5.0, 5.0, 0.0, 2.0], [900, 3, 0, 7, 3], 3, 5, [1, 2, 4], [3, 1, 4]),
    # caps: more asked than exists; classes without pixels never selected
    ([0.0, 0.0, 1.0], [10, 0, 2, 0], 10, 10, [2, 0, 1], [2]),
    # nothing but background -> no class
    ([3.0, 1.0], [5, 0, 0], 1, 2, [0], []),
    # integer inputs work as well
    ([4, 4, 4, 9], [0, 1, 1, 1], 2, 2, [3, 0], [1, 2]),
])
def test_select_targets_hand_cases(totals, pixels, n_gene, n_type, genes, classes):
    g, c = select_targets(torch.tensor(totals), torch.tensor(pixels), n_gene, n_type)
    assert g.dtype == c.dtype == torch.int64
    assert g.tolist() == genes and c.tolist() == classes


def test_select_targets_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_gene"):
        select_targets(torch.ones(3), torch.ones(3), 0, 1)
    with pytest.raises(ValueError, match="1-D"):
        select_targets(torch.ones(3, 2), torch.ones(3), 1, 1)
    with pytest.raises(TypeError, match="torch.Tensor"):
        select_targets([1.0, 2.0], torch.ones(3), 1, 1)


def test_prediction_masks_fall_back_to_all_pixels():
    logits = torch.zeros(2, 3, 2, 2)
    logits[0, 1, 0, 0] = 1.0  # sample 0 predicts class 1 at one pixel, class 0 elsewhere; sample 1: class 0 only
    m = prediction_masks(logits, torch.tensor([1, 2]))
    assert m.shape == (2, 2, 2, 2)
    assert m[0, 0].sum() == 1 and m[0, 0, 0, 0]  # class 1 in sample 0: its pixel
    assert m[0, 1].all() and m[1].all()  # never predicted -> all pixels


# ----------------------------------------------------------------------------------------------------- CID answers
@pytest.mark.parametrize("case", ["toy", "bn_case"])
def test_cid_ranks_ignored_channel_last_and_strong_channel_first(case, request):
    model, x = request.getfixturevalue(case)
    if case == "toy":
        targets, strongest = [0, 1, 2], [5, 1, 3]
    else:
        targets, strongest = [0, 1, 2], [5, 5, 5]
    res = CID(model).attribute(x, targets, generator=gen(0), **DEFAULT_BUDGET)
    scores = channel_scores(res.attributions)  # (B, T, G)
    for t, best in enumerate(strongest):
        assert (scores[:, t].argmin(dim=1) == 0).all(), f"type {t}: the ignored channel 0 must score lowest"
        assert (scores[:, t].argmax(dim=1) == best).all(), f"type {t}: channel {best} must score highest"
    # the ignored channel only feels the entropy term: its s rises by the same amount at every step (Adam on a
    # constant gradient) from the sample's start level, so it is the same for every pixel and type of the sample
    ignored = res.log_sigma[:, :, 0]  # (B, T, H, W)
    top = ignored.flatten(1)[:, :1]  # (B, 1): start level of the sample + rise
    torch.testing.assert_close(ignored.flatten(1), top.expand(-1, ignored[0].numel()), rtol=0, atol=1e-4)
    assert res.n_steps.shape == (x.shape[0], 3) and (res.n_steps == DEFAULT.cid_n_steps).all()


def test_cid_fixed_start_ignored_channel_known_exactly(toy):
    model, x = toy
    res = CID(model).attribute(x, [0, 2], n_steps=7, lr=0.1, warm_start=False, init_log_sigma=-4.0, generator=gen(0))
    expect = -SCORE_SCALE * (-4.0 + 0.7)
    torch.testing.assert_close(res.attributions[:, :, 0], torch.full((3, 2, 16, 16), expect), rtol=1e-5, atol=1e-5)


def test_cid_warm_start_puts_a_weakly_sensitive_net_where_the_scores_separate(bn_case):
    """The BN net's outputs are weakly sensitive: from the reference's fixed start, 20 steps leave all scores within
    ~1e-3 of each other (all elements still rise in lock-step); the warm start separates them by orders more."""
    model, x = bn_case
    fixed = CID(model).attribute(x, [0, 1], generator=gen(0), **{**DEFAULT_BUDGET, "warm_start": False})
    warm = CID(model).attribute(x, [0, 1], generator=gen(0), **{**DEFAULT_BUDGET, "warm_start": True})
    spread = lambda r: channel_scores(r.attributions)[:, :, 1:].std(dim=2).mean()  # noqa: E731 - channel 0 excluded
    assert spread(warm) > 20 * spread(fixed)


def test_cid_toy_scores_follow_the_weights(toy):
    """On the analytic model the channel ranking of each type is the ranking of |W[type]| (ties excluded)."""
    model, x = toy
    res = CID(model).attribute(x, [0, 1, 2], generator=gen(1), **DEFAULT_BUDGET)
    scores = channel_scores(res.attributions).mean(dim=0)  # (T, G)
    for t in range(3):
        rho = spearmanr(scores[t].numpy(), TOY_W[t].numpy())[0]
        assert rho >= 0.9, (t, rho, scores[t])


def test_cid_same_seed_identical_and_other_seeds_stable(bn_case):
    model, x = bn_case
    cid = CID(model)
    a = cid.attribute(x, [0, 1, 2], generator=gen(7), **DEFAULT_BUDGET)
    b = cid.attribute(x, [0, 1, 2], generator=gen(7), **DEFAULT_BUDGET)
    assert torch.equal(a.log_sigma, b.log_sigma) and torch.equal(a.n_steps, b.n_steps)
    # the default stop rule gives rankings over input channels that do not depend on the noise draw
    runs = [channel_scores(a.attributions).mean(0)] + [
        channel_scores(cid.attribute(x, [0, 1, 2], generator=gen(s), **DEFAULT_BUDGET).attributions).mean(0)
        for s in (11, 12)]
    for i in range(3):
        for j in range(i + 1, 3):
            for t in range(3):
                rho = spearmanr(runs[i][t].numpy(), runs[j][t].numpy())[0]
                assert rho >= 0.9, (i, j, t, rho)
    assert not torch.equal(runs[0], runs[1])  # different seeds really draw different noise


@pytest.mark.parametrize("warm_start", [False, True])
def test_cid_mse_rule_stops_early(toy, warm_start):
    model, x = toy
    res = CID(model).attribute(x, [0, 1], n_steps=20, stop="mse", beta=1.2, warm_start=warm_start, generator=gen(0))
    assert res.n_steps.shape == (3, 2) and (res.n_steps >= 1).all()
    if warm_start:  # adaptive lambda holds some rows below the ratio; most stop early
        assert (res.n_steps < 20).float().mean() >= 0.5
    else:
        assert (res.n_steps < 20).all()


def test_cid_reference_sigma_rule_stops_after_the_first_update_and_carries_no_information(bn_case):
    """SPEC §4: with the reference defaults (lr 0.2, beta 1.2, 20 steps) the sigma-ratio stop fires after 2-3 steps.

    At sigma = exp(-5) the entropy term outweighs the MSE gradient everywhere, so Adam's first update moves every
    log sigma up by exactly lr: mean sigma grows by exp(0.2) = 1.22 > 1.2 and the next check freezes the row. We count
    the updates that shaped s (1); the reference counts the loop iterations, including the one whose check fires
    (which still moved the row through Adam's momentum): 2, i.e. "2-3 of 20".
    """
    model, x = bn_case
    res = CID(model, check_every=1).attribute(x, [0, 1, 2], generator=gen(0), **REFERENCE_B)
    assert (res.n_steps == 1).all()
    assert 2 <= int(res.n_steps.max()) + 1 <= 3  # the reference's count
    # every element moved by +lr once: the scores are one constant, the ignored channel is not told apart
    assert torch.allclose(res.log_sigma, torch.tensor(-5.0 + 0.2), atol=1e-5)
    default = CID(model).attribute(x, [0, 1, 2], generator=gen(0), **DEFAULT_BUDGET)
    assert channel_scores(default.attributions).std(dim=2).min() > 0.5  # the default rule separates channels


def test_cid_finished_rows_are_frozen_by_a_masked_update(bn_case):
    """A frozen row's s and moments stay exactly where they were while other steps run (reference defect 17)."""
    model, x = bn_case
    eager = CID(model, check_every=1).attribute(x, [0, 1], generator=gen(3), **REFERENCE_B)
    lazy = CID(model, check_every=100).attribute(x, [0, 1], generator=gen(3), **REFERENCE_B)  # runs all 20 steps
    assert torch.equal(eager.n_steps, lazy.n_steps)
    assert torch.equal(eager.log_sigma, lazy.log_sigma)


def test_cid_restores_model_state_and_leaves_batchnorm_alone(bn_case):
    _, x = bn_case
    model = warmed_bn_net(x)  # train mode, warmed running stats
    model.b2.eval()  # a sub-module deliberately in eval mode must stay so
    model.head.weight.requires_grad_(False)  # a frozen parameter must stay frozen
    before = copy.deepcopy(model.state_dict())
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    CID(model).attribute(x, [0, 1], n_steps=3, generator=gen(0))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "parameters or BN buffers changed"
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_cid_restores_model_state_on_errors(bn_case):
    _, x = bn_case
    model = warmed_bn_net(x)
    seen = []

    def failing(inp):
        seen.append((model.training, any(p.requires_grad for p in model.parameters())))
        if len(seen) > 1:
            raise RuntimeError("boom")
        return model(inp)

    with pytest.raises(RuntimeError, match="boom"):
        CID(_Wrapped(model, failing)).attribute(x, [0], n_steps=3, generator=gen(0))
    assert seen[0] == (False, False), "the forward must run in eval mode with frozen parameters"
    assert model.training and all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


class _Wrapped(nn.Module):
    """Module wrapper whose forward is an arbitrary callable (to inject failures)."""

    def __init__(self, inner: nn.Module, fn) -> None:
        super().__init__()
        self.inner, self.fn = inner, fn

    def forward(self, x):
        return self.fn(x)


# ------------------------------------------------------------------------------------------ chunking and memory
@pytest.mark.parametrize("stop", ["steps", "mse"])
def test_cid_result_does_not_depend_on_chunking(bn_case, stop):
    """Every chunk replays the call's noise stream and rows do not interact: chunk_size 1 == all types at once."""
    model, x = bn_case
    kw = dict(n_steps=8, stop=stop, beta=1.5)
    one = CID(model).attribute(x, [2, 0, 1], chunk_size=1, generator=gen(4), **kw)
    all_ = CID(model).attribute(x, [2, 0, 1], chunk_size=3, generator=gen(4), **kw)
    assert torch.equal(one.n_steps, all_.n_steps)
    torch.testing.assert_close(one.log_sigma, all_.log_sigma, rtol=0, atol=1e-5)
    # without the warm start (whose level is shared by the targets of a call) a type's result does not depend on
    # the other targets or their order either
    fixed = CID(model).attribute(x, [2, 0, 1], chunk_size=2, generator=gen(4), warm_start=False, **kw)
    alone = CID(model).attribute(x, [0], generator=gen(4), warm_start=False, **kw)
    torch.testing.assert_close(alone.log_sigma[:, 0], fixed.log_sigma[:, 1], rtol=0, atol=1e-5)


class OOMAbove(nn.Module):
    """Forward that runs out of memory on batches larger than ``limit`` rows (records the batch sizes it saw);
    with ``grad_only`` only when autograd records (the optimisation steps, not the clean prediction)."""

    def __init__(self, inner: nn.Module, limit: int, message: str | None = None, grad_only: bool = False) -> None:
        super().__init__()
        self.inner, self.limit, self.message, self.sizes, self.grad_only = inner, limit, message, [], grad_only

    def forward(self, x):
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.limit and (torch.is_grad_enabled() or not self.grad_only):
            if self.message:
                raise RuntimeError(self.message)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(x)


@pytest.mark.parametrize("message", [None, "CUDA error: out of memory"])
def test_cid_splits_a_chunk_on_out_of_memory_and_gives_the_same_result(bn_case, message):
    model, x = bn_case
    b = x.shape[0]
    ref = CID(model).attribute(x, [0, 1, 2], n_steps=4, chunk_size=3, generator=gen(9))
    fake = OOMAbove(model, limit=b, message=message)  # only one type (B rows) fits
    split = CID(fake).attribute(x, [0, 1, 2], n_steps=4, chunk_size=3, generator=gen(9))
    assert 3 * b in fake.sizes and max(s for s in fake.sizes if s <= b) == b  # tried all three, then one by one
    assert torch.equal(split.n_steps, ref.n_steps)
    torch.testing.assert_close(split.log_sigma, ref.log_sigma, rtol=0, atol=1e-5)


def test_cid_single_type_out_of_memory_raises_a_clear_error(bn_case):
    model, x = bn_case
    with pytest.raises(AttributionOutOfMemoryError, match="single cell type"):
        CID(OOMAbove(model, limit=1, grad_only=True)).attribute(x, [0, 1], n_steps=2, generator=gen(0))
    with pytest.raises(AttributionOutOfMemoryError, match="plain batch"):  # even the clean prediction does not fit
        CID(OOMAbove(model, limit=1)).attribute(x, [0, 1], n_steps=2, generator=gen(0))
    with pytest.raises(AttributionOutOfMemoryError, match="single cell type"):
        IG(OOMAbove(model, limit=1, grad_only=True)).attribute(x, [0, 1], n_steps=2)


def test_cid_other_errors_are_not_swallowed(bn_case):
    model, x = bn_case
    with pytest.raises(RuntimeError, match="something else"):
        CID(OOMAbove(model, limit=1, message="something else")).attribute(x, [0], n_steps=2, generator=gen(0))


# -------------------------------------------------------------------------------------------------- CID arguments
def test_cid_validates_its_arguments(toy):
    model, x = toy
    cid = CID(model)
    with pytest.raises(TypeError, match="generator"):
        cid.attribute(x, [0], generator=None)
    with pytest.raises(ValueError, match="target ids"):
        cid.attribute(x, [3], n_steps=1, generator=gen(0))  # only 3 classes
    with pytest.raises(ValueError, match="distinct"):
        cid.attribute(x, [0, 0], n_steps=1, generator=gen(0))
    with pytest.raises(ValueError, match="genes"):
        cid.attribute(x, [0], genes=[6], n_steps=1, generator=gen(0))
    with pytest.raises(ValueError, match="stop"):
        cid.attribute(x, [0], stop="never", generator=gen(0))
    with pytest.raises(ValueError, match="beta"):
        cid.attribute(x, [0], stop="sigma", beta=1.0, generator=gen(0))
    with pytest.raises(ValueError, match=r"\(B, G, H, W\)"):
        cid.attribute(x[0], [0], generator=gen(0))


def test_cid_noise_only_on_target_genes_and_works_under_inference_mode(toy):
    model, x = toy
    with torch.inference_mode():
        res = CID(model).attribute(x, [0], genes=[5, 1], n_steps=5, generator=gen(0))
    assert res.attributions.shape == (3, 1, 2, 16, 16)
    # the full run's scores of those genes differ (other genes' noise changes the output): genes really are a subset
    full = CID(model).attribute(x, [0], n_steps=5, generator=gen(0))
    assert not torch.allclose(full.attributions[:, :, [5, 1]], res.attributions)


# ------------------------------------------------------------------------------------------------------------- IG
def test_ig_completeness_on_a_toy_model(toy):
    model, x = toy
    targets = [0, 2]
    res = IG(model).attribute(x, targets, n_steps=32)
    assert res.attributions.shape == (3, 2, 6, 16, 16)
    # own check: sum of attributions = F(x) - F(0) for the masked logit sum F fixed from the clean prediction
    with torch.no_grad():
        logits = model(x)
        masks = prediction_masks(logits, torch.tensor(targets))  # (T, B, H, W)
        f = MaskedClassSum(model)
        for t, c in enumerate(targets):
            cls = torch.full((3,), c)
            gap = f(x, masks[t], cls) - f(torch.zeros_like(x), masks[t], cls)  # (B,)
            total = res.attributions[:, t].sum(dim=(1, 2, 3))
            torch.testing.assert_close(total, gap, rtol=1e-3, atol=1e-3)
    assert res.convergence_delta.abs().max() < 1e-3
    # the ignored channel gets exactly nothing
    assert res.attributions[:, :, 0].abs().max() == 0


def test_ig_runs_in_eval_mode_and_restores_the_model(bn_case):
    _, x = bn_case
    model = warmed_bn_net(x)
    before = copy.deepcopy(model.state_dict())
    res = IG(model).attribute(x, [1], n_steps=4, genes=[5, 0], internal_batch_size=x.shape[0] * 2)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()
    ref = IG(model).attribute(x, [1], n_steps=4, genes=[5, 0])
    torch.testing.assert_close(res.attributions, ref.attributions, rtol=1e-4, atol=1e-6)
    assert res.attributions[:, :, 1].abs().max() == 0  # channel 0 is disconnected


# ------------------------------------------------------------------------------------------------------- summarize
def _brute_force(attr: torch.Tensor, labels: torch.Tensor, targets: list[int]):
    t, g = attr.shape[1], attr.shape[2]
    tgs = torch.zeros(t, g, dtype=torch.float64)
    pix = torch.zeros(t, dtype=torch.float64)
    for i, c in enumerate(targets):
        for b in range(attr.shape[0]):
            for y in range(attr.shape[3]):
                for xx in range(attr.shape[4]):
                    if labels[b, y, xx] == c:
                        tgs[i] += attr[b, i, :, y, xx].double()
                        pix[i] += 1
    return tgs, pix


def test_cid_summary_matches_brute_force_from_attribute():
    model = WeightedBlur(TOY_W)
    x = torch.rand(2, 6, 6, 6, generator=gen(2))
    labels = torch.randint(0, 4, (2, 6, 6), generator=gen(3))
    targets, genes = [2, 1], [5, 3, 0]
    kw = dict(genes=genes, n_steps=6, stop="mse", beta=1.3, chunk_size=1)
    full = CID(model).attribute(x, targets, generator=gen(8), **kw)
    summary = CID(model).summarize(x, labels, torch.tensor(targets), generator=gen(8), **kw)
    assert isinstance(summary, AttributionSummary)
    assert summary.gene_sum.shape == (2, 2, 6, 6) and summary.gene_sum.dtype == torch.float32
    assert summary.type_gene_sum.shape == (2, 3) and summary.type_gene_sum.dtype == torch.float64
    assert summary.type_pixels.shape == (2,) and summary.type_pixels.dtype == torch.float64
    assert summary.n_steps.dtype == torch.int64 and torch.equal(summary.n_steps, full.n_steps)
    torch.testing.assert_close(summary.gene_sum, full.attributions.sum(dim=2))
    tgs, pix = _brute_force(full.attributions, labels, targets)
    torch.testing.assert_close(summary.type_gene_sum, tgs, rtol=1e-5, atol=1e-4)
    assert torch.equal(summary.type_pixels, pix)


def test_ig_summary_uses_absolute_attributions():
    model = WeightedBlur(TOY_W - 0.4)  # mixed signs
    x = torch.rand(2, 6, 6, 6, generator=gen(2))
    labels = torch.randint(0, 3, (2, 6, 6), generator=gen(4))
    full = IG(model).attribute(x, [1, 2], n_steps=8)
    assert (full.attributions < 0).any()
    summary = IG(model).summarize(x, labels, [1, 2], n_steps=8, chunk_size=1)
    torch.testing.assert_close(summary.gene_sum, full.attributions.abs().sum(dim=2), rtol=1e-5, atol=1e-6)
    tgs, pix = _brute_force(full.attributions.abs(), labels, [1, 2])
    torch.testing.assert_close(summary.type_gene_sum, tgs, rtol=1e-5, atol=1e-5)
    assert torch.equal(summary.type_pixels, pix) and (summary.n_steps == 8).all()


def test_summarize_dispatches_on_the_config(bn_case):
    model, x = bn_case
    labels = torch.randint(0, 3, (x.shape[0], *x.shape[2:]), generator=gen(0))
    genes, classes = select_targets(x.sum(dim=(0, 2, 3)), torch.bincount(labels.flatten(), minlength=3), 4, 2)
    assert summarize(model, x, labels, targets=classes, genes=genes, config=AttributionConfig(method="none")) is None
    cfg = AttributionConfig(method="CID", cid_n_steps=3)
    s = summarize(model, x, labels, targets=classes, genes=genes, config=cfg, generator=gen(0))
    direct = CID(model).summarize(x, labels, classes, genes=genes, n_steps=3, generator=gen(0))
    assert torch.equal(s.gene_sum, direct.gene_sum) and (s.n_steps == 3).all()
    assert s.gene_sum.shape == (x.shape[0], 2, *x.shape[2:]) and s.type_gene_sum.shape == (2, 4)
    assert s.gene_sum.device == x.device
    ig = summarize(model, x, labels, targets=classes, genes=genes, config=AttributionConfig(method="IG", ig_n_steps=2))
    assert ig.type_gene_sum.shape == (2, 4) and (ig.n_steps == 2).all() and (ig.gene_sum >= 0).all()
    empty = summarize(model, x, labels, targets=classes[:0], genes=genes, config=cfg, generator=gen(0))
    assert empty.gene_sum.shape == (x.shape[0], 0, *x.shape[2:]) and empty.type_gene_sum.shape == (0, 4)


def test_summary_rejects_mismatched_labels(toy):
    model, x = toy
    with pytest.raises(ValueError, match="labels"):
        CID(model).summarize(x, torch.zeros(3, 8, 8, dtype=torch.long), [0], n_steps=1, generator=gen(0))
    with pytest.raises(TypeError, match="integer"):
        CID(model).summarize(x, torch.zeros(3, 16, 16), [0], n_steps=1, generator=gen(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cid_on_cuda_with_mixed_precision(bn_case):  # pragma: no cover - CPU CI
    model, x = bn_case
    model = copy.deepcopy(model).cuda()
    res = CID(model).attribute(x.cuda(), [0, 1], generator=torch.Generator(device="cuda").manual_seed(0), **DEFAULT_BUDGET)
    scores = channel_scores(res.attributions).cpu()
    assert (scores.argmin(dim=2) == 0).all() and (scores.argmax(dim=2) == 5).all()
    assert next(model.parameters()).dtype == torch.float32
