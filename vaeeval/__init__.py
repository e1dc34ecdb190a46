"""vaeeval: how good is a trained VAE, in real nats.

Load a format-1 model (FORMAT.md), check data against it, and estimate per
point the ELBO, its reconstruction term, KL(q(z|x) || p(z)) and the
importance-weighted log p(x)::

    from vaeeval import load_model, load_data, evaluate
    model = load_model("model.safetensors")
    result = evaluate(model, load_data("data.npy", model), samples=1000)
    result.summary.iwae.mean

``vaeeval.core.tuning.keep_freed_memory()`` makes evaluations about a quarter
faster; it changes a process-wide allocator setting, so it is yours to call.

The names below are imported when first used, so ``import vaeeval`` (and the
command line's start) does not load torch before it is needed.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_WHERE = {
    "Comparison": "analysis.compare",
    "compare": "analysis.compare",
    "Dataset": "format.data",
    "load_data": "format.data",
    "Domain": "format.domains",
    "DataError": "errors",
    "ModelFileError": "errors",
    "VaeevalError": "errors",
    "EvaluationOptions": "estimators.importance.evaluate",
    "Evaluator": "estimators.importance.evaluate",
    "evaluate": "estimators.importance.evaluate",
    "AISOptions": "estimators.annealing.ais",
    "evaluate_ais": "estimators.annealing.ais",
    "run_bdmc": "estimators.annealing.bdmc",
    "LatentHealth": "results.latents",
    "latent_health": "results.latents",
    "Model": "format.model",
    "load_model": "user.sources",
    "save_model": "format.saving",
    "Evaluation": "results.numbers",
    "PointResults": "results.numbers",
    "Settings": "results.numbers",
    "Stat": "results.numbers",
    "Summary": "results.numbers",
    "summarize": "results.numbers",
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
