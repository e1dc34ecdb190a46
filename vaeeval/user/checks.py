"""What the user's ``--arch`` code gives back, checked where it comes back: its tensors, its distributions'
parameters, what their ``log_prob`` gives.

Every value ``encode``, ``decode``, ``prior()`` or a group's factor returns passes ``returned`` (through
``calls.call_user``); every ``log_prob`` of theirs passes ``log_probabilities``. A value vaeeval cannot
take is refused in one line naming the method, the value and what was found, instead of a traceback
later or, worse, a number computed from something else (a complex mean's real part, a log-probability
above 0). ``Refused`` is such a refusal: vaeeval's, not an exception of the user's code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.distributions import Distribution, Independent, MixtureSameFamily, TransformedDistribution

from vaeeval.errors import VaeevalError

# A log-probability above 0 by more than this, per value, is no rounding: a discrete distribution's log_prob is at most 0.
LOG_PROBABILITY_SLACK = 1e-6


class Refused(ValueError):
    """vaeeval refuses what the user's code gave (its message says what, found and needed); not the code's own failure."""


def device_of(args: tuple[Any, ...]) -> torch.device | None:
    """The device of the first tensor among ``args`` (or among a mapping's values): where what comes back must be."""
    for arg in args:
        values = arg.values() if isinstance(arg, Mapping) else (arg,)
        for value in values:
            if isinstance(value, torch.Tensor):
                return value.device
    return None


def returned(what: str, value: Any, device: torch.device | None = None, integers: bool = False) -> Any:
    """``value`` as the user's code returned it, once its tensors and distributions are checked.

    A tensor must be real floating point, not on the meta device (which holds no values), and on ``device``
    where one is given (a 0-dimensional tensor may stay on the CPU, as torch allows). A distribution's
    tensors likewise, except that an integer or boolean tensor is refused only as a parameter that its
    ``arg_constraints`` says is continuous (a Binomial's ``total_count`` may be integers; a Normal's
    ``loc`` may not); with ``integers``, a tensor returned may hold integers too (a discrete distribution's
    draws). Tuples, lists and mappings are looked into; anything else is left to its caller.

    Raises:
        Refused: the first value that does not pass, named.
    """
    if isinstance(value, torch.Tensor):
        _tensor(f"{what} returned a tensor that", value, device, continuous=not integers)
    elif isinstance(value, Distribution):
        _distribution(f"{what} returned {describe(value)}", value, device)
    elif isinstance(value, (tuple, list)):
        for index, item in enumerate(value):
            if isinstance(item, torch.Tensor):
                _tensor(f"{what} returned a {type(value).__name__} whose item {index}", item, device, continuous=True)
            elif isinstance(item, Distribution):
                returned(what, item, device)
    elif isinstance(value, Mapping):
        for item in value.values():
            if isinstance(item, Distribution):
                returned(what, item, device)
    return value


def _distribution(subject: str, distribution: Distribution, device: torch.device | None, depth: int = 0) -> None:
    """Each tensor held by ``distribution`` and the distributions it wraps (see ``returned``)."""
    if depth > 8:
        return
    try:
        parameters = distribution.arg_constraints  # Distribution's own raises NotImplementedError: a class may not say
    except Exception:
        parameters = {}
    parameters = parameters if isinstance(parameters, Mapping) else {}
    for name, value in list(getattr(distribution, "__dict__", {}).items()):
        if isinstance(value, torch.Tensor):
            constraint = parameters.get(name.lstrip("_"))
            continuous = constraint is not None and not getattr(constraint, "is_discrete", False)
            _tensor(f"{subject} whose {name.lstrip('_')}", value, device, continuous=continuous)
        elif isinstance(value, Distribution):
            _distribution(subject, value, device, depth + 1)


def _tensor(subject: str, value: torch.Tensor, device: torch.device | None, continuous: bool) -> None:
    if value.is_complex():
        raise Refused(f"{subject} is complex ({value.dtype}); vaeeval needs real values (it would drop the imaginary part)")
    if continuous and not value.is_floating_point():
        raise Refused(f"{subject} is {value.dtype}; vaeeval needs real floating point values (float32 or float64)")
    if value.is_meta:
        raise Refused(f"{subject} is on the meta device, which holds no values")
    if device is not None and value.device != device and value.dim() > 0:
        raise Refused(f"{subject} is on {value.device}; the input it was given is on {device}")


def log_probabilities(found: Any) -> torch.Tensor:
    """What a ``log_prob`` gave, checked to be real numbers vaeeval can read (see ``returned``).

    Raises:
        Refused: no tensor, or complex, integer or boolean values, or values on the meta device.
    """
    if not isinstance(found, torch.Tensor):
        raise Refused(f"gives a {type(found).__name__}; a log_prob gives a tensor")
    _tensor("its result", found, None, continuous=True)
    return found


def checked_total(distribution: Distribution, total: torch.Tensor, values: int, what: str) -> torch.Tensor:
    """``total``, what ``distribution.log_prob`` gives ``[N]`` (over ``values`` numbers each), checked, for a
    discrete support, to be at most 0 (up to rounding): a larger one is no log-probability. (A NaN is left to
    its caller: AIS may step to a z where it is one, and rejects the step.)

    Raises:
        Refused: the largest value above 0, and which row it is.
    """
    if not distribution.support.is_discrete or total.numel() == 0:
        return total
    largest = int(total.detach().reshape(-1).argmax())
    top = float(total.detach().reshape(-1)[largest])
    if top > LOG_PROBABILITY_SLACK * max(1, values):
        raise Refused(
            f"{what} of a discrete distribution must be at most 0 (the log of a probability), found {top:+.6g} (row "
            f"{largest} of the {total.numel()} it was given at once)"
        )
    return total


def drawable(what: str, distribution: Distribution, draws: bool) -> None:
    """The methods vaeeval calls on it are defined: ``log_prob`` always, ``rsample`` or ``sample`` where it ``draws``.

    Raises:
        VaeevalError: the class leaves ``Distribution``'s own in place, which only raise NotImplementedError.
    """
    inner = distribution
    while isinstance(inner, Independent):
        inner = inner.base_dist
    cls = type(inner)
    if cls.log_prob is Distribution.log_prob:
        raise VaeevalError(f"{what} returned {describe(distribution)}, which defines no log_prob; vaeeval scores with log_prob")
    if draws and cls.rsample is Distribution.rsample and cls.sample is Distribution.sample:
        raise VaeevalError(
            f"{what} returned {describe(distribution)}, which defines neither rsample nor sample; vaeeval needs one of them "
            "to draw z (and log_prob to score it)"
        )


def describe(distribution: Distribution) -> str:
    """Its class, with what it wraps: ``Independent(Normal)``, ``MixtureSameFamily(Independent(Normal))``."""
    name = type(distribution).__name__
    if isinstance(distribution, Independent | TransformedDistribution):
        return f"{name}({describe(distribution.base_dist)})"
    if isinstance(distribution, MixtureSameFamily):
        return f"{name}({describe(distribution.component_distribution)})"
    return name
