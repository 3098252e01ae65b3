"""Set2Model (seed 000): the mixture Hessian (eq. 2, Table 1) against autograd, the implicit gradient of
the EM fit against finite differences and unrolled EM, the Corollary's block-diagonal case, the prototype
reduction, the backward pass's memory, the episodes, retrieval mAP, DDP parity and exact resume."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from cli_runs import cli_fit, metric_rows
from torch import nn
from torch.nn.functional import binary_cross_entropy_with_logits
from torchmetrics.functional.retrieval import retrieval_average_precision

from datamodules import Episodes
from zoo import Set2Model
from zoo.set2model import (
    Mixture,
    _table1,
    average_precision,
    em_fit,
    fit_gmm,
    gmm_hessian,
    gmm_hessian_blocks,
    log_likelihood,
    log_likelihood_unconstrained,
    responsibilities,
)

F64 = torch.float64


def random_mixture(S=2, K=3, D=2, seed=0) -> Mixture:
    g = torch.Generator().manual_seed(seed)
    return Mixture(
        torch.softmax(torch.randn(S, K, generator=g, dtype=F64), -1),
        torch.randn(S, K, D, generator=g, dtype=F64),
        torch.rand(S, K, D, generator=g, dtype=F64) + 0.5,
    )


def two_clusters(S=3, N=8, D=2, spread=0.6, separation=1.0, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 0.0], [3.0, 1.0]], dtype=F64)[:, :D] * separation
    return centres[torch.arange(N) % 2] + spread * torch.randn(S, N, D, generator=g, dtype=F64)


def pack(fit: Mixture) -> torch.Tensor:
    """θ in gmm_hessian's order: (μ_ij, σ_ij) for i, j."""
    return torch.stack([fit.means, fit.scales], -1).reshape(fit.means.shape[0], -1)


# ------------------------------------------------------------------------------------------- Hessian


def test_table1_entries_are_the_derivatives_of_g() -> None:
    """Every entry of Table 1 (divided by g) against autograd of g(μ, σ | d) in float64, to 1e-12 relative."""
    d, mu, sigma = torch.tensor(0.7, dtype=F64), torch.tensor(-0.4, dtype=F64), torch.tensor(0.8, dtype=F64)

    def g(m, s):
        return torch.exp(-((d - m) ** 2) / (2 * s**2)) / (math.sqrt(2 * math.pi) * s)

    grad = torch.autograd.functional.jacobian(g, (mu, sigma))
    hess = torch.autograd.functional.hessian(g, (mu, sigma))
    phi, psi = _table1(d.reshape(1, 1, 1), mu.reshape(1, 1, 1), sigma.reshape(1, 1, 1))
    value = g(mu, sigma)
    torch.testing.assert_close(phi.flatten() * value, torch.stack(grad), rtol=1e-12, atol=0)
    torch.testing.assert_close(psi.reshape(2, 2) * value, torch.tensor(hess, dtype=F64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("coords", ["seed", "unconstrained"])
def test_hessian_equals_autograd(coords: str) -> None:
    """gmm_hessian (eq. 2 + Table 1, corrected) = autograd's Hessian of l at random points, with a padded
    element masked out. Float64; tolerance 1e-10 absolute on entries of order 10-100 (rounding only)."""
    x = torch.randn(2, 7, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    fit = random_mixture()
    ours = gmm_hessian(x, *fit, mask=mask, coords=coords)
    for s in range(2):
        one = lambda t, s=s: t[s : s + 1]  # noqa: E731
        if coords == "seed":

            def loglik(theta, s=s, one=one):
                th = theta.reshape(1, 3, 2, 2)
                return log_likelihood(one(x), one(fit.weights), th[..., 0], th[..., 1], one(mask)).sum()

            theta = pack(fit)[s]
        else:

            def loglik(theta, s=s, one=one):
                th = theta[:12].reshape(1, 3, 2, 2)
                return log_likelihood_unconstrained(
                    one(x), theta[12:][None], th[..., 0], th[..., 1], one(mask)
                ).sum()

            theta = torch.cat(
                [pack(Mixture(fit.weights, fit.means, fit.scales.log()))[s], fit.weights[s].log()]
            )
        reference = torch.autograd.functional.hessian(loglik, theta)
        torch.testing.assert_close(ours[s], reference, rtol=0, atol=1e-10)


def test_the_seeds_third_case_is_off_by_h_squared() -> None:
    """Eq. 2, case i ≠ u, as printed: -(1/h²) r_i r_u φ φ. Autograd disagrees (by the factor 1/h² per
    observation); without the 1/h² (as the code has it) it agrees to 1e-12."""
    x = torch.randn(1, 1, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    fit = random_mixture(S=1, K=2)
    theta = pack(fit)[0]

    def loglik(t):
        th = t.reshape(1, 2, 2, 2)
        return log_likelihood(x, fit.weights, th[..., 0], th[..., 1]).sum()

    reference = torch.autograd.functional.hessian(loglik, theta)[
        :4, 4:
    ]  # rows component 0, columns component 1
    phi, _ = _table1(x, fit.means, fit.scales)
    r = responsibilities(x, *fit)[0, 0]
    h = torch.exp(log_likelihood(x, *fit))[0]  # one observation: h(θ | d)
    outer = phi[0, 0, 0].reshape(4, 1) * phi[0, 0, 1].reshape(1, 4)
    corrected, printed = -r[0] * r[1] * outer, -(r[0] * r[1] / h**2) * outer
    torch.testing.assert_close(corrected, reference, rtol=0, atol=1e-12)
    assert not torch.allclose(printed, reference, rtol=0.1) and abs(h - 1) > 0.5


def test_hard_responsibilities_make_the_hessian_block_diagonal() -> None:
    """The Corollary: clusters 60 spreads apart give responsibilities 0/1 to float64 precision (checked,
    1 - max r < 1e-30); then every entry outside the 2x2 (μ_ij, s_ij) blocks and the logits' block is
    below 1e-12 (the dropped terms are of order r(1 - r)), and the blocks equal gmm_hessian_blocks."""
    x = two_clusters(separation=20.0)
    fit = fit_gmm(x, 2, 50, 0.05)
    r = responsibilities(x, *fit)
    assert (1 - r.amax(-1)).max() < 1e-30
    full = gmm_hessian(x, *fit)
    blocks, logits = gmm_hessian_blocks(x, *fit)
    assembled = torch.stack(
        [torch.block_diag(*blocks[s].reshape(-1, 2, 2), logits[s]) for s in range(len(x))]
    )
    torch.testing.assert_close(full, assembled, rtol=0, atol=1e-12)
    off = full.clone()
    off[assembled != 0] = 0
    assert off.abs().max() < 1e-12 and assembled.abs().max() > 1


# -------------------------------------------------------------------------------- implicit gradient


def weighted_sum(fit: Mixture, c: torch.Tensor) -> torch.Tensor:
    """Σ c · (weights, means, scales), per set: ``[S]``; ``c`` is ``[S, K + 2 K D]``."""
    return (torch.cat([t.flatten(1) for t in fit], -1) * c).sum(-1)


@pytest.mark.parametrize("case", ["soft", "masked-with-floored-scales"])
def test_implicit_gradient_equals_finite_differences_and_unrolled_em(case: str) -> None:
    """d/dx of a random linear function of (weights, means, scales) at the converged fit (300 EM steps,
    float64): the implicit gradient equals central finite differences (h = 1e-6; their rounding error is
    ε |f| / h ≈ 2e-16 * 20 / 1e-6 = 4e-9 and truncation O(h²) smaller: tolerance 1e-7) and
    back-propagation through the 300 unrolled EM steps (the same limit: tolerance 1e-10). The perturbed
    copies of each set are fitted as one batch of sets."""
    x = two_clusters(S=2, N=8)
    mask = None
    if case != "soft":  # one set of 5 with an outlier: a one-element component, all its σ at the floor
        mask = torch.ones(2, 8, dtype=torch.bool)
        mask[0, 5:] = False
        x[0, 4] = torch.tensor([8.0, -6.0], dtype=F64)
    fit = fit_gmm(x, 2, 300, 0.05, mask)
    if case != "soft":
        assert (fit.scales == 0.05).any(), "the case should exercise the floor"
    else:
        assert (1 - responsibilities(x, *fit).amax(-1)).max() > 1e-6, "the case should be soft (dense solve)"
    c = torch.randn(2, 2 + 2 * 2 * 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    xg = x.clone().requires_grad_(True)
    (implicit,) = torch.autograd.grad(weighted_sum(fit_gmm(xg, 2, 300, 0.05, mask), c).sum(), xg)
    xu = x.clone().requires_grad_(True)
    (unrolled,) = torch.autograd.grad(weighted_sum(em_fit(xu, 2, 300, 0.05, mask), c).sum(), xu)
    h, (S, N, D) = 1e-6, x.shape
    which = torch.arange(S).repeat_interleave(N * D)  # perturbation p moves set p // (N D)
    bumps = (torch.eye(S * N * D, dtype=F64) * h).reshape(S * N * D, S, N, D)[torch.arange(S * N * D), which]
    m = None if mask is None else mask[which]
    plus = weighted_sum(fit_gmm(x[which] + bumps, 2, 300, 0.05, m), c[which])
    minus = weighted_sum(fit_gmm(x[which] - bumps, 2, 300, 0.05, m), c[which])
    fd = ((plus - minus) / (2 * h)).reshape(S, N, D)
    torch.testing.assert_close(implicit, fd, rtol=0, atol=1e-7)
    torch.testing.assert_close(implicit, unrolled, rtol=0, atol=1e-10)
    if mask is not None:
        assert implicit[0, 5:].abs().max() == 0  # padded elements get no gradient


def test_block_solve_equals_dense_solve_when_responsibilities_are_hard() -> None:
    """On hard data the default picks the block-diagonal solve; forcing the dense one (hard_tol=-1) gives
    the same gradient to 1e-12, as does unrolled EM."""
    x = two_clusters(separation=20.0)
    c = torch.randn(3, 2 + 2 * 2 * 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    grads = []
    for fit_fn in (lambda t: fit_gmm(t, 2, 50, 0.05), lambda t: fit_gmm(t, 2, 50, 0.05, hard_tol=-1.0),
                   lambda t: em_fit(t, 2, 50, 0.05)):  # fmt: skip
        xg = x.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(weighted_sum(fit_fn(xg), c).sum(), xg)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(grads[0], grads[2], rtol=0, atol=1e-12)


def test_fit_is_deterministic_and_runs_under_no_grad() -> None:
    x = two_clusters().float()
    with torch.no_grad():
        a, b = fit_gmm(x, 2, 20, 0.05), fit_gmm(x.clone(), 2, 20, 0.05)
    assert all(torch.equal(s, t) and s.grad_fn is None for s, t in zip(a, b, strict=True))
    torch.testing.assert_close(a.weights.sum(-1), torch.ones(3))


def saved_bytes(fn) -> int:
    """Bytes of every tensor autograd saves for backward while ``fn`` runs (forward and backward graphs)."""
    total = 0

    def pack_hook(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        fn()
    return total


def test_implicit_backward_memory_does_not_grow_with_em_steps() -> None:
    """Measured with saved-tensor hooks: the implicit forward keeps x and the fit (1,408 bytes here) and
    the backward's own graph (one log-likelihood and its gradient) is the same size for 5, 50 and 500
    EM steps; unrolled EM saves ~12 kB per step (grows 100x from 5 to 500 steps)."""
    x = torch.randn(4, 10, 3, generator=torch.Generator().manual_seed(5), dtype=F64)
    implicit, unrolled = [], []
    for steps in (5, 50, 500):
        xg = x.clone().requires_grad_(True)
        out = {}
        forward = saved_bytes(lambda xg=xg, steps=steps, out=out: out.update(fit=fit_gmm(xg, 2, steps, 0.05)))
        backward = saved_bytes(lambda out=out: sum(t.sum() for t in out["fit"]).backward())
        implicit.append((forward, backward))
        unrolled.append(
            saved_bytes(lambda steps=steps: em_fit(x.clone().requires_grad_(True), 2, steps, 0.05))
        )
    assert implicit[0] == implicit[1] == implicit[2]
    assert implicit[0][0] == (4 * 10 * 3 + 4 * 2 + 2 * 4 * 2 * 3) * 8  # x, weights, means, scales
    assert unrolled[2] > 50 * unrolled[0]


# ------------------------------------------------------------------------------------------- model


def episode_batch(B=3, n=4, Q=6, shape=(1, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(Q) % 3 == 0).float().expand(B, Q).clone()
    return torch.rand(B, n, *shape, generator=g), torch.rand(B, Q, *shape, generator=g), labels


def test_one_fixed_isotropic_component_is_the_prototype_model() -> None:
    """K = 1, σ = 1 fixed: the fit's mean is the set's mean embedding, the score is -|q - c|²/2 - E log(2π)/2,
    and the loss and every parameter's gradient (through the implicit backward) equal those of a
    prototypical network written directly, to 1e-12 in float64."""
    model = Set2Model(
        shape=(1, 8, 8), embedding_dim=4, n_components=1, covariance="fixed", hidden=(8,)
    ).double()
    sets, queries, labels = (t.double() for t in episode_batch())
    loss = model.training_loss((sets, queries, labels))
    ours = torch.autograd.grad(loss, list(model.parameters()))
    z_set, z_query = model.embed(sets), model.embed(queries)
    centre = z_set.mean(1, keepdim=True)
    score = -0.5 * (z_query - centre).square().sum(-1) - 2 * math.log(2 * math.pi)
    reference = binary_cross_entropy_with_logits(model.log_alpha.exp() * score + model.bias, labels)
    torch.testing.assert_close(loss, reference, rtol=0, atol=1e-12)
    for a, b in zip(ours, torch.autograd.grad(reference, list(model.parameters())), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_every_parameter_gets_a_finite_gradient_and_checkpoints_round_trip(tmp_path: Path) -> None:
    model = Set2Model(shape=(1, 8, 8), embedding_dim=4, n_components=2, em_steps=5, hidden=(16,))
    batch = episode_batch()
    model.training_loss(batch).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, max_epochs=0)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    restored = Set2Model.load_from_checkpoint(tmp_path / "m.ckpt")
    with torch.no_grad():
        a = model.score(model.fit(batch[0]), batch[1])
        b = restored.score(restored.fit(batch[0]), batch[1])
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"n_components": 0}, "n_components"), ({"covariance": "full"}, "covariance"), ({"lr": 0.0}, "lr")],
)
def test_bad_arguments_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Set2Model(shape=(1, 8, 8), **kwargs)


def test_average_precision_matches_torchmetrics() -> None:
    g = torch.Generator().manual_seed(6)
    scores, labels = torch.randn(5, 12, generator=g, dtype=F64), torch.rand(5, 12, generator=g) < 0.3
    labels[:, 0] = True
    ours = average_precision(scores, labels)
    # torchmetrics 1.9 counts a relevant item with a score <= 0 as not relevant (``where(preds > 0, ...)``),
    # so it cannot rank log-likelihoods as they are; shifted scores rank the same and are all positive.
    for s in range(5):
        reference = retrieval_average_precision(scores[s] + 10, labels[s]).item()
        assert ours[s].item() == pytest.approx(reference, abs=1e-6)  # torchmetrics works in float32
    assert average_precision(
        torch.tensor([[3.0, 2.0, 1.0]]), torch.tensor([[0, 1, 1]])
    ).item() == pytest.approx((1 / 2 + 2 / 3) / 2)


# ---------------------------------------------------------------------------------------- episodes


def test_episodes_hold_out_classes_and_are_deterministic() -> None:
    data = Episodes(set_size=5, n_queries=20, train_episodes=8, val_episodes=4, test_episodes=4, batch_size=4)
    data.setup()
    images, labels = data.load()
    for split in ("train", "val", "test"):
        ds = data.splits[split]
        classes = set(data.train_classes if split == "train" else data.test_classes)
        for i in range(len(ds)):
            members, queries, q_labels = ds.episode(i)
            member_classes = {int(c) for c in labels[ds_index(ds, members, images)]}
            assert len(member_classes) == 1 and member_classes <= classes
            query_classes = labels[ds_index(ds, queries, images)]
            assert set(query_classes.tolist()) <= classes
            assert torch.equal(q_labels.bool(), query_classes == member_classes.pop())
            assert len(set(members.tolist()) | set(queries.tolist())) == 25  # all distinct images
    val, test = data.splits["val"].images, data.splits["test"].images
    assert not (val.flatten(1)[:, None] == test.flatten(1)[None]).all(-1).any()  # disjoint held-out images
    again = Episodes(
        set_size=5, n_queries=20, train_episodes=8, val_episodes=4, test_episodes=4, batch_size=4
    )
    again.setup()
    for split in ("train", "val"):
        a, b = data.splits[split].__getitems__([0, 3]), again.splits[split].__getitems__([0, 3])
        assert all(torch.equal(s, t) for s, t in zip(a, b, strict=True))
    sets, queries, q = next(iter(data.train_dataloader()))
    assert sets.shape == (4, 5, 1, 8, 8) and queries.shape == (4, 20, 1, 8, 8) and q.shape == (4, 20)
    data.splits["train"].set_epoch(1)
    assert not torch.equal(data.splits["train"][0][0], again.splits["train"][0][0])


def ds_index(ds, idx, images) -> torch.Tensor:
    """Positions in ``images`` (the full base set) of the split's images ``ds.images[idx]``."""
    flat = images.flatten(1)
    return torch.stack([(flat == ds.images[i].flatten()).all(-1).nonzero()[0, 0] for i in idx])


# --------------------------------------------------------------------------------- through the CLI

CLI_ARGS = (
    "--model=Set2Model", "--model.embedding_dim=8", "--model.hidden=[32]", "--model.em_steps=10",
    "--data=Episodes", "--data.train_episodes=64", "--data.val_episodes=16", "--data.test_episodes=16",
    "--data.batch_size=16", "--trainer.check_val_every_n_epoch=1",
)  # fmt: skip


def final_state(log_dir: Path) -> dict:
    (checkpoint,) = (log_dir / "checkpoints").glob("*.ckpt")
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.ddp
def test_two_processes_match_one(tmp_path: Path) -> None:
    """Episodes are functions of (seed, split, epoch, index) and nothing is random in the model, so 2 gloo
    processes log the one-process val/map, val/loss, val/map_mean and end with the same weights.

    Run in float64 (``--trainer.precision=64-true``): in float32 the two runs' gradients agree to ~4e-7 of
    each layer's largest entry (measured), but Adam divides by sqrt(v) + 1e-8, so a nearly dead ReLU unit
    or an almost always black pixel, whose gradient is at that rounding level, takes steps of O(lr) whose
    sign is rounding noise (seen: 2.7e-3 on one first-layer bias after 8 steps). A gradient change δ moves
    Adam's step by at most lr δ / eps; float64 rounding (δ ~ 1e-17 on gradients of ~0.1) gives <= 1e-12 per
    step, so 1e-9 on metrics and weights is safe, while a sharding or averaging bug moves weights by ~lr."""
    runs = {
        d: cli_fit(tmp_path / f"d{d}", d, *CLI_ARGS, "--trainer.max_epochs=2", "--trainer.precision=64-true")
        for d in (1, 2)
    }
    rows = {d: metric_rows(runs[d], "val/map") for d in runs}
    assert len(rows[1]) == len(rows[2]) == 2
    for one, two in zip(rows[1], rows[2], strict=True):
        for key in ("val/map", "val/loss", "val/map_mean"):
            assert float(one[key]) == pytest.approx(float(two[key]), abs=1e-9), key
    s1, s2 = final_state(runs[1]), final_state(runs[2])
    for name in s1:
        torch.testing.assert_close(
            s1[name], s2[name], rtol=0, atol=1e-9, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.slow
def test_resume_through_the_cli_is_exact(tmp_path: Path) -> None:
    """3 epochs in one go == 2 epochs, then ``--ckpt_path`` to their checkpoint and 1 more: bit for bit."""
    straight = final_state(cli_fit(tmp_path / "straight", 1, *CLI_ARGS, "--trainer.max_epochs=3"))
    first = cli_fit(tmp_path / "first", 1, *CLI_ARGS, "--trainer.max_epochs=2")
    (checkpoint,) = (first / "checkpoints").glob("*.ckpt")
    resumed = final_state(cli_fit(tmp_path / "resumed", 1, *CLI_ARGS, "--trainer.max_epochs=3",
                                  f"--ckpt_path={checkpoint}"))  # fmt: skip
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


# -- the embedding is a plug-in; so are the optimiser and its schedule -------------------------------------


class ConvEmbedding(nn.Module):
    """A user's embedding ``[B, 1, 8, 8] -> [B, width]`` (a small convnet, not one of genzoo's presets)."""

    def __init__(self, width: int = 6, flat: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2, padding=1)  # 8x8 -> 4x4
        self.head = nn.Linear(4 * 4 * 4, width)
        self.flat = flat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.head(torch.relu(self.conv(x)).flatten(1))
        return z.flatten() if self.flat else z


def train_on_episodes(model: Set2Model, steps: int) -> L.Trainer:
    """``steps`` steps on digit episodes (sets of 5, 8 queries, batches of 4), validation off."""
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    data = Episodes(set_size=5, n_queries=8, train_episodes=64, val_episodes=8, test_episodes=8, batch_size=4)
    trainer.fit(model, datamodule=data)
    return trainer


def test_a_users_embedding_trains_under_a_trainer_and_reloads_from_its_checkpoint(tmp_path: Path) -> None:
    """A convnet embedding of width 6: E is read from its dry run (``embedding_dim`` ignored, α starts at
    1/6); 6 steps: finite loss, every weight of the user's network moved; the checkpoint reloads with
    ``Set2Model.load_from_checkpoint(path, embedding=ConvEmbedding())`` and scores queries bit for bit."""
    torch.manual_seed(0)
    model = Set2Model(shape=(1, 8, 8), embedding=ConvEmbedding(), n_components=1, em_steps=3)
    assert model.embedding_dim == 6 and model.log_alpha.item() == pytest.approx(-math.log(6))
    assert "embedding" not in model.hparams
    before = {name: p.detach().clone() for name, p in model.net.named_parameters()}
    trainer = train_on_episodes(model, 6)
    assert trainer.global_step == 6 and torch.isfinite(trainer.callback_metrics["train/loss"])
    for name, p in model.net.named_parameters():
        assert not torch.equal(p, before[name]), name
    trainer.save_checkpoint(tmp_path / "s2m.ckpt")
    restored = Set2Model.load_from_checkpoint(tmp_path / "s2m.ckpt", embedding=ConvEmbedding())
    sets, queries, _ = episode_batch()
    with torch.no_grad():
        assert torch.equal(model.score(model.fit(sets), queries), restored.score(restored.fit(sets), queries))


def test_a_wrong_shape_embedding_fails_at_construction_naming_the_role() -> None:
    """An embedding that returns ``[B * E]`` instead of ``[B, E]`` is refused when the family is built."""
    message = (
        r"Set2Model: the embedding \(ConvEmbedding\) must map \[B, 1, 8, 8\] to \[B, E\].*returned \[12\]"
    )
    with pytest.raises(ValueError, match=message):
        Set2Model(shape=(1, 8, 8), embedding=ConvEmbedding(flat=True))


def test_the_optimizer_and_schedule_are_the_users() -> None:
    """``optimizer=partial(SGD, lr=0.1)`` is what the Trainer steps with; ``LinearLR(start_factor=1,
    end_factor=0.5, total_iters=4)`` lowers it linearly: 0.1 · (1 - 0.5 · 3/4) = 0.0625 after 3 steps."""
    torch.manual_seed(0)
    model = Set2Model(
        shape=(1, 8, 8), embedding_dim=4, n_components=1, em_steps=3, hidden=(16,),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.LinearLR, start_factor=1.0, end_factor=0.5,
                                       total_iters=4),
    )  # fmt: skip
    trainer = train_on_episodes(model, 3)
    (optimizer,) = trainer.optimizers
    assert type(optimizer) is torch.optim.SGD
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0625, rel=1e-12)
    default = Set2Model(shape=(1, 8, 8), hidden=(8,), lr=2e-3).configure_optimizers()
    assert type(default) is torch.optim.Adam and default.param_groups[0]["lr"] == 2e-3


def test_a_users_embedding_under_bf16_autocast_keeps_the_fit_in_float32() -> None:
    """Under CPU bf16 autocast the user's convnet runs in bfloat16, its embeddings are cast to float32 for
    the EM fit and the query log-likelihoods, and the implicit backward reaches every weight finitely."""
    torch.manual_seed(0)
    model = Set2Model(shape=(1, 8, 8), embedding=ConvEmbedding(), n_components=2, em_steps=3)
    sets, queries, labels = episode_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.net(sets[0]).dtype == torch.bfloat16
        fit = model.fit(sets)
        loss = model.training_loss((sets, queries, labels))
    assert fit.means.dtype == fit.scales.dtype == loss.dtype == torch.float32
    loss.backward()
    for name, p in model.net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.slow
def test_a_users_embedding_from_a_recipe_reloads_with_no_arguments(tmp_path: Path, monkeypatch) -> None:
    """``--model.embedding`` as class_path / init_args through ``cli.py fit`` (2 steps): the checkpoint keeps
    the config, ``Set2Model.load_from_checkpoint(path)`` rebuilds the network and scores bit for bit."""
    from cli import run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    embedding = f'{{"class_path": "{__name__}.ConvEmbedding", "init_args": {{"width": 5}}}}'
    cli = run([
        "fit", "--model=Set2Model", f"--model.embedding={embedding}", "--model.n_components=1",
        "--model.em_steps=3", "--data=Episodes", "--data.n_queries=8", "--data.train_episodes=8",
        "--data.batch_size=4", "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
    ])  # fmt: skip
    assert type(cli.model.net) is ConvEmbedding and cli.model.embedding_dim == 5
    (path,) = tmp_path.rglob("*.ckpt")
    restored = Set2Model.load_from_checkpoint(path)
    sets, queries, _ = episode_batch()
    with torch.no_grad():
        assert torch.equal(
            cli.model.score(cli.model.fit(sets), queries), restored.score(restored.fit(sets), queries)
        )
