"""pythae models through vaeeval's ``--arch`` protocol, with their own state dicts.

``wrap(model)`` gives a live pythae model the protocol's ``encode``, ``decode`` and
``prior`` and returns it: the same object, its class swapped for a subclass that adds
the three methods, so its ``state_dict()`` is the pythae model's, key for key. Save the
weights once after training and name a three-line factory with ``--arch``::

    safetensors.torch.save_file(model.state_dict(), "vae.safetensors")

    # load.py
    from pythae.models import AutoModel
    from vaeeval.adapters.pythae import wrap

    def load():
        return wrap(AutoModel.load_from_folder("my_model/final_model"))

The methods return the distributions pythae's own ``get_nll`` scores:

* q(z|x) is ``Independent(Normal(embedding, exp(log_covariance / 2)), 1)``; for VAE_IAF
  and VAE_LinNF, that Gaussian pushed through the model's own flow layers, a
  ``TransformedDistribution`` (``pythae_flows``: keyed draws, log q exact at them);
* p(x|z) is, for ``reconstruction_loss="bce"``, a Bernoulli with the decoder's
  probabilities; for ``"mse"``, a Normal of variance 1 around the reconstruction
  (``get_nll``'s ``-0.5 * squared error - D/2 log 2 pi``);
* p(z) is N(0, I), or for VAMP the uniform mixture of q(z|u_k) over its pseudo-inputs
  u_k (``VAMP._log_p_z``, which drops the same ``-L/2 log 2 pi`` from log p(z) as
  ``get_nll`` drops from log q(z|x)).

The Bernoulli takes the decoder's probabilities, which torch clamps to
[eps, 1 - eps] (eps = 2^-23 in float32, so a term is at least log eps = -15.9);
pythae's ``F.binary_cross_entropy`` clamps each log term at -100 instead. The two
differ only where the decoder is certain to within eps and wrong, and there torch's
number is the larger. Logits cannot be recovered exactly from a float32 sigmoid near 1
either way, so the probabilities are taken as the model's definition of p(x|z).

Models are known by the first pythae class in their MRO, so a user's subclass of
``VAE`` is read as a ``VAE``. Refused, with a ``ValueError``: encoders that give a
point (AE, WAE_MMD, RAE_L2, RAE_GP, VQVAE, an Adversarial_AE with a deterministic
posterior), posteriors that are an MCMC kernel rather than a density (HVAE, RHVAE) or
live on a manifold (SVAE, PoincareVAE), and losses that are not a likelihood (VAEGAN,
MSSSIM_VAE). pythae itself is not imported here.

Wrapped models are in eval mode. The methods leave gradient mode to the caller:
vaeeval evaluates under ``torch.inference_mode`` and differentiates ``decode`` for AIS.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributions import Bernoulli, Categorical, Distribution, Independent, MixtureSameFamily, Normal

from vaeeval.adapters.pythae_flows import flow_posterior
from vaeeval.format.model import rows_independently


def standard_normal(model: nn.Module) -> Distribution:
    """N(0, I) over ``[latent_dim]``, in the dtype and on the device of the model's parameters."""
    like = next(model.parameters())
    zeros = torch.zeros(model.latent_dim, dtype=like.dtype, device=like.device)
    return Independent(Normal(zeros, torch.ones_like(zeros)), 1)


def vamp_prior(model: nn.Module) -> Distribution:
    """VAMP's p(z) = (1/C) sum_k q(z|u_k), u_k = ``pseudo_inputs(e_k)``, as ``VAMP._log_p_z`` computes it.

    Batch shape ``[]``, event shape ``[latent_dim]``; C is ``number_components``.
    """
    count = model.number_components
    like = next(model.pseudo_inputs.parameters())
    pseudo_inputs = model.pseudo_inputs(model.idle_input.to(like)).reshape(count, *model.model_config.input_dim)
    mixing = Categorical(logits=torch.zeros(count, dtype=like.dtype, device=like.device))
    return MixtureSameFamily(mixing, posterior(model, pseudo_inputs))


# The first pythae class in a model's MRO -> its p(z).
PRIORS: dict[str, Callable[[nn.Module], Distribution]] = {
    **dict.fromkeys(
        (
            "VAE",
            "BetaVAE",
            "DisentangledBetaVAE",
            "BetaTCVAE",
            "FactorVAE",
            "INFOVAE_MMD",
            "IWAE",
            "MIWAE",
            "PIWAE",
            "CIWAE",
            "Adversarial_AE",
            "VAE_IAF",
            "VAE_LinNF",
        ),
        standard_normal,
    ),
    "VAMP": vamp_prior,
}

_POINT = "its encoder gives a point, not a distribution over z"


def _mcmc(steps: str) -> str:
    return (
        f"its posterior is an MCMC kernel (the encoder's Gaussian moved by {steps}), not a density, so log q(z|x) "
        "has no value to weigh draws by; score it with pythae's own get_nll, or train a VAE_IAF or VAE_LinNF, "
        "whose flows vaeeval reads"
    )


# Models whose q(z|x) is the encoder's Gaussian pushed through their own flow (``pythae_flows``).
FLOWS = ("VAE_IAF", "VAE_LinNF")

# The first pythae class in a model's MRO -> why vaeeval cannot evaluate it.
REFUSED: dict[str, str] = {
    **dict.fromkeys(("AE", "WAE_MMD", "RAE_L2", "RAE_GP", "VQVAE"), _POINT),
    "HVAE": _mcmc("Hamiltonian leapfrog steps"),
    "RHVAE": _mcmc("Riemannian Hamiltonian leapfrog steps"),
    "SVAE": "its posterior is a von Mises-Fisher distribution on the hypersphere",
    "PoincareVAE": "its posterior is a wrapped or Riemannian normal on the Poincare ball",
    "VAEGAN": "its reconstruction loss is a discriminator's feature distance, not a likelihood",
    "MSSSIM_VAE": "its reconstruction loss is MS-SSIM, not a likelihood",
}

# ``model_config.reconstruction_loss`` -> p(x|z) of the decoder's output, flattened to ``[N, D]``.
LIKELIHOODS: dict[str, Callable[[torch.Tensor], Distribution]] = {
    "bce": lambda probs: Independent(Bernoulli(probs=probs), 1),
    "mse": lambda mean: Independent(Normal(mean, torch.ones_like(mean)), 1),
}


def pythae_name(model: Any) -> str:
    """The name of the first class in ``model``'s MRO that pythae defines.

    Raises:
        ValueError: no class of pythae's is among its bases.
    """
    for cls in type(model).__mro__:
        if cls.__module__.startswith("pythae.models."):
            return cls.__name__
    raise ValueError(f"{type(model).__name__} is not a pythae model (no class of pythae.models among its bases)")


def refusal(model: nn.Module) -> str | None:
    """Why vaeeval cannot evaluate this pythae model, or None."""
    name = pythae_name(model)
    if name in REFUSED:
        return REFUSED[name]
    if name not in PRIORS:
        return f"vaeeval does not know this pythae model (it reads {', '.join(sorted(PRIORS, key=str.lower))})"
    if getattr(model.model_config, "deterministic_posterior", False):
        return "its posterior is a point (deterministic_posterior=True), not a distribution over z"
    loss = getattr(model.model_config, "reconstruction_loss", None)
    if loss not in LIKELIHOODS:
        return f"reconstruction_loss {loss!r} is no likelihood vaeeval knows (it reads {' and '.join(LIKELIHOODS)})"
    return None


def as_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x [B, ...]`` reshaped to ``[B, *input_dim]``, the shape pythae's encoders are trained on.

    Raises:
        ValueError: a point of ``x`` does not hold ``prod(input_dim)`` values.
    """
    shape = model.model_config.input_dim
    if shape is None:  # a custom encoder, built without input_dim: it takes x as it comes
        return x
    if math.prod(x.shape[1:]) != math.prod(shape):
        raise ValueError(
            f"x is {list(x.shape)}: {math.prod(x.shape[1:])} values per point, but pythae {pythae_name(model)}'s "
            f"input_dim {list(shape)} holds {math.prod(shape)}"
        )
    return x.reshape(x.shape[0], *shape)


def posterior(model: nn.Module, x: torch.Tensor) -> Distribution:
    """q(z|x) of pythae's encoder for ``x [B, *input_dim]``: batch ``[B]``, event ``[latent_dim]``.

    Raises:
        ValueError: the encoder gives no ``log_covariance``.
    """
    return Independent(Normal(*encoder_moments(model, x)), 1)


def encoder_moments(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's mean and standard deviation ``[B, latent_dim]`` for ``x [B, *input_dim]``.

    Raises:
        ValueError: the encoder gives no ``log_covariance``.
    """
    output = model.encoder(x)
    if "log_covariance" not in output:
        raise ValueError(f"pythae {pythae_name(model)}: its encoder gives no log_covariance, so q(z|x) is not a Gaussian")
    return output["embedding"], (0.5 * output["log_covariance"]).exp()


class ProtocolMixin:
    """vaeeval's protocol, mixed by ``wrap`` into the class of a pythae model."""

    def encode(self, x: torch.Tensor) -> Distribution:
        """q(z|x), batch ``[B]`` and event ``[latent_dim]``, for ``x [B, ...]`` holding ``input_dim`` values per point.

        A flow's encoder runs on at least ``MIN_ROWS`` rows (vaeeval cannot take a flow's
        first rows back out of a padded batch, as it does for a Gaussian).
        """
        x = as_input(self, x)
        if pythae_name(self) not in FLOWS:
            return posterior(self, x)
        gaussian = Independent(Normal(*rows_independently(lambda rows: encoder_moments(self, rows), x)), 1)
        return flow_posterior(self, gaussian)

    def decode(self, z: torch.Tensor) -> Distribution:
        """p(x|z) for ``z [N, latent_dim]``: batch ``[N]``, event ``[D]``, one flattened data point per row."""
        reconstruction = self.decoder(z)["reconstruction"]
        return LIKELIHOODS[self.model_config.reconstruction_loss](reconstruction.reshape(z.shape[0], -1))

    def prior(self) -> Distribution:
        """p(z), batch ``[]`` and event ``[latent_dim]``."""
        return PRIORS[pythae_name(self)](self)


@functools.cache
def _with_protocol(cls: type) -> type:
    """``cls`` with ``ProtocolMixin``'s methods, under the same name; one class per pythae class."""
    return type(cls.__name__, (ProtocolMixin, cls), {"__module__": __name__, "__doc__": f"pythae's {cls.__name__} with ``ProtocolMixin``."})


def wrap(model: nn.Module) -> nn.Module:
    """A pythae model speaking vaeeval's protocol: the same object, in eval mode, with ``encode``, ``decode`` and ``prior``.

    Its state dict keeps its keys, so a safetensors file of ``model.state_dict()``
    loads into it strictly. Nothing is computed from the weights here: vaeeval loads
    them after ``wrap`` returns.

    Args:
        model: a pythae model with a Gaussian encoder and a ``bce`` or ``mse`` reconstruction loss.

    Raises:
        ValueError: not a pythae model, or one vaeeval cannot evaluate; the message names its class and why.
    """
    reason = refusal(model)
    if reason is not None:
        raise ValueError(f"pythae {pythae_name(model)}: {reason}")
    if not isinstance(model, ProtocolMixin):
        model.__class__ = _with_protocol(type(model))
    return model.eval()
