"""Sample pictures: an image grid for image data, a scatter plot for 2-D data, logged every few epochs."""

from __future__ import annotations

import io
import math
from contextlib import contextmanager

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from PIL import Image
from torch import Tensor

from callbacks.run import log_image
from zoo.capabilities import Samplable, require


def image_grid(images: Tensor, min_size: int = 256) -> Image.Image:
    """``[N, C, H, W]`` in [0, 1] -> one near-square grid, upscaled (nearest) to at least ``min_size`` px."""
    n, c, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    pad = 1
    canvas = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.float32)
    pixels = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        r, col = divmod(i, cols)
        canvas[
            pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w
        ] = pixels[i]
    array = (canvas * 255).round().astype(np.uint8)
    image = Image.fromarray(array[..., 0] if c == 1 else array)
    scale = max(1, math.ceil(min_size / max(image.size)))
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def figure_image(fig) -> Image.Image:
    """A matplotlib figure as an RGB PIL image (PNG, tight bounding box); the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def drawing_epoch(trainer: Trainer, every_n_epochs: int) -> bool:
    """Whether the epoch that just ended is one to draw after: every ``every_n_epochs``-th and the last."""
    epoch = trainer.current_epoch + 1
    last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
    return epoch % every_n_epochs == 0 or last


@contextmanager
def evaluating(module: LightningModule):
    """``module`` in eval mode for the block, then back in the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def scatter_plot(samples: Tensor, reference: Tensor | None = None, title: str = "") -> Image.Image:
    """2-D samples (blue) over optional reference data (grey) as a PNG image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    if reference is not None:
        ref = reference.detach().cpu().numpy()
        ax.scatter(ref[:, 0], ref[:, 1], s=2, c="0.7", label="data")
    pts = samples.detach().cpu().numpy()
    ax.scatter(pts[:, 0], pts[:, 1], s=2, c="tab:blue", label="samples")
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.legend(loc="upper right", markerscale=4, fontsize=8)
    return figure_image(fig)


class SampleGrid(Callback):
    """Every ``every_n_epochs`` epochs (and after the last), draw ``n`` samples and log a picture.

    Images ``(C, H, W)`` become a grid; 2-D vectors a scatter plot over the datamodule's own samples when it
    has ``sample(n)``. The same fixed generator seed is used each time, so successive pictures show the same
    latent draws evolving. Only rank 0 samples and writes; the module needs the ``Samplable`` capability.

    Args:
        every_n_epochs: cadence in training epochs.
        n: number of samples in a picture.
        mean: ask for E[x | z] instead of a draw when the module supports it (cleaner image grids).
        seed: seed of the fixed generator.
    """

    def __init__(self, every_n_epochs: int = 5, n: int = 64, mean: bool = True, seed: int = 0) -> None:
        if every_n_epochs < 1 or n < 1:
            raise ValueError(f"every_n_epochs and n must be positive; got {every_n_epochs}, {n}")
        self.every_n_epochs, self.n, self.mean, self.seed = every_n_epochs, n, mean, seed

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        require(pl_module, Samplable, type(self).__name__)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if drawing_epoch(trainer, self.every_n_epochs) and trainer.is_global_zero:
            self.draw(trainer, pl_module)

    def draw(self, trainer: Trainer, pl_module: LightningModule):
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        kwargs = {"mean": True} if self.mean and _accepts(pl_module.sample, "mean") else {}
        with evaluating(pl_module):
            x = pl_module.sample(self.n, generator=generator, **kwargs)
        title = f"epoch {trainer.current_epoch + 1}"
        if x.dim() == 4:
            picture = image_grid(x)
        elif x.dim() == 2 and x.shape[1] == 2:
            data_sampler = getattr(trainer.datamodule, "sample", None)
            reference = (
                data_sampler(2000, generator=torch.Generator().manual_seed(self.seed))
                if data_sampler
                else None
            )
            picture = scatter_plot(x, reference, title)
        else:
            return None  # nothing to draw for other shapes
        return log_image(trainer, "samples", picture, caption=title)


def _accepts(function, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
