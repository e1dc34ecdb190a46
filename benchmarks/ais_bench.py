"""Speed of vaeeval's AIS beside a plain batched autograd AIS, and the machine's matmul limit.

Run by hand, not in CI (about five minutes on 2 cores)::

    python benchmarks/ais_bench.py            # a table
    python benchmarks/ais_bench.py --json     # the same numbers as JSON

The workload is the MNIST-size MLP VAE 784-400-20 (ReLU, Bernoulli) of
``bench.py``, random weights, synthetic binary data: ``POINTS`` points,
``CHAINS`` chains each, ``STEPS`` annealing steps with ``LEAPFROG`` leapfrog
steps, the sigmoid schedule, chains started from q(z|x), and one fixed HMC step
size (the same settings for both; vaeeval's pilot run is timed separately).

The plain version is AIS as the papers' code writes it (Wu et al. 2017's BDMC
code): points x chains in one batch, one autograd call per leapfrog gradient
(L + 1 per transition), the weight increment from two extra forward passes and
the acceptance test from two more.

The limit: useful FLOPs are twice the decoder's forward FLOPs per leapfrog
gradient (the forward pass and the backward pass to the input; the weights need
no gradient), divided by the peak float32 GEMM rate measured in the same run (a
1024^3 product, as bench.py). Every measurement runs in a fresh child process; the runs
alternate and each time is the best of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # the shared model and data of the importance-sampling benchmark

POINTS, CHAINS, STEPS, LEAPFROG, STEP_SIZE = 128, 16, 100, 10, 0.05


def gradient_evaluations(points: int) -> int:
    """Leapfrog gradients vaeeval computes: per chain one at the start and L per transition (T - 1 of them)."""
    return points * CHAINS * (1 + (STEPS - 1) * LEAPFROG)


def useful_flops(points: int) -> float:
    return gradient_evaluations(points) * 2 * bench._flops(bench._mlp_modules()[1], [bench.MLP["latent"]])


def child_vaeeval(pilot: bool) -> dict:
    from vaeeval import save_model
    from vaeeval.core import tuning
    from vaeeval.estimators.annealing.ais import AISEvaluator, AISOptions
    from vaeeval.estimators.importance.evaluate import EvaluationOptions

    tuning.keep_freed_memory()  # as the vaeeval command does
    encoder, decoder = bench._mlp_modules()
    with tempfile.TemporaryDirectory() as folder:
        model = save_model(Path(folder) / "m.safetensors", encoder, decoder, likelihood={"family": "bernoulli"},
                           input_shape=[bench.MLP["dims"]], latent_dim=bench.MLP["latent"])
    data = bench._data([bench.MLP["dims"]], POINTS)
    options = AISOptions(steps=STEPS, leapfrog=LEAPFROG, chains=CHAINS, step_size=None if pilot else STEP_SIZE,
                         init="encoder")  # the plain AIS beside starts from q(z|x): no --init auto pilots
    evaluator = AISEvaluator(model, data, options, EvaluationOptions(samples=1))
    AISEvaluator(model, data[:8], AISOptions(steps=3, leapfrog=2, chains=CHAINS, step_size=STEP_SIZE, init="encoder"),
                 EvaluationOptions(samples=1)).evaluate()  # warm-up: threads, allocator, kernels
    started = time.perf_counter()
    result = evaluator.evaluate()
    seconds = time.perf_counter() - started
    stderr = math.sqrt(float((result.points.ais_stderr**2).sum())) / POINTS
    return {"seconds": seconds, "mean_ais": result.summary.ais.mean, "stderr": stderr,
            "acceptance": result.summary.acceptance.mean}


def child_plain() -> dict:
    """AIS as the papers' code does it, on the same weights and settings."""
    import torch
    import torch.nn.functional as F
    from torch.distributions import Normal

    from vaeeval.estimators.annealing.kernel import schedule

    torch.manual_seed(1)
    encoder, decoder = bench._mlp_modules()
    data = torch.from_numpy(bench._data([bench.MLP["dims"]], POINTS))
    with torch.no_grad():
        mean, log_var = encoder(data).chunk(2, dim=-1)
    mean, std = mean.repeat_interleave(CHAINS, 0), (0.5 * log_var).exp().repeat_interleave(CHAINS, 0)
    x = data.repeat_interleave(CHAINS, 0)
    prior = Normal(torch.zeros_like(mean), torch.ones_like(std))
    init = Normal(mean, std)

    def log_f(z, beta):
        log_likelihood = -F.binary_cross_entropy_with_logits(decoder(z), x, reduction="none").sum(-1)
        return (1 - beta) * init.log_prob(z).sum(-1) + beta * (prior.log_prob(z).sum(-1) + log_likelihood)

    def grad_u(z, beta):
        z = z.detach().requires_grad_(True)
        return torch.autograd.grad(-log_f(z, beta).sum(), z)[0]

    betas = schedule("sigmoid", STEPS)
    started = time.perf_counter()
    z = mean + std * torch.randn_like(mean)
    log_w = torch.zeros(len(z))
    accepted = 0.0
    for t in range(1, STEPS + 1):
        with torch.no_grad():
            log_w += log_f(z, betas[t]) - log_f(z, betas[t - 1])
        if t == STEPS:
            break
        beta, v = betas[t], torch.randn_like(z)
        proposal, momentum = z, v - 0.5 * STEP_SIZE * grad_u(z, beta)
        for step in range(1, LEAPFROG + 1):
            proposal = proposal + STEP_SIZE * momentum
            if step < LEAPFROG:
                momentum = momentum - STEP_SIZE * grad_u(proposal, beta)
        momentum = momentum - 0.5 * STEP_SIZE * grad_u(proposal, beta)
        with torch.no_grad():
            current = -log_f(z, beta) + 0.5 * (v * v).sum(-1)
            proposed = -log_f(proposal, beta) + 0.5 * (momentum * momentum).sum(-1)
            accept = torch.rand(len(z)) < torch.exp(current - proposed)
            z = torch.where(accept[:, None], proposal, z)
            accepted += accept.double().mean().item()
    seconds = time.perf_counter() - started
    per_point = torch.logsumexp(log_w.reshape(POINTS, CHAINS), 1) - math.log(CHAINS)
    return {"seconds": seconds, "mean_ais": per_point.mean().item(), "acceptance": accepted / (STEPS - 1)}


def _child(arguments: list[str]) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", *arguments], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(repeats: int) -> dict:

    peak = max(_child(["peak"])["gflops"] for _ in range(3))
    runs: dict[str, list[dict]] = {"vaeeval": [], "plain": [], "vaeeval_with_pilot": []}
    for _ in range(repeats):  # alternating, so drifts in machine load hit every contender alike
        runs["vaeeval"].append(_child(["vaeeval"]))
        runs["plain"].append(_child(["plain"]))
        runs["vaeeval_with_pilot"].append(_child(["vaeeval", "pilot"]))
    best = {name: min(r["seconds"] for r in results) for name, results in runs.items()}  # best of the runs
    flops = useful_flops(POINTS)
    return {
        "machine": {**bench._cpu(), "peak_gemm_gflops": peak},
        "settings": {"points": POINTS, "chains": CHAINS, "steps": STEPS, "leapfrog": LEAPFROG, "step_size": STEP_SIZE},
        "useful_flops": flops,
        "limit_seconds": flops / (peak * 1e9),
        "contenders": {
            name: {
                "seconds": best[name],
                "useful_gflops": flops / best[name] / 1e9,
                "share_of_peak": flops / best[name] / 1e9 / peak,
                "mean_ais": statistics.median(r["mean_ais"] for r in runs[name]),
                "acceptance": statistics.median(r["acceptance"] for r in runs[name]),
            }
            for name in runs
        },
        "speedup_vs_plain": best["plain"] / best["vaeeval"],
        "pilot_overhead": best["vaeeval_with_pilot"] / best["vaeeval"] - 1,
        "agreement": {  # the same estimator with independent noise: the difference is within its error
            "vaeeval_minus_plain": runs["vaeeval"][0]["mean_ais"] - runs["plain"][0]["mean_ais"],
            "stderr_of_difference": math.sqrt(2) * runs["vaeeval"][0]["stderr"],
        },
    }


def render(result: dict) -> str:
    settings = result["settings"]
    rows = [
        f"peak float32 GEMM (1024^3 matmul): {result['machine']['peak_gemm_gflops']:.1f} GFLOP/s",
        f"MLP 784-400-20 Bernoulli: {settings['points']} points x {settings['chains']} chains, T = {settings['steps']}, "
        f"L = {settings['leapfrog']}, ε = {settings['step_size']}: limit {result['limit_seconds']:.2f} s",
        "",
        f"{'':20}{'seconds':>9}{'GFLOP/s':>9}{'of peak':>9}{'mean ais':>12}{'accept':>8}",
    ]
    for name, c in result["contenders"].items():
        rows.append(f"{name:20}{c['seconds']:9.2f}{c['useful_gflops']:9.1f}{c['share_of_peak']:9.0%}"
                    f"{c['mean_ais']:12.3f}{c['acceptance']:8.2f}")
    agreement = result["agreement"]
    rows += [
        "",
        f"speed-up vs the plain version: x{result['speedup_vs_plain']:.2f}; the step-size pilot adds "
        f"{result['pilot_overhead']:.0%}",
        f"vaeeval - plain mean ais: {agreement['vaeeval_minus_plain']:+.3f} "
        f"(standard error of the difference {agreement['stderr_of_difference']:.3f})",
    ]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per contender (the best is kept)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "peak":
            out = bench.child_peak()
        elif kind == "vaeeval":
            out = child_vaeeval(pilot=bool(rest))
        else:
            out = child_plain()
        print(json.dumps(out))
        return
    result = measure(args.repeats)
    print(json.dumps(result, indent=2) if args.json else render(result))


if __name__ == "__main__":
    main()
