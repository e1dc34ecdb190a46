"""The evidence behind ``vaeeval ais``'s defaults: BDMC gap per gradient evaluation, kernel by kernel.

Run by hand (about an hour on 2 cores for every model and kernel at 32 simulated points)::

    python benchmarks/ais_defaults.py > ais_defaults.json                 # every model, every kernel
    python benchmarks/ais_defaults.py --simulated 100 --only default --commands digits_continuous_bernoulli
    python benchmarks/ais_defaults.py --plot ais_defaults.png < ais_defaults.json   # the README's plot

For each sample model, BDMC (forward AIS from q0 and reverse AIS from the exact z, on points
simulated from the model) brackets log p(x); the gap says how far AIS at those settings can be
from it. Every kernel runs at about the same gradient evaluations per point as the former
defaults (T = 500, L = 10, one pilot of 4 chains and 16 chains: 99 820), so gaps compare at
equal cost:

- ``former``: q0 = q(z|x), identity mass matrix, sigmoid schedule, 16 chains (the former defaults);
- ``diagonal``: the same with a diagonal mass matrix from q(z|x)'s widths;
- ``adaptive``: the same with the schedule fitted in the pilot;
- ``prior``: q0 = p(z), otherwise the former defaults;
- ``auto``: per point the q0 whose pilot estimated the higher log p(x) (two pilots, 12 chains);
- ``auto_adaptive``: ``auto`` with the adaptive schedule;
- ``default``: today's defaults (``auto``, sigmoid schedule, identity mass matrix, 12 chains).

The seconds of each BDMC run are printed beside ``vaeeval elbo -k 1000`` on the model's test
points measured in the same run, in this process (the median of three calls after a first one).
``--commands`` also times the two commands as a user runs them, each a fresh process
(``vaeeval elbo MODEL DATA -k 1000 --json`` and ``vaeeval bdmc MODEL --n N --seed S --json`` at
the defaults; start-up, loading and output included): the issue's ≤ 50× budget is their ratio.

``--starts`` measures ``--init auto``'s rule: BDMC per point from q(z|x) and from p(z) (12 chains,
each with its own pilot, whose chains' log-weights it keeps), then the gap each rule for choosing
the start would give (a point started by ``auto`` gets, bit for bit, the numbers of the run from
the start it chose)::

    python benchmarks/ais_defaults.py --starts --simulated 100 --seed 0 > starts_0.json
    python benchmarks/ais_defaults.py --rules benchmarks/ais_starts.json   # the rules, from stored points
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "digits_bernoulli": "digits_binary_test.npy",
    "digits_categorical": "digits_grey_test.npy",
    "digits_continuous_bernoulli": "digits_grey_test.npy",
    "digits_gaussian": "digits_grey_test.npy",
}
FORMER = {"init": "encoder", "schedule": "sigmoid", "mass": "identity", "chains": 16}
KERNELS = {
    "former": FORMER,
    "diagonal": {**FORMER, "mass": "diagonal"},
    "adaptive": {**FORMER, "schedule": "adaptive"},
    "prior": {**FORMER, "init": "prior"},
    "auto": {**FORMER, "init": "auto", "chains": 12},
    "auto_adaptive": {**FORMER, "init": "auto", "chains": 12, "schedule": "adaptive"},
    "default": {},
}


def _stat(values) -> dict:
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(values.mean()), "stderr": float(values.std(ddof=1) / math.sqrt(values.size))}


def measure(names: list[str], kernels: list[str], simulated: int, seed: int = 0, timed: bool = False) -> dict:
    from vaeeval import evaluate, load_data, load_model
    from vaeeval.core import tuning
    from vaeeval.estimators.annealing.ais import AISOptions
    from vaeeval.estimators.annealing.bdmc import run_bdmc
    from vaeeval.estimators.importance.evaluate import EvaluationOptions

    tuning.keep_freed_memory()
    results = {}
    for name in names:
        model = load_model(ROOT / "sample_models" / f"{name}.safetensors")
        data = load_data(ROOT / "sample_models" / MODELS[name], model)
        elbo_seconds = statistics.median([_seconds(evaluate, model, data, samples=1000, seed=0) for _ in range(4)][1:])
        print(name, "elbo -k 1000", f"{elbo_seconds:.1f} s on {data.n} points", file=sys.stderr, flush=True)
        runs = {}
        for kernel in kernels:
            started = time.perf_counter()
            bdmc, _ = run_bdmc(model, simulated, AISOptions(**KERNELS[kernel]), EvaluationOptions(samples=1000, seed=seed))
            points = bdmc.points
            runs[kernel] = {
                "settings": {**KERNELS[kernel]}, "gap": _stat(points.gap), "lower": _stat(points.lower),
                "upper": _stat(points.upper), "acceptance": float(points.acceptance.mean()),
                "gradients_per_point": bdmc.cost.pilot + bdmc.cost.run // 2,  # of one AIS run: the pilot and forward chains
                "seconds": time.perf_counter() - started,
            }
            print(name, kernel, json.dumps(runs[kernel]), file=sys.stderr, flush=True)
        results[name] = {"simulated": simulated, "seed": seed, "elbo_k1000_seconds": elbo_seconds, "data_points": data.n, "kernels": runs}
        if timed:
            results[name]["commands"] = commands(name, simulated, seed)
    return results


def _seconds(run, *arguments, **options) -> float:
    started = time.perf_counter()
    run(*arguments, **options)
    return time.perf_counter() - started


def commands(name: str, simulated: int, seed: int) -> dict:
    """Wall seconds of ``vaeeval elbo -k 1000`` and ``vaeeval bdmc`` at the defaults, each a fresh process, and BDMC's gap."""
    model = str(ROOT / "sample_models" / f"{name}.safetensors")
    data = str(ROOT / "sample_models" / MODELS[name])
    found = {}
    for label, arguments in (("elbo", [model, data, "-k", "1000"]), ("bdmc", [model, "--n", str(simulated), "--seed", str(seed)])):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "vaeeval", label, *arguments, "--json"], check=True, capture_output=True, text=True)
        found[f"{label}_seconds"] = time.perf_counter() - started
        if label == "bdmc":
            found["gap"] = json.loads(done.stdout)["summary"]["gap"]
    found["ratio"] = found["bdmc_seconds"] / found["elbo_seconds"]
    print(name, "commands", json.dumps(found), file=sys.stderr, flush=True)
    return found


def starts(names: list[str], simulated: int, seed: int) -> list[dict]:
    """Per point: the BDMC gap from each start and each pilot's log-weights, and the mean gap under each rule."""
    import numpy as np

    from vaeeval import load_model
    from vaeeval.core import tuning
    from vaeeval.estimators.annealing import ais
    from vaeeval.estimators.annealing.bdmc import run_bdmc
    from vaeeval.estimators.importance.evaluate import EvaluationOptions

    tuning.keep_freed_memory()
    pilot = ais._Annealer._pilot
    results = []
    for name in names:
        model, points = load_model(ROOT / "sample_models" / f"{name}.safetensors"), {}
        for init in ("encoder", "prior"):
            weights = []

            def kept(self, *arguments, weights=weights, **options):
                scale, chains = pilot(self, *arguments, **options)
                weights.append(chains.log_weight.numpy().copy())
                return scale, chains

            ais._Annealer._pilot = kept
            try:
                bdmc, _ = run_bdmc(model, simulated, ais.AISOptions(init=init, chains=12), EvaluationOptions(samples=1000, seed=seed))
            finally:
                ais._Annealer._pilot = pilot
            points[init] = {"gap": bdmc.points.gap.tolist(), "pilot": np.concatenate(weights).tolist()}
        results.append(with_rules({"model": name, "seed": seed, "simulated": simulated, "points": points}))
        print(name, json.dumps(results[-1]["rules"]), file=sys.stderr, flush=True)
    return results


def with_rules(found: dict) -> dict:
    """``found`` with ``rules``: the mean BDMC gap (and the prior starts) if each rule chose the points' starts."""
    import numpy as np

    from vaeeval.estimators.annealing.ais import AUTO_MARGIN

    gaps = {init: np.asarray(found["points"][init]["gap"]) for init in ("encoder", "prior")}
    encoder, prior = (np.asarray(found["points"][init]["pilot"]) for init in ("encoder", "prior"))
    ahead = prior.mean(1) - encoder.mean(1)
    spread = np.sqrt(encoder.var(1, ddof=1) / encoder.shape[1] + prior.var(1, ddof=1) / prior.shape[1])
    rules = {"mean ahead by 0.5 standard errors (former)": ahead > 0.5 * spread, "mean ahead": ahead > 0,
             f"mean ahead by {AUTO_MARGIN:g} nats (today's)": ahead > AUTO_MARGIN, "mean ahead by 0.5 nats": ahead > 0.5,
             "never (--init encoder)": ahead != ahead, "always (--init prior)": ahead == ahead}
    return {**found, "rules": {rule: {"gap": _stat(np.where(chosen, gaps["prior"], gaps["encoder"])), "prior_starts": int(chosen.sum())}
                               for rule, chosen in rules.items()}}


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 3.2), squeeze=False)
    for axis, (name, found) in zip(axes[0], results.items(), strict=True):
        kernels = list(found["kernels"])
        gaps = [found["kernels"][k]["gap"]["mean"] for k in kernels]
        errors = [1.96 * found["kernels"][k]["gap"]["stderr"] for k in kernels]
        axis.bar(range(len(kernels)), gaps, yerr=errors, color=["grey" if k == "former" else "tab:blue" for k in kernels])
        axis.set_xticks(range(len(kernels)), kernels, rotation=45, ha="right")
        axis.set_title(name.replace("digits_", ""), fontsize=9)
        axis.axhline(0, color="black", linewidth=0.5)
    axes[0][0].set_ylabel("BDMC gap, nats per point (±1.96 SE)")
    figure.suptitle("BDMC gap at the same gradient evaluations per point (≈ 99 820)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=list(MODELS))
    parser.add_argument("--only", nargs="*", default=list(KERNELS), choices=list(KERNELS))
    parser.add_argument("--simulated", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="of the simulated points and the chains")
    parser.add_argument("--starts", action="store_true", help="measure --init auto's rule for choosing each point's start")
    parser.add_argument("--rules", help="recompute the rules' gaps from a --starts file")
    parser.add_argument("--commands", action="store_true", help="also time vaeeval elbo -k 1000 and vaeeval bdmc, each a fresh process")
    parser.add_argument("--plot", help="read the JSON on stdin and draw it to this file")
    arguments = parser.parse_args()
    if arguments.plot:
        plot(json.load(sys.stdin), arguments.plot)
        return
    if arguments.starts:
        print(json.dumps(starts(arguments.models, arguments.simulated, arguments.seed), indent=1))
        return
    if arguments.rules:
        for found in json.loads(Path(arguments.rules).read_text()):
            print(found["model"], f"seed {found['seed']}", json.dumps(with_rules(found)["rules"]))
        return
    print(json.dumps(measure(arguments.models, arguments.only, arguments.simulated, arguments.seed, arguments.commands), indent=2))


if __name__ == "__main__":
    main()
