"""zoo.Flow as a plug-in family (issue 17): any zuko flow in the ``flow`` role gets genzoo's objectives,
metrics, keyed noise, optimiser / schedule arguments, checkpoints and CLI; the ``"spline"`` preset is zuko's
neural spline flow layer for layer."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
import zuko
from zuko.distributions import DiagNormal
from zuko.lazy import UnconditionalDistribution

from cli import run as cli_main
from datamodules import Toy2D
from zoo import Flow
from zoo.noise import global_normal, mix_key, pinned_noise

F64 = torch.float64
QUIET = dict(
    accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
    num_sanity_val_steps=0,
)  # fmt: skip


class MyFlow(zuko.flows.Flow):
    """A user's own flow, not one of genzoo's presets: ``transforms`` spline couplings (zuko's MADE with 2
    passes) over a Gaussian base with a LEARNED mean and scale, so genzoo's base noise must be mapped into
    the base (z = loc + scale · u) before it is pushed through the layers."""

    def __init__(self, features: int = 2, transforms: int = 2, hidden: tuple[int, ...] = (16,)) -> None:
        spline = functools.partial(zuko.transforms.MonotonicRQSTransform, slope=1e-3)
        layers = [
            zuko.flows.MaskedAutoregressiveTransform(
                features, passes=2, univariate=spline, shapes=[(6,), (6,), (5,)], hidden_features=hidden,
                order=torch.arange(features) if i % 2 == 0 else torch.arange(features).flip(0),
            )
            for i in range(transforms)
        ]  # fmt: skip
        base = UnconditionalDistribution(DiagNormal, loc=torch.zeros(features), scale=torch.ones(features))
        super().__init__(layers, base)


def toy(n_train: int = 512, batch_size: int = 128) -> Toy2D:
    return Toy2D("8gaussians", n_train=n_train, n_val=256, n_test=0, batch_size=batch_size, seed=0)


def parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def normal_target(x: torch.Tensor) -> torch.Tensor:
    """N((1, -0.5), [[1, 0.8], [0.8, 1]]): a normalised target for reverse KL."""
    cov = torch.tensor([[1.0, 0.8], [0.8, 1.0]], dtype=x.dtype)
    mean = torch.tensor([1.0, -0.5], dtype=x.dtype)
    return torch.distributions.MultivariateNormal(mean, cov).log_prob(x)


# -- the flow role -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: zuko.flows.NSF(features=2, transforms=2, hidden_features=(16,)),
                                  lambda: MyFlow()], ids=["zuko-NSF", "user-MyFlow"])  # fmt: skip
def test_a_zuko_flow_trains_forward_kl_under_a_trainer(make) -> None:
    """12 Adam steps of maximum likelihood on 8 Gaussians: every parameter of the user's flow (the base's mean
    and scale too) moved, train/loss is finite, and the logged val/kl is KL(p_data || q) on the 256
    validation points, recomputed here from the flow's own ``log_prob`` and the data's exact density
    (to 1e-4 nats)."""
    torch.manual_seed(0)
    flow = make()
    model = Flow(shape=(2,), flow=flow, lr=3e-3)
    before = parameters(flow)
    trainer = L.Trainer(max_steps=12, limit_val_batches=1.0, val_check_interval=4, **QUIET)
    data = toy()
    trainer.fit(model, data)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    after = parameters(flow)
    for name in before:
        assert not torch.equal(before[name], after[name]), f"{name} did not train"
    x = torch.cat([batch[0] if isinstance(batch, list | tuple) else batch for batch in data.val_dataloader()])
    with torch.no_grad():
        expected = (data.log_prob(x) - flow().log_prob(x)).mean()
    assert float(trainer.callback_metrics["val/kl"]) == pytest.approx(float(expected), abs=1e-4)


def test_a_zuko_flow_trains_reverse_kl_on_genzoo_keyed_noise() -> None:
    """Reverse KL with zuko's NSF: (1) the training draws are genzoo's keyed base noise, pushed through the
    flow: under ``pinned_noise(step=3)`` the loss equals the one computed by hand from
    ``global_normal(key=mix_key(seed, 0, 3))`` through zuko's inverse transform, to 1e-6; (2) 60 steps of a
    plain Adam loop (fresh noise every call) lower KL(q || p) against a normalised Gaussian, measured on
    4,000 fixed draws, from > 0.5 to < half of it (seen 2.32 -> 0.06)."""
    torch.manual_seed(0)
    nsf = zuko.flows.NSF(features=2, transforms=2, hidden_features=(16,))
    model = Flow(shape=(2,), flow=nsf, objective="reverse", target=normal_target, seed=7)
    batch = torch.zeros(64, 2)
    with pinned_noise(model, step=3):
        loss = model.training_loss(batch).detach()
        again = model.training_loss(batch).detach()
    u = global_normal(64, (2,), key=mix_key(7, 0, 3))
    with torch.no_grad():
        x, ladj = nsf().transform.inv.call_and_ladj(u)
        by_hand = (Flow.base_log_prob(u) - ladj - normal_target(x)).mean()
    assert float(loss) == float(again)
    assert float(loss) == pytest.approx(float(by_hand), abs=1e-6)

    def kl() -> float:
        with torch.no_grad():
            x, log_q = model.sample_and_log_prob(4000, generator=torch.Generator().manual_seed(1))
            return float((log_q - normal_target(x)).mean())

    start = kl()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        optimizer.zero_grad()
        model.training_loss(batch).backward()
        optimizer.step()
    assert start > 0.5 and kl() < start / 2, (start, kl())


@pytest.mark.parametrize(
    "make", [lambda: MyFlow(), lambda: zuko.flows.NCSF(features=2, transforms=2, hidden_features=(8,))],
    ids=["learned-Gaussian-base", "BoxUniform-base"],
)  # fmt: skip
def test_pushed_samples_carry_their_exact_log_density(make) -> None:
    """For a base that is not N(0, I) (a learned Gaussian; NCSF's uniform box, reached through icdf(Φ(u))),
    the log q that ``sample_and_log_prob`` reports with its pushed samples equals zuko's ``log_prob`` of
    those samples (density direction) to 1e-9 in float64."""
    torch.manual_seed(0)
    flow = make()
    if isinstance(flow, MyFlow):
        with torch.no_grad():
            flow.base.loc.copy_(torch.tensor([0.3, -0.2]))
            flow.base.scale.copy_(torch.tensor([1.5, 0.7]))
    model = Flow(shape=(2,), flow=flow).double()
    x, log_q = model.sample_and_log_prob(256, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(log_q, flow().log_prob(x), atol=1e-9, rtol=0)


def test_a_wrong_flow_fails_at_construction_naming_the_role_and_the_dimensions() -> None:
    with pytest.raises(ValueError, match=r"the flow \(NSF\) must be a distribution over \[2\].*over \[3\]"):
        Flow(shape=(2,), flow=zuko.flows.NSF(features=3))
    with pytest.raises(ValueError, match=r"over \[6\].*shape \(2, 3\).*over \[2\].*features=6"):
        Flow(shape=(2, 3), flow=MyFlow(features=2))
    with pytest.raises(ValueError, match="the flow must be a zuko lazy distribution"):
        Flow(shape=(2,), flow=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"the flow \(NSF\) failed on a dummy input \[B, 2\].*\[B\]"):
        Flow(shape=(2,), flow=zuko.flows.NSF(features=2, context=3))  # needs a context genzoo never gives
    with pytest.raises(ValueError, match=r"flow \(GMM\) cannot be trained with objective='reverse'"):
        Flow(shape=(2,), flow=zuko.mixtures.GMM(features=2), objective="reverse", target=normal_target)


def test_a_mixture_trains_forward_kl_and_samples_reproducibly() -> None:
    """A zuko lazy distribution that is not a flow (a Gaussian mixture) still fits by forward KL, and its
    ``sample`` (zuko's own sampler, seeded from the generator) is reproducible: the same generator seed gives
    the same draws, another seed others."""
    torch.manual_seed(0)
    model = Flow(shape=(2,), flow=zuko.mixtures.GMM(features=2, components=4))
    trainer = L.Trainer(max_steps=4, limit_val_batches=1, **QUIET)
    trainer.fit(model, toy())
    assert torch.isfinite(trainer.callback_metrics["val/kl"])
    a, b, c = (model.sample(8, torch.Generator().manual_seed(s)) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


class StopAtStep(L.Callback):
    """Ends the fit after optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        trainer.should_stop = trainer.global_step >= self.step


# -- optimiser and schedule ----------------------------------------------------------------------------------


def test_the_optimizer_and_lr_scheduler_arguments_are_what_the_trainer_uses() -> None:
    """SGD at 0.05 with StepLR(2, 0.5): the Trainer's optimiser is SGD, and after 5 steps the learning rate
    is 0.05 · 0.5² (the schedule steps every optimizer step; ``lr`` and ``lr_final_factor`` are ignored).
    With no ``lr_scheduler``, ``lr_final_factor`` is still the LinearLR shorthand: Adam at ``lr`` decayed
    linearly over the 8-step run, 1e-2 · (1 - 0.5 · 5/8) after 5 steps."""
    torch.manual_seed(0)
    model = Flow(
        shape=(2,), transform="maf", n_layers=2, hidden=(8,), lr=1.0, lr_final_factor=0.1,
        optimizer=functools.partial(torch.optim.SGD, lr=0.05),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.5),
    )  # fmt: skip
    trainer = L.Trainer(max_steps=5, limit_val_batches=0, **QUIET)
    trainer.fit(model, toy())
    (optimizer,) = trainer.optimizers
    assert type(optimizer) is torch.optim.SGD
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.25)

    model = Flow(shape=(2,), transform="maf", n_layers=2, hidden=(8,), lr=1e-2, lr_final_factor=0.5)
    trainer = L.Trainer(max_epochs=2, limit_train_batches=4, limit_val_batches=0, **QUIET)
    trainer.callbacks.append(StopAtStep(5))
    trainer.fit(model, toy())
    (optimizer,) = trainer.optimizers
    assert type(optimizer) is torch.optim.Adam
    assert trainer.global_step == 5
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * (1 - 0.5 * 5 / 8))


# -- checkpoints and the CLI ---------------------------------------------------------------------------------


def test_a_checkpoint_with_a_user_flow_reloads_with_the_flow_passed_again(tmp_path: Path) -> None:
    """Trained 6 steps with MyFlow, saved by the Trainer; ``Flow.load_from_checkpoint(path, flow=MyFlow())``
    gives the same log q on 64 points (bit for bit) and the same pushed samples; the live flow was left out
    of the hyperparameters (a checkpoint does not pickle code)."""
    torch.manual_seed(0)
    model = Flow(shape=(2,), flow=MyFlow(), lr=3e-3)
    trainer = L.Trainer(
        max_steps=6, limit_val_batches=0, default_root_dir=tmp_path, **{**QUIET, "logger": None}
    )
    trainer.fit(model, toy())
    path = tmp_path / "flow.ckpt"
    trainer.save_checkpoint(path)
    assert "flow" not in model.hparams
    reloaded = Flow.load_from_checkpoint(path, flow=MyFlow())
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded.log_prob(x), model.log_prob(x))
    g = torch.Generator
    assert torch.equal(reloaded.sample(16, g().manual_seed(3)), model.sample(16, g().manual_seed(3)))


RECIPE_FLOWS = {
    "zuko-NSF": {"class_path": "zoo.flows.ZukoFlow",
                 "init_args": {"name": "NSF", "features": 2,
                               "options": {"transforms": 2, "hidden_features": [16]}}},
    "user-MyFlow": {"class_path": "test_flow_plugins.MyFlow", "init_args": {"features": 2, "hidden": [8]}},
}  # fmt: skip


@pytest.mark.parametrize("name", RECIPE_FLOWS)
def test_a_recipe_fills_the_flow_role_with_class_path_and_reloads_with_no_arguments(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A YAML recipe with ``flow: {class_path: ..., init_args: ...}`` (zuko's NSF through ``ZukoFlow``; the
    user's MyFlow), an AdamW ``optimizer`` and a ``LinearLR`` ``lr_scheduler`` trains 3 steps through the
    CLI, with the lr at 0.003 · 0.5 after them; its checkpoint reloads with
    ``Flow.load_from_checkpoint(path)`` alone (the recipe's class_path / init_args are saved) and gives the
    trained model's log q bit for bit."""
    recipe = {
        "seed_everything": 0,
        "model": {"class_path": "Flow", "init_args": {
            "flow": RECIPE_FLOWS[name],
            "optimizer": {"class_path": "torch.optim.AdamW",
                          "init_args": {"lr": 0.003, "weight_decay": 0.01}},
            "lr_scheduler": {"class_path": "torch.optim.lr_scheduler.LinearLR",
                             "init_args": {"start_factor": 1.0, "end_factor": 0.5, "total_iters": 3}},
        }},
        "data": {"class_path": "Toy2D", "init_args": {"name": "8gaussians", "n_train": 384, "n_val": 128,
                                                       "n_test": 128, "batch_size": 128}},
        "trainer": {"max_steps": 3, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "num_sanity_val_steps": 0},
    }  # fmt: skip
    config = tmp_path / "flow.yaml"
    config.write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cli = cli_main(["fit", "-c", str(config), f"--trainer.default_root_dir={tmp_path}"])
    assert type(cli.model.flow).__name__ == RECIPE_FLOWS[name]["class_path"].rsplit(".", 1)[-1]
    (optimizer,) = cli.trainer.optimizers
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.003 * 0.5)
    path = tmp_path / "flow.ckpt"
    cli.trainer.save_checkpoint(path)
    reloaded = Flow.load_from_checkpoint(path)
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded.log_prob(x), cli.model.log_prob(x))


# -- the spline preset ---------------------------------------------------------------------------------------


def test_the_spline_preset_is_zukos_nsf_and_its_log_prob_is_exact() -> None:
    """``transform="spline"`` builds zuko's NSF layers (same seed, same weights): on 64 points its log q
    equals zuko's own ``NSF().log_prob`` of the same layers to 1e-12 in float64, and ``push`` inverts the
    density direction (x -> u -> x to 1e-9), with sample_and_log_prob's log q = log_prob of its samples."""
    torch.manual_seed(0)
    flow = Flow(shape=(2,), transform="spline", n_layers=3, hidden=(16, 16)).double()
    torch.manual_seed(0)
    nsf = zuko.flows.NSF(features=2, transforms=3, hidden_features=(16, 16)).double()
    for ours, theirs in zip(flow.layers, nsf.transform.transforms, strict=True):
        for (_, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
            assert torch.equal(a, b)
    x = 2.0 * torch.randn(64, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(flow.log_prob(x), nsf().log_prob(x), atol=1e-12, rtol=0)
    u = flow._zuko_transform()(x)
    x_again, log_q = flow.push(u)
    torch.testing.assert_close(x_again, x, atol=1e-9, rtol=0)
    torch.testing.assert_close(log_q, flow.log_prob(x), atol=1e-9, rtol=0)
