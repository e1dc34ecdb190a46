"""Hierarchical latents: z made of named groups, each with a factor conditioned on groups before it.

``encode(x)`` may return a mapping ``{name: factor}`` in the order its factors are drawn,
q(z_1|x) q(z_2|z_1, x) ..., and ``prior()`` likewise p(z_L) p(z_{L-1}|z_L) ..., in its own
order (a bottom-up q beside a top-down p). A factor is a torch distribution over its group
(event ``[d_g]``) or a callable taking groups that come before it in its own mapping, by
name, as keyword arguments, and returning one. Each mapping becomes one distribution over
the flat z (``LatentChain``): the groups concatenated in q's order, the layout the rest of
vaeeval sees (draws, log-densities, AIS's positions, latent health's units); ``decode``
receives the groups as ``{name: [N, d_g]}`` (``GroupsDecoder``).

Shapes. A posterior's factors have batch ``[B]`` (the points). Its callables receive the
earlier groups as ``[*sample, B, d]`` (torch's sample-then-batch order), so features of x
computed in ``encode`` broadcast against them, and return a distribution whose batch
broadcasts to ``[*sample, B]``. A prior's callables receive rows ``[N, d]`` (and, for latent
health's per-group KL, q's draws ``[S, B, d]``: any leading axes). Groups reach
callables in float32, as the model's nets compute; log-densities are float64 where vaeeval
knows the family (``in_float64``).

log q(z|x) = Σ_g log q_g(z_g | z_<g, x) and log p(z) = Σ_g log p_g(z_g | its parents), each
term on its own slice of the flat z, through autograd for AIS and BDMC.

Keyed draws. A chain's noise per draw holds, group by group in its own order, that group's
noise (``noise_width``) and one more number, the uniform a mixture picks its component
with: every group's draw depends only on (seed, point, sample), as any latent's does.

Rows. The user's nets see at least ``MIN_ROWS`` rows: a posterior built from a padded batch
(``ArchModel.posterior``) gives, through ``first_rows``, a chain that pads what it is given
back to the whole batch before calling the factors, and a prior pads its rows; so a point's
numbers never depend on how many points came with it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch.distributions import Distribution, Independent, Normal, constraints

from vaeeval.errors import VaeevalError
from vaeeval.format.model import MIN_ROWS
from vaeeval.user.calls import call_user
from vaeeval.user.distributions import SelfKeyed, describe, in_float64, keyed, log_prob64, noise_width, transform
from vaeeval.user.methods import DecoderAdapter, describe_value

Factor = Distribution | Callable[..., Distribution]


@dataclass(frozen=True)
class Layout:
    """The flat z: the groups' names in q's order, and their sizes."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]

    @property
    def latent_dim(self) -> int:
        return sum(self.sizes)

    def slices(self) -> dict[str, slice]:
        """Each group's columns of the flat z."""
        starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        return {name: slice(start, start + size) for name, start, size in zip(self.names, starts, self.sizes, strict=True)}

    def split(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: z[..., its columns]}`` of a flat ``z [..., latent_dim]``."""
        return {name: z[..., columns] for name, columns in self.slices().items()}

    def describe(self) -> str:
        return ", ".join(f"{name} [{size}]" for name, size in zip(self.names, self.sizes, strict=True))


@dataclass(frozen=True)
class Plan:
    """What probing a mapping found (``plan_of``): who takes what, and the noise each group's draw needs.

    Attributes:
        what: ``encode(x)`` or ``prior()``, for messages.
        order: the groups in the mapping's order, the order factors are evaluated in.
        arguments: the earlier groups each factor takes (none for a distribution).
        widths: the noise numbers each group's family draws from (``noise_width``).
        discrete: some group has a discrete support.
    """

    what: str
    layout: Layout
    order: tuple[str, ...]
    arguments: dict[str, tuple[str, ...]]
    widths: dict[str, int]
    discrete: bool


def _arguments(what: str, name: str, factor: Factor, earlier: tuple[str, ...]) -> tuple[str, ...]:
    """The earlier groups a callable factor takes by name; all of them for one taking ``**kwargs``."""
    if isinstance(factor, Distribution):
        return ()
    try:
        parameters = inspect.signature(factor).parameters.values()
    except (TypeError, ValueError):  # no signature to read: give it every earlier group
        return earlier
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return earlier
    taken = []
    for parameter in parameters:
        if parameter.name in earlier:
            taken.append(parameter.name)
        elif parameter.default is inspect.Parameter.empty:
            before = ", ".join(earlier) if earlier else "none: it is the first"
            raise VaeevalError(
                f"{what}'s group {name!r} takes {parameter.name!r}, which is not a group before it in {what}'s mapping "
                f"(groups before it: {before})"
            )
    return tuple(taken)


def _check_mapping(found: Mapping[str, Any], what: str) -> None:
    if not found:
        raise VaeevalError(f"{what} returned an empty mapping; a hierarchical latent needs at least one group")
    for name, factor in found.items():
        if not isinstance(name, str):
            raise VaeevalError(f"{what} returned a mapping keyed by {describe_value(name)}; name each group with a string")
        if not isinstance(factor, Distribution) and not callable(factor):
            raise VaeevalError(
                f"{what}'s group {name!r} is {describe_value(factor)}; each group needs a torch distribution or a "
                "callable returning one"
            )


def _resolved(what: str, name: str, factor: Factor, arguments: tuple[str, ...], earlier: Mapping[str, torch.Tensor],
              size: int | None) -> Distribution:
    """The factor of group ``name`` given the earlier groups, checked, in float64 where vaeeval knows its family."""
    if isinstance(factor, Distribution):
        found = factor
    else:
        given = {key: earlier[key].to(torch.float32) for key in arguments}
        found = call_user(f"{what}'s group {name!r}", partial(factor, **given))
    if not isinstance(found, Distribution):
        raise VaeevalError(f"{what}'s group {name!r} gave {describe_value(found)}; it needs a torch distribution over the group")
    if isinstance(found, Normal) and not found.event_shape and found.batch_shape:
        found = Independent(found, 1)
    if len(found.event_shape) != 1:
        raise VaeevalError(
            f"{what}'s group {name!r} is {describe(found)} with event shape {list(found.event_shape)}; a group needs "
            "event [size] (one vector per point)"
        )
    if size is not None and found.event_shape[0] != size:
        source = "encode(x) gives the group" if what == "prior()" else "it had, when probed,"
        raise VaeevalError(f"{what}'s group {name!r} is {describe(found)} over {found.event_shape[0]} values; {source} {size}")
    return in_float64(found)


def plan_of(found: Mapping[str, Any], what: str, rows: int | None, layout: Layout | None = None) -> Plan:
    """Check a mapping of factors by drawing once through it (at zero noise); ``layout`` is q's, for a prior.

    Raises:
        VaeevalError: a group that is no distribution, takes a later group, has the wrong size or
            shape, cannot be drawn from keyed noise, or groups that differ from q's.
    """
    _check_mapping(found, what)
    order = tuple(found)
    if layout is not None and sorted(order) != sorted(layout.names):
        raise VaeevalError(
            f"{what}'s groups ({', '.join(order)}) are not encode(x)'s ({', '.join(layout.names)}); "
            "q and p must name the same groups"
        )
    expected = {} if layout is None else dict(zip(layout.names, layout.sizes, strict=True))
    arguments = {name: _arguments(what, name, factor, order[:i]) for i, (name, factor) in enumerate(found.items())}
    prefix = (1, rows) if rows is not None else (MIN_ROWS,)
    draws: dict[str, torch.Tensor] = {}
    widths: dict[str, int] = {}
    discrete = False
    for name, factor in found.items():
        distribution = _resolved(what, name, factor, arguments[name], draws, expected.get(name))
        try:
            broadcast = torch.broadcast_shapes(distribution.batch_shape, prefix)
        except RuntimeError:
            broadcast = None
        if broadcast != torch.Size(prefix):
            shape = f"[*sample, {rows}]" if rows is not None else "rows [N]"
            raise VaeevalError(
                f"{what}'s group {name!r} is {describe(distribution)} with batch shape {list(distribution.batch_shape)}; "
                f"its batch must broadcast to {shape}"
            )
        if not keyed(distribution):
            raise VaeevalError(
                f"{what}'s group {name!r} is {describe(distribution)}, which vaeeval cannot draw from keyed noise; a "
                "group needs Normal, MultivariateNormal, LowRankMultivariateNormal, a flow or mixture of them, or a "
                "Bernoulli or categorical family"
            )
        widths[name] = noise_width(distribution)
        discrete = discrete or distribution.support.is_discrete
        noise = torch.zeros(*prefix, widths[name], dtype=torch.float64)
        half = torch.full(prefix, 0.5, dtype=torch.float64)
        draws[name] = transform(distribution, noise, half, unit=torch.full_like(noise, 0.5))
        expected.setdefault(name, int(distribution.event_shape[0]))
    layout = layout or Layout(order, tuple(expected[name] for name in order))
    return Plan(what, layout, order, arguments, widths, discrete)


class LatentChain(SelfKeyed):
    """One mapping of factors as a distribution over the flat z ``[latent_dim]`` in ``plan.layout``'s order.

    Args:
        factors: the mapping as the model returned it.
        plan: what ``plan_of`` found for such mappings.
        rows: the batch the posterior's factors have; None for a prior.
        taken: the first ``taken`` of those rows are this distribution's batch (see ``first_rows``).
    """

    arg_constraints: dict[str, constraints.Constraint] = {}
    has_rsample = False

    def __init__(self, factors: Mapping[str, Factor], plan: Plan, rows: int | None, taken: int | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.like = torch.zeros((), dtype=torch.float64, device=device)  # the dtype and device of z (``_parameter``)
        if tuple(factors) != plan.order:
            raise VaeevalError(
                f"{plan.what} returned the groups {', '.join(map(str, factors))}; when probed it returned "
                f"{', '.join(plan.order)}"
            )
        self.factors, self.plan, self.rows, self.taken = dict(factors), plan, rows, taken
        batch = () if rows is None else (rows if taken is None else taken,)
        super().__init__(torch.Size(batch), torch.Size([plan.layout.latent_dim]), validate_args=False)

    @property
    def support(self) -> constraints.Constraint:
        """Real vectors; integers where a group is discrete (HMC cannot move such a z)."""
        return constraints.independent(constraints.nonnegative_integer if self.plan.discrete else constraints.real, 1)

    @property
    def noise_width(self) -> int:
        return sum(width + 1 for width in self.plan.widths.values())

    def first_rows(self, rows: int) -> LatentChain:
        return LatentChain(self.factors, self.plan, self.rows, rows, self.like.device)

    def factor_at(self, name: str, earlier: Mapping[str, torch.Tensor]) -> Distribution:
        """Group ``name``'s factor given the earlier groups ``earlier`` (as the factors take them), checked."""
        size = self.plan.layout.sizes[self.plan.layout.names.index(name)]
        return _resolved(self.plan.what, name, self.factors[name], self.plan.arguments[name], earlier, size)

    def rows_in(self, tensor: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """``tensor [*prefix, W]`` as the factors take it (padded), and the way back for results ``[*padded, ...]``."""
        prefix = tuple(tensor.shape[:-1])
        if self.rows is None:
            flat = tensor.reshape(-1, tensor.shape[-1])
            count = flat.shape[0]
            if count < MIN_ROWS:
                flat = torch.cat([flat, flat.new_zeros(MIN_ROWS - count, flat.shape[1])])
            return flat, lambda out: out[:count].reshape(*prefix, *out.shape[1:])
        if self.taken is None or self.taken == self.rows:
            return tensor, lambda out: out
        extra = tensor.new_zeros(*prefix[:-1], self.rows - prefix[-1], tensor.shape[-1])
        axis = len(prefix) - 1
        return torch.cat([tensor, extra], dim=-2), lambda out: out.narrow(axis, 0, self.taken)

    def keyed_transform(self, normal: torch.Tensor, unit: torch.Tensor | None) -> torch.Tensor:
        """Draws ``[*prefix, latent_dim]``, group after group in the mapping's order, each from its own noise."""
        normal, back = self.rows_in(normal.double())
        unit = None if unit is None else self.rows_in(unit.double())[0]
        draws: dict[str, torch.Tensor] = {}
        offset = 0
        for name in self.plan.order:
            width = self.plan.widths[name]
            distribution = self.factor_at(name, draws)
            if unit is None:  # the uniforms are the normals' cdf
                component, units = torch.special.ndtr(normal[..., offset + width]), None
            else:
                component, units = unit[..., offset + width], unit[..., offset : offset + width]
            draws[name] = transform(distribution, normal[..., offset : offset + width], component, unit=units).double()
            offset += width + 1
        return back(torch.cat([draws[name] for name in self.plan.layout.names], dim=-1))

    def group_log_probs(self, value: torch.Tensor) -> dict[str, torch.Tensor]:
        """log of each group's factor at the flat ``value [..., latent_dim]``, ``{name: [...]}`` float64, in the
        mapping's order.

        Raises:
            VaeevalError: a factor whose log_prob is NaN, naming it.
        """
        rows, back = self.rows_in(value.double())
        groups = self.plan.layout.split(rows)
        found = {}
        for name in self.plan.order:
            distribution = self.factor_at(name, groups)
            log_p = back(call_user(f"{self.plan.what}'s group {name!r}'s {type(distribution).__name__}.log_prob",
                                   log_prob64, distribution, groups[name]))
            bad = torch.isnan(log_p) & ~back(torch.isinf(groups[name]).any(-1))  # not at an infinite z (AIS may step there)
            if bool(bad.any()):
                raise VaeevalError(
                    f"{self.plan.what}'s group {name!r} ({describe(distribution)}): log_prob is NaN for {int(bad.sum())} "
                    f"of {bad.numel()} values (NaN in its parameters or in z)"
                )
            found[name] = log_p
        return found

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Σ_g log factor_g at ``value [..., latent_dim]``, ``[...]`` float64 (differentiable in ``value``)."""
        terms = list(self.group_log_probs(value).values())
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        return total

    def __repr__(self) -> str:
        return f"LatentChain({self.plan.what}: {', '.join(self.plan.order)})"


def posterior_chain(found: Any, plan: Plan, method: str, x: torch.Tensor) -> LatentChain:
    """What ``encode`` returned for the points ``x``, as q(z|x) over the flat z (on their device)."""
    if not isinstance(found, Mapping):
        raise VaeevalError(f"{method}(x) returned {describe_value(found)}; when probed it returned groups ({', '.join(plan.order)})")
    return LatentChain(found, plan, x.shape[0], device=x.device)


def prior_chain(found: Mapping[str, Any], layout: Layout) -> LatentChain:
    """What ``prior()`` returned, as p(z) over the flat z of q's layout, checked against it."""
    return LatentChain(found, plan_of(found, "prior()", None, layout), None)


class GroupsDecoder(DecoderAdapter):
    """``decode`` of a hierarchical model, which takes the groups ``{name: [N, d_g]}`` split from the flat z."""

    def __init__(self, adapter: DecoderAdapter, layout: Layout) -> None:
        super().__init__(adapter.module, adapter.method, adapter.probabilities, None, adapter.untraced, adapter.levels)
        self.layout = layout

    def call(self, z: torch.Tensor, covariates: Mapping[str, torch.Tensor] | None = None) -> Any:
        output = call_user(f"{self.method}(z)", partial(getattr(self.module, self.method), **(covariates or {})),
                           self.layout.split(z))
        return output if isinstance(output, Distribution) else self._format1(output, z.shape[0])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.call(z)


def groups_note(plan: Plan, prior: Distribution) -> str:
    """What the output says about a hierarchical latent."""
    p_order = ", ".join(prior.plan.order) if isinstance(prior, LatentChain) else "one distribution over the flat z"
    return (
        f"hierarchical latent: groups {plan.layout.describe()} concatenated in encode's order; q draws "
        f"{', '.join(plan.order)}, p(z) takes {p_order}; decode receives {{name: z_g}}; the KL is the Monte Carlo mean of "
        "log q - log p over the whole chain (vaeeval latents gives it per group)"
    )

