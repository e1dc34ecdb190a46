"""diffusers autoencoders through vaeeval's ``--arch`` protocol, with the weights ``save_pretrained`` wrote.

``save_pretrained(folder)`` writes ``config.json`` and ``diffusion_pytorch_model.safetensors``.
Name that safetensors file as the weights and a factory of this module with ``--arch``;
the factory builds the architecture from the ``config.json`` beside it (diffusers'
``from_config``, no weights, no pickles), and vaeeval loads the weights into it strictly::

    vaeeval elbo my_vae/diffusion_pytorch_model.safetensors test.npy \\
        --arch vaeeval.adapters.diffusers:AutoencoderKL --likelihood gaussian --sigma 0.05
    vaeeval elbo my_vq/diffusion_pytorch_model.safetensors test.npy \\
        --arch vaeeval.adapters.diffusers:VQModel --likelihood gaussian --sigma 0.05

or, for a live model, ``wrap(model)`` in a factory of your own. The data are images
``[N, C, H, W]`` on [-1, 1], as diffusers holds them; on the 8-bit grid (2k/255 - 1)
vaeeval scores each value's bin, so the numbers are log-probabilities of the 8-bit images.

* ``AutoencoderKL``: q(z|x) is ``latent_dist``, the diagonal Gaussian of its encoder
  (``mean``, ``std``: the log-variance clamped to [-30, 20] as diffusers clamps it),
  flattened to one vector of C' h w latents per image; p(z) is N(0, I), the prior its KL
  term is trained towards (vaeeval's note says "assumed": the model defines no ``prior()``,
  which keeps it on the fast path that ``calibrate`` fits σ on); ``decode`` gives
  ``decode(z).sample``, the mean of a Gaussian p(x|z) whose σ the decoder does not have:
  ``--sigma``, or the one ``vaeeval calibrate`` fits on held-out images.
* ``VQModel``: q(z|x) is a point mass on the nearest codebook entry at each of the M latent
  positions (the indices diffusers' own ``quantize`` picks), written as an
  ``Independent(Categorical)`` with probability 1 on that index; p(z) is uniform over the K
  codes at each position; ``decode`` looks the indices up in the codebook and runs
  diffusers' own ``decode(..., force_not_quantize=True)``. Then log q = 0, KL = M log K, and
  ELBO = log p(x|z_q) - M log K: the bound VQ-VAE papers report (van den Oord et al. 2017,
  section 3.1). Every importance weight is the same, so the IWAE is that number too, and
  the output says so.

diffusers itself is imported only when a factory runs or a model is wrapped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributions import Categorical, Distribution, Independent, Normal

from vaeeval.errors import option

CONFIG = "config.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
# What ``vaeeval convert`` says instead of tracing these models (``analysis.convert`` reads ``not_convertible``).
_NOT_CONVERTIBLE = (
    "diffusers {name}: format 1 cannot hold it (its ResNet blocks add skip connections; group norms and attention are "
    "no format-1 layers); evaluate it as it is: vaeeval elbo WEIGHTS DATA {arch} vaeeval.adapters.diffusers:{name}"
)


def _shared(adapter: nn.Module, model: nn.Module) -> None:
    """Register ``model``'s own parameters, buffers and children on ``adapter`` under the same names, so the
    adapter's state dict is the model's, key for key, and loading it loads the model."""
    for name, parameter in model.named_parameters(recurse=False):
        adapter.register_parameter(name, parameter)
    for name, buffer in model.named_buffers(recurse=False):
        adapter.register_buffer(name, buffer, persistent=name not in model._non_persistent_buffers_set)
    for name, child in model.named_children():
        adapter.add_module(name, child)
    object.__setattr__(adapter, "model", model)  # not a child: its modules are already the adapter's


class _Adapter(nn.Module):
    """A diffusers autoencoder behind vaeeval's protocol. Images are ``[B, C, H, W]``; latents one vector per image."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        _shared(self, model)
        self.not_convertible = _NOT_CONVERTIBLE.format(name=diffusers_name(model), arch=option("arch"))
        size = getattr(model.config, "sample_size", None)
        size = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, (list, tuple)) else None
        factor = 2 ** (len(model.config.block_out_channels) - 1)
        # (h, w) of the latents, from the last images encoded (from the config's sample_size until then)
        self.latent_grid = None if size is None else (size[0] // factor, size[1] // factor)

    def train(self, mode: bool = True) -> _Adapter:
        self.model.train(mode)
        return super().train(mode)

    def _remember(self, latents: torch.Tensor) -> None:
        self.latent_grid = tuple(latents.shape[2:])

    def _grid(self, z: torch.Tensor, per_position: int) -> tuple[int, int]:
        if self.latent_grid is None or math.prod(self.latent_grid) * per_position != z.shape[1]:
            raise ValueError(
                f"z has {z.shape[1]} values per point, which fit no latent grid of {per_position} per position this "
                f"model knows (encode images first, or give the config a sample_size)"
            )
        return self.latent_grid


class AutoencoderKLAdapter(_Adapter):
    """diffusers' ``AutoencoderKL``: q(z|x) its ``latent_dist``, p(x|z)'s mean its ``decode``, p(z) N(0, I)."""

    def encode(self, x: torch.Tensor) -> Distribution:
        """q(z|x) for images ``x [B, C, H, W]`` on [-1, 1]: batch ``[B]``, event ``[C' h w]``."""
        latent = self.model.encode(x).latent_dist
        self._remember(latent.mean)
        return Independent(Normal(latent.mean.flatten(1), latent.std.flatten(1)), 1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The mean image of p(x|z) for ``z [N, C' h w]``, flattened to ``[N, C H W]`` (``--likelihood gaussian``)."""
        channels = self.model.config.latent_channels
        latents = z.reshape(z.shape[0], channels, *self._grid(z, channels))
        return self.model.decode(latents).sample.flatten(1)


class VQModelAdapter(_Adapter):
    """diffusers' ``VQModel``: q(z|x) a point mass on the codes ``quantize`` picks, p(z) uniform over the codebook."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        if getattr(model.quantize, "remap", None) is not None:
            raise ValueError("diffusers VQModel: its quantizer remaps indices (remap=...), so its codes are not the K "
                             "codebook entries a uniform prior is over")
        self.codes = model.quantize.embedding.num_embeddings

    def encode(self, x: torch.Tensor) -> Distribution:
        """q(z|x) for images ``x [B, C, H, W]``: probability 1 on the nearest code at each of the M positions,
        batch ``[B]``, event ``[M]`` (code indices, positions in row-major order)."""
        latents = self.model.encode(x).latents
        self._remember(latents)
        _, _, (_, _, indices) = self.model.quantize(latents)
        one_hot = nn.functional.one_hot(indices.reshape(x.shape[0], -1), self.codes)
        return Independent(Categorical(probs=one_hot.to(latents.dtype)), 1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The mean image of p(x|z) for code indices ``z [N, M]``, flattened to ``[N, C H W]``: the codebook
        entries through diffusers' own ``decode(..., force_not_quantize=True)``."""
        height, width = self._grid(z, 1)
        indices = z.long().flatten()
        shape = (z.shape[0], height, width, self.model.quantize.vq_embed_dim)
        if getattr(self.model.config, "lookup_from_codebook", False):
            image = self.model.decode(indices, force_not_quantize=True, shape=shape).sample
        else:
            image = self.model.decode(self.model.quantize.get_codebook_entry(indices, shape), force_not_quantize=True).sample
        return image.flatten(1)

    def prior(self) -> Distribution:
        """p(z): uniform over the K codes at each of the M positions, batch ``[]``, event ``[M]``."""
        if self.latent_grid is None:
            raise ValueError("the latent grid is unknown until images are encoded (or the config gives a sample_size)")
        like = self.model.quantize.embedding.weight
        positions = math.prod(self.latent_grid)
        return Independent(Categorical(logits=torch.zeros(positions, self.codes, dtype=like.dtype, device=like.device)), 1)


ADAPTERS = {"AutoencoderKL": AutoencoderKLAdapter, "VQModel": VQModelAdapter}


def diffusers_name(model: Any) -> str:
    """The first class in ``model``'s MRO that diffusers defines and vaeeval reads.

    Raises:
        ValueError: none is.
    """
    for cls in type(model).__mro__:
        if cls.__module__.startswith("diffusers.") and cls.__name__ in ADAPTERS:
            return cls.__name__
    raise ValueError(f"{type(model).__name__} is no diffusers model vaeeval reads ({', '.join(ADAPTERS)})")


def wrap(model: nn.Module) -> nn.Module:
    """A diffusers ``AutoencoderKL`` or ``VQModel`` speaking vaeeval's protocol, in eval mode.

    The adapter shares the model's modules under their own names, so its state dict is
    the model's and diffusers' ``diffusion_pytorch_model.safetensors`` loads into it
    strictly; the model itself is left as it is (its own ``encode`` and ``decode`` included).

    Raises:
        ValueError: not one of those models, or a VQModel whose quantizer remaps its indices.
    """
    return ADAPTERS[diffusers_name(model)](model).eval()


def _from_folder(name: str, weights: str | Path) -> nn.Module:
    """The diffusers ``name`` built from the ``config.json`` beside ``weights`` (diffusers' ``from_config``: no
    weights read, no code from the folder run), wrapped; vaeeval then loads the weights strictly."""
    import diffusers

    weights = Path(weights)
    config = weights.parent / CONFIG
    if not config.is_file():
        raise ValueError(
            f"no {CONFIG} beside {weights}: name the {WEIGHTS} that diffusers' save_pretrained wrote, in its folder"
        )
    found = json.loads(config.read_text()).get("_class_name")
    if found not in (None, name):
        instead = f"read it with --arch vaeeval.adapters.diffusers:{found}" if found in ADAPTERS else (
            f"vaeeval reads diffusers' {' and '.join(ADAPTERS)}")
        raise ValueError(f"{config} is a {found}'s; {instead}")
    cls = getattr(diffusers, name)
    return wrap(cls.from_config(cls.load_config(str(weights.parent))))


def AutoencoderKL(weights: str) -> nn.Module:
    """``--arch vaeeval.adapters.diffusers:AutoencoderKL``: the AutoencoderKL of the folder ``weights`` is in."""
    return _from_folder("AutoencoderKL", weights)


def VQModel(weights: str) -> nn.Module:
    """``--arch vaeeval.adapters.diffusers:VQModel``: the VQModel of the folder ``weights`` is in."""
    return _from_folder("VQModel", weights)
