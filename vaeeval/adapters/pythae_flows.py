"""q(z|x) of pythae's VAE_IAF and VAE_LinNF: the encoder's Gaussian pushed through pythae's own flow modules.

``flow_posterior(model, gaussian)`` is a ``TransformedDistribution`` of the encoder's
``Independent(Normal)`` by one ``PythaeFlow`` transform that runs the model's flow layers
as pythae's ``forward`` and ``get_nll`` run them:

* VAE_IAF: ``model.iaf_flow.inverse`` draws (z0 -> z, log |det J| = the sum of the MADE
  blocks' log-scales, pythae's own ``log_abs_det_jac``); its exact inverse is pythae's
  own ``model.iaf_flow.forward`` (one MADE pass per latent dimension), so q(z|x) has a
  log-density at any z, and AIS can start from it.
* VAE_LinNF: the planar and radial layers of ``model.net``, in order. They have no
  analytic inverse: ``log_prob`` is exact at the posterior's own draws (torch's transform
  cache holds each draw's base sample, and ``vaeeval`` keeps flow draws unrounded), and
  AIS starts from the prior (``--init prior``).

log |det J|: pythae's own ``log_abs_det_jac`` for IAF and radial layers. A planar layer's
is computed here as ``log |1 + h'(w.z + b) w.u|``, the exact value; pythae's adds 1e-4
inside the logarithm (``log(|1 + phi u| + 1e-4)``), which makes its q(z|x) not quite
normalized (the difference is at most 1e-4 / |1 + phi u| nats per layer). A planar layer
with ``w.u < -1`` is not invertible (a z has several pre-images, so the change of
variables is not q's density, nor is pythae's ``get_nll`` a likelihood): ``encode`` refuses
it, naming the layer. pythae draws ``u`` and ``w`` independently and never constrains them
(Rezende & Mohamed 2015, appendix A.1, do), so a model can start and stay there.

Every flow pass runs on at least ``MIN_ROWS`` rows, padded, so a draw's bits do not
depend on how many came with it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributions import Distribution, TransformedDistribution, constraints
from torch.distributions.transforms import Transform

from vaeeval.format.model import rows_independently

NO_INVERSE = (
    "pythae's planar and radial flows have no inverse: q(z|x) has a log-density only at its own draws "
    "(importance sampling); start AIS from the prior (--init prior)"
)


def _planar(layer: nn.Module, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pythae's planar layer's output for ``z [N, L]`` and its exact log |det J| ``[N]`` (without pythae's + 1e-4)."""
    out = layer(z).out
    slope = layer.activation_derivative(z @ layer.w.T + layer.b)  # [N, 1]
    return out, torch.log(torch.abs(1 + slope * (layer.w @ layer.u.T)))[:, 0]


def _layers(model: nn.Module, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The flow's draw from base samples ``z [N, L]`` and its log |det J| ``[N]``, as pythae's ``get_nll`` computes them."""
    if hasattr(model, "iaf_flow"):
        output = model.iaf_flow.inverse(z)  # pythae's sampling direction
        return output.out, output.log_abs_det_jac
    total = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    for layer in model.net:
        if type(layer).__name__ == "PlanarFlow":
            z, log_det = _planar(layer, z)
        else:
            output = layer(z)
            z, log_det = output.out, output.log_abs_det_jac
        total = total + log_det.reshape(-1)
    return z, total


class PythaeFlow(Transform):
    """z0 -> z through a pythae model's flow, over the last axis (``event_dim`` 1), batch axes any.

    ``log_abs_det_jacobian(x, y)`` is the value computed with the draw where ``x`` is the
    last draw's input; at any other ``x`` the flow is run again.
    """

    domain = constraints.independent(constraints.real, 1)
    codomain = constraints.independent(constraints.real, 1)
    bijective = True

    def __init__(self, model: nn.Module, cache_size: int = 1) -> None:
        super().__init__(cache_size=cache_size)
        self.model = model
        self._log_det: tuple[Any, torch.Tensor] | None = None

    def with_cache(self, cache_size: int = 1) -> PythaeFlow:
        return self if self._cache_size == cache_size else PythaeFlow(self.model, cache_size)

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = x.reshape(-1, x.shape[-1])
        out, log_det = rows_independently(lambda r: _layers(self.model, r), rows)
        return out.reshape(x.shape), log_det.reshape(x.shape[:-1])

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        y, log_det = self._forward(x)
        self._log_det = (x, log_det)
        return y

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        if not hasattr(self.model, "iaf_flow"):
            raise NotImplementedError(NO_INVERSE)
        rows = y.reshape(-1, y.shape[-1])
        return rows_independently(lambda r: self.model.iaf_flow.forward(r).out, rows).reshape(y.shape)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self._log_det is not None and self._log_det[0] is x:
            return self._log_det[1]
        return self._forward(x)[1]


def check_invertible(model: nn.Module) -> None:
    """Raises ValueError naming the first planar layer of ``model.net`` with ``w.u < -1`` (not invertible)."""
    for position, layer in enumerate(getattr(model, "net", ())):
        if type(layer).__name__ == "PlanarFlow":
            product = float((layer.w @ layer.u.T).detach())
            if product < -1:
                raise ValueError(
                    f"pythae VAE_LinNF: planar flow {position} (net.{position}) has w.u = {product:.4g} < -1, so it is not "
                    "invertible and its change of variables is not q(z|x)'s density (pythae does not constrain u); retrain from "
                    "w.u >= -1 and check it after training, or use VAE_IAF"
                )


def flow_posterior(model: nn.Module, gaussian: Distribution) -> Distribution:
    """q(z|x): the encoder's ``gaussian`` (batch ``[B]``, event ``[L]``) pushed through the model's flow."""
    check_invertible(model)
    return TransformedDistribution(gaussian, [PythaeFlow(model)], validate_args=False)
