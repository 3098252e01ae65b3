"""Sample pictures: grid layout, cadence, rank-0-only writing and a clear error without `sample`."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from callbacks import SampleGrid
from callbacks.samples import image_grid
from datamodules import Digits, Toy2D
from zoo import VAE


def test_image_grid_places_each_image_in_its_tile() -> None:
    images = torch.stack([torch.full((1, 2, 3), i / 10) for i in range(5)])  # 5 images of value i/10
    grid = np.asarray(image_grid(images, min_size=1))  # 3 columns x 2 rows, 1-pixel white borders
    assert grid.shape == (2 * 3 + 1, 3 * 4 + 1)
    for i in range(5):
        r, c = divmod(i, 3)
        tile = grid[1 + r * 3 : 1 + r * 3 + 2, 1 + c * 4 : 1 + c * 4 + 3]
        assert (tile == round(i / 10 * 255)).all()
    assert (grid[0] == 255).all() and (grid[4:, 9:] == 255).all()  # borders and the empty sixth tile


def fit(model, data, tmp_path: Path, callback: SampleGrid, epochs: int = 3) -> L.Trainer:
    trainer = L.Trainer(
        max_epochs=epochs, logger=CSVLogger(tmp_path), callbacks=[callback], enable_progress_bar=False,
        enable_model_summary=False, limit_train_batches=2, limit_val_batches=1, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(model, data)
    return trainer


def test_grids_are_written_at_the_cadence_and_after_the_last_epoch(tmp_path: Path) -> None:
    trainer = fit(VAE(shape=(1, 8, 8), hidden=(16,)), Digits(), tmp_path, SampleGrid(every_n_epochs=2, n=9))
    pictures = sorted((Path(trainer.logger.log_dir) / "samples").glob("*.png"))
    assert [p.name for p in pictures] == ["step0000004.png", "step0000006.png"]  # epochs 2 and 3 (last)


def test_scatter_plot_for_2d_data(tmp_path: Path) -> None:
    trainer = fit(VAE(shape=(2,), hidden=(16,), likelihood="gaussian"), Toy2D(n_train=512), tmp_path,
                  SampleGrid(every_n_epochs=1, n=100, mean=False), epochs=1)  # fmt: skip
    (picture,) = (Path(trainer.logger.log_dir) / "samples").glob("*.png")
    assert picture.stat().st_size > 5000  # a rendered matplotlib figure, not an empty file


def test_a_module_without_sample_is_refused_by_name(tmp_path: Path) -> None:
    class NoSample(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(64, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch.flatten(1)).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    message = "SampleGrid needs a module with the Samplable capability; NoSample has no `sample`"
    with pytest.raises(TypeError, match=message):
        fit(NoSample(), Digits(), tmp_path, SampleGrid())
