"""genzoo's networks room: the presets every family builds its default networks from, and the contract
check a user's own network passes when it is handed to a family.

* :mod:`zoo.networks.basic`: the MLP;
* :mod:`zoo.networks.conv`: DCGAN-style encoders and decoders for (C, H, W) images, H = W in {16, 28, 32, 64};
* :mod:`zoo.networks.denoisers`: diffusion denoisers ``(x_t, t) -> [B, C', ...]``: an MLP and the DDPM U-Net;
* :mod:`zoo.networks.roles`: :func:`check_role`, the dry run that names the role, the shape it must return
  and the shape it returned.

A family file holds maths, not layers: it imports its presets from here.
"""

from zoo.networks.basic import mlp, numel
from zoo.networks.conv import CONV_SIDES, check_conv_image, conv_decoder, conv_encoder, is_conv_image
from zoo.networks.denoisers import AttentionBlock, MLPDenoiser, ResBlock, UNet, timestep_embedding
from zoo.networks.roles import check_role, dummy_batch

__all__ = [
    "CONV_SIDES",
    "AttentionBlock",
    "MLPDenoiser",
    "ResBlock",
    "UNet",
    "check_conv_image",
    "check_role",
    "conv_decoder",
    "conv_encoder",
    "dummy_batch",
    "is_conv_image",
    "mlp",
    "numel",
    "timestep_embedding",
]
