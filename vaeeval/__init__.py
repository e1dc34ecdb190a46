"""vaeeval: how good is a trained VAE, in real nats.

Load a format-1 model (FORMAT.md), check data against it, and estimate per
point the ELBO, its reconstruction term, KL(q(z|x) || p(z)) and the
importance-weighted log p(x)::

    from vaeeval import load_model, load_data, evaluate
    model = load_model("model.safetensors")
    result = evaluate(model, load_data("data.npy", model), samples=1000)
    result.summary.iwae.mean

``vaeeval.tuning.keep_freed_memory()`` makes evaluations about a quarter
faster; it changes a process-wide allocator setting, so it is yours to call.

The names below are imported when first used, so ``import vaeeval`` (and the
command line's start) does not load torch before it is needed.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

_WHERE = {
    "Comparison": "compare",
    "compare": "compare",
    "Dataset": "data",
    "load_data": "data",
    "Domain": "domains",
    "DataError": "errors",
    "ModelFileError": "errors",
    "VaeevalError": "errors",
    "EvaluationOptions": "evaluate",
    "Evaluator": "evaluate",
    "evaluate": "evaluate",
    "AISOptions": "ais",
    "evaluate_ais": "ais",
    "run_bdmc": "ais",
    "LatentHealth": "latents",
    "latent_health": "latents",
    "Model": "model",
    "load_model": "model",
    "save_model": "model",
    "Evaluation": "results",
    "PointResults": "results",
    "Settings": "results",
    "Stat": "results",
    "Summary": "results",
    "summarize": "results",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'vaeeval' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"vaeeval.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


class _Package(types.ModuleType):
    """``vaeeval.evaluate`` and ``vaeeval.compare`` are functions here, though modules of those names exist:
    the import system's binding of a submodule to the package does not replace them."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _WHERE and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
