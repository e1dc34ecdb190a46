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
"""

from vaeeval.compare import Comparison, compare
from vaeeval.data import Dataset, load_data
from vaeeval.domains import Domain
from vaeeval.errors import DataError, ModelFileError, VaeevalError
from vaeeval.evaluate import EvaluationOptions, Evaluator, evaluate
from vaeeval.latents import LatentHealth, latent_health
from vaeeval.model import Model, load_model, save_model
from vaeeval.results import Evaluation, PointResults, Settings, Stat, Summary, summarize

__version__ = "0.1.0"

__all__ = [
    "Comparison",
    "DataError",
    "Dataset",
    "Domain",
    "Evaluation",
    "EvaluationOptions",
    "Evaluator",
    "LatentHealth",
    "Model",
    "ModelFileError",
    "PointResults",
    "Settings",
    "Stat",
    "Summary",
    "VaeevalError",
    "compare",
    "evaluate",
    "latent_health",
    "load_data",
    "load_model",
    "save_model",
    "summarize",
]
