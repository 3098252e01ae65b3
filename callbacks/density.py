"""A 2-D density picture: the model's density next to the target's, as heat maps on one grid.

The model's panel is ``exp(log_prob(x))`` on the grid when the module has an exact density (coupling and
MAF flows, any ``ExactLikelihood``); otherwise (planar / radial flows, samplers) a normalised 2-D histogram of
``n`` samples. The target's panel is the module's ``target_log_prob`` (a reverse-KL flow's target) or the
datamodule's exact ``log_prob`` (Toy2D mixtures, checkerboard); without either only the model is drawn.
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from PIL import Image
from torch import Tensor

from callbacks.run import log_image
from callbacks.samples import drawing_epoch, evaluating, figure_image
from zoo.capabilities import Samplable, require


class DensityMap(Callback):
    """Every ``every_n_epochs`` epochs (and after the last) log ``density``: model | target heat maps over
    ``[-extent, extent]²`` on a ``resolution²`` grid. Only rank 0 draws; 2-D data only.

    Args:
        every_n_epochs: cadence in training epochs.
        extent: half-width of the square shown.
        resolution: grid points per side.
        n: samples for the histogram of a model without ``log_prob``.
        seed: seed of those samples.
    """

    def __init__(
        self,
        every_n_epochs: int = 5,
        extent: float = 4.5,
        resolution: int = 200,
        n: int = 50_000,
        seed: int = 0,
    ) -> None:
        if every_n_epochs < 1 or resolution < 2 or n < 1 or extent <= 0:
            raise ValueError(
                f"every_n_epochs, resolution, n and extent must be positive; got {every_n_epochs}, "
                f"{resolution}, {n}, {extent}"
            )
        self.every_n_epochs, self.extent, self.resolution, self.n, self.seed = (
            every_n_epochs, extent, resolution, n, seed,
        )  # fmt: skip

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        require(pl_module, Samplable, type(self).__name__)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if drawing_epoch(trainer, self.every_n_epochs) and trainer.is_global_zero:
            self.draw(trainer, pl_module)

    @torch.no_grad()
    def model_density(self, module: LightningModule) -> Tensor:
        """``[resolution, resolution]`` density of the model (rows: y from bottom to top)."""
        r, e = self.resolution, self.extent
        if getattr(module, "invertible", True) and callable(getattr(module, "log_prob", None)):
            return self.on_grid(module.log_prob, module).exp()
        g = torch.Generator(device=module.device).manual_seed(self.seed)
        x = module.sample(self.n, generator=g).float().cpu()
        counts, _ = torch.histogramdd(x[:, [1, 0]], bins=[r, r], range=[-e, e, -e, e])  # rows: y
        return counts / (self.n * (2 * e / r) ** 2)

    def on_grid(self, log_density, module: LightningModule) -> Tensor:
        r, e = self.resolution, self.extent
        axis = torch.linspace(-e, e, r, device=module.device, dtype=module.dtype)
        y, x = torch.meshgrid(axis, axis, indexing="ij")
        points = torch.stack([x.flatten(), y.flatten()], dim=1)
        return log_density(points).float().cpu().reshape(r, r)

    def draw(self, trainer: Trainer, pl_module: LightningModule):
        if tuple(getattr(pl_module, "shape", ())) != (2,):
            return None
        with evaluating(pl_module):
            panels = {"model": self.model_density(pl_module)}
            target = getattr(pl_module, "target_log_prob", None)
            datamodule = getattr(trainer, "datamodule", None)
            if getattr(pl_module, "objective", None) != "reverse" or getattr(pl_module, "target", 0) is None:
                target = (
                    getattr(datamodule, "log_prob", None)
                    if getattr(datamodule, "has_log_prob", False)
                    else None
                )
            if target is not None:
                with torch.no_grad():
                    panels["target"] = self.on_grid(target, pl_module).exp()
        title = f"epoch {trainer.current_epoch + 1}"
        return log_image(trainer, "density", self.picture(panels, title), caption=title)

    def picture(self, panels: dict[str, Tensor], title: str) -> Image.Image:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6), dpi=100, squeeze=False)
        e = self.extent
        for ax, (name, density) in zip(axes[0], panels.items(), strict=True):
            ax.imshow(density.numpy(), origin="lower", extent=(-e, e, -e, e), cmap="viridis")
            ax.set_title(f"{name}, {title}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        return figure_image(fig)
