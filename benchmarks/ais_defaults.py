"""The accuracy/time trade-off behind ``vaeeval ais``'s defaults, measured on the sample models.

Run by hand (about an hour on 2 cores)::

    python benchmarks/ais_defaults.py > ais_defaults.json
    python benchmarks/ais_defaults.py digits_gaussian > gaussian.json     # some of the models

For each sample model, on the first ``POINTS`` test points: AIS at several numbers of
steps T (leapfrog steps L and chains C at the defaults) and at several L (T at its
default), with the seconds each took, and BDMC on ``SIMULATED`` points simulated from
the model at several T. AIS rises with T toward log p(x) and the BDMC gap closes; the
defaults are the smallest settings past which AIS moves by less than its standard
error and the BDMC gap is below a nat.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POINTS, SIMULATED = 64, 32
MODELS = {
    "digits_bernoulli": "digits_binary_test.npy",
    "digits_categorical": "digits_grey_test.npy",
    "digits_continuous_bernoulli": "digits_grey_test.npy",
    "digits_gaussian": "digits_grey_test.npy",
}
STEPS = (30, 100, 300, 1000)
LEAPFROGS = (3, 10)
BDMC_STEPS = (100, 300, 1000)


def _stat(values) -> dict:
    import numpy as np

    values = np.asarray(values)
    return {"mean": float(values.mean()), "stderr": float(values.std(ddof=1) / np.sqrt(values.size))}


def main() -> None:
    from vaeeval import load_data, load_model, tuning
    from vaeeval.estimators.annealing.ais import AISOptions, evaluate_ais
    from vaeeval.estimators.annealing.bdmc import run_bdmc
    from vaeeval.estimators.importance.evaluate import EvaluationOptions

    tuning.keep_freed_memory()
    results = {}
    chosen = sys.argv[1:] or list(MODELS)
    for name, data_file in ((name, MODELS[name]) for name in chosen):
        model = load_model(ROOT / "sample_models" / f"{name}.safetensors")
        data = load_data(ROOT / "sample_models" / data_file, model, limit=POINTS)
        runs = []
        settings = [(steps, 10) for steps in STEPS] + [(300, leapfrog) for leapfrog in LEAPFROGS if leapfrog != 10]
        for steps, leapfrog in settings:
            started = time.perf_counter()
            result = evaluate_ais(model, data, steps=steps, leapfrog=leapfrog, samples=1000)
            seconds = time.perf_counter() - started
            points = result.points
            runs.append({
                "steps": steps, "leapfrog": leapfrog, "chains": result.settings.chains, "seconds": seconds,
                "ais": _stat(points.ais), "iwae": _stat(points.iwae), "elbo": _stat(points.elbo),
                "gap_to_iwae": _stat(points.ais - points.iwae), "ais_stderr": float(points.ais_stderr.mean()),
                "acceptance": float(points.acceptance.mean()), "gradients_per_point": result.cost.pilot + result.cost.run,
            })
            print(name, runs[-1], file=sys.stderr, flush=True)
        sandwiches = []
        for steps in BDMC_STEPS:
            started = time.perf_counter()
            bdmc, _ = run_bdmc(model, SIMULATED, AISOptions(steps=steps), EvaluationOptions(samples=1000))
            sandwiches.append({
                "steps": steps, "seconds": time.perf_counter() - started, "lower": _stat(bdmc.points.lower),
                "upper": _stat(bdmc.points.upper), "gap": _stat(bdmc.points.gap), "iwae": _stat(bdmc.points.iwae),
            })
            print(name, sandwiches[-1], file=sys.stderr, flush=True)
        results[name] = {"points": POINTS, "ais": runs, "bdmc": sandwiches}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
