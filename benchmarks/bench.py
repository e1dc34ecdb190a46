"""Speed of vaeeval beside its peer (pythae's ``VAE.get_nll``) and the machine's matmul limit.

Run by hand, not in CI (needs ``pip install pythae``; about ten minutes on 2 cores)::

    python benchmarks/bench.py                                    # a table
    python benchmarks/bench.py --json > now.json                  # the same numbers as JSON
    python benchmarks/bench.py --baseline benchmarks/baseline.json  # and the ratios against a baseline

The seconds depend on the machine; the ratios measured in one run do much less: vaeeval's
time over its own decoder products alone, the share of the peak GEMM rate, the speed-ups
over pythae and over a plain batched AIS (``ais_bench.py``, run as part of this one).
``--baseline FILE`` (a ``--json`` output of an earlier commit, e.g. the committed
``benchmarks/baseline.json``) prints each ratio beside the baseline's and says plainly,
exiting 1, when one got worse by more than 10%.

Every measurement runs in a fresh child process, so each reports its own peak RSS,
and times only the computation (not interpreter start-up, imports or model
building). The runs alternate (vaeeval, pythae at batch 100, pythae at batch
1000, ...) and each time is the best of ``--repeats`` runs (interference on a shared machine
only ever adds time, so the minimum is the steadiest estimate).

Workloads:

* ``mlp``: the MNIST-size MLP VAE 784-400-20 (ReLU, Bernoulli), random weights,
  synthetic binary data, K = 1000, 100 points: vaeeval, pythae at batch 100 and
  at batch 1000 (the same weights wrapped in pythae's BaseEncoder/BaseDecoder),
  and vaeeval's peak RSS at K = 500 and K = 5000.
* ``conv``: a convolutional VAE on 28x28 images, K = 5000, 20 points.
* ``fixed cost``: the whole ``vaeeval elbo`` command on one sample point at K = 1, minus
  ``python -c "import torch, numpy, safetensors, click, rich"`` with the garbage collector
  paused as vaeeval's start-up pauses it (and the plain imports, for reference): what a run
  costs beyond its imports and its points. The children may cache bytecode, as an installed
  package does (``PYTHONDONTWRITEBYTECODE`` is dropped for them; the first, untimed runs write
  the cache): where that variable is set, every start compiles vaeeval's 60 modules again,
  about 0.1 s more (``source_compiled_seconds`` measures that case, for reference).
* ``ais``: ``ais_bench.py``'s vaeeval AIS beside a plain batched autograd AIS (``--no-ais`` skips it).

Beside the limit, the run times vaeeval's own decoder alone on the same number of
latent rows (its matrix products and ReLU, no sampling, likelihood or statistics):
the floor that vaeeval's time is measured against.

The limit: the FLOPs of every encoder and decoder pass vaeeval makes (one
encoder pass per point, one decoder pass per sample), divided by the peak
float32 GEMM rate measured in the same run (a 1024^3 product: the faster of torch's
matmul and the oneDNN product of vaeeval's linear layers).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MLP = {"dims": 784, "hidden": 400, "latent": 20}
POINTS, SAMPLES = 100, 1000
CONV_POINTS, CONV_SAMPLES = 20, 5000


def _mlp_modules():
    import torch
    from torch import nn

    torch.manual_seed(0)
    d, h, latent = MLP["dims"], MLP["hidden"], MLP["latent"]
    encoder = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, 2 * latent))
    decoder = nn.Sequential(nn.Linear(latent, h), nn.ReLU(), nn.Linear(h, d))
    return encoder, decoder


def _conv_modules():
    import torch
    from torch import nn

    torch.manual_seed(0)
    encoder = nn.Sequential(
        nn.Conv2d(1, 32, 4, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 7 * 7, 32)
    )
    decoder = nn.Sequential(
        nn.Linear(16, 64 * 7 * 7), nn.ReLU(), nn.Unflatten(1, (64, 7, 7)),
        nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(32, 1, 4, 2, 1),
    )
    return encoder, decoder


def _data(shape, points):
    import numpy as np

    return (np.random.default_rng(0).random((points, *shape)) < 0.3).astype(np.float32)


def _flops(module, input_shape) -> int:
    """Multiply-adds x 2 of one forward pass of a Sequential of Linear/Conv layers."""
    import torch
    from torch import nn

    total, x = 0, torch.zeros(1, *input_shape)
    with torch.inference_mode():
        for layer in module:
            y = layer(x)
            if isinstance(layer, nn.Linear):
                total += 2 * layer.in_features * layer.out_features
            elif isinstance(layer, nn.Conv2d):
                total += 2 * y[0].numel() * layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
            elif isinstance(layer, nn.ConvTranspose2d):
                total += 2 * x[0].numel() * layer.out_channels * layer.kernel_size[0] * layer.kernel_size[1]
            x = y
    return total


# ---------------------------------------------------------------- what a child process measures


def child_vaeeval(workload: str, samples: int, points: int) -> dict:
    from vaeeval import evaluate, save_model
    from vaeeval.core import tuning

    tuning.keep_freed_memory()  # as the vaeeval command does

    encoder, decoder = _mlp_modules() if workload == "mlp" else _conv_modules()
    shape = [MLP["dims"]] if workload == "mlp" else [1, 28, 28]
    latent = MLP["latent"] if workload == "mlp" else 16
    with tempfile.TemporaryDirectory() as folder:
        model = save_model(Path(folder) / "m.safetensors", encoder, decoder, likelihood={"family": "bernoulli"},
                           input_shape=shape, latent_dim=latent)
    data = _data(shape, points)
    evaluate(model, data[:32], samples=128, seed=1)  # warm-up at the run's shapes: threads, allocator, kernels
    started = time.perf_counter()
    result = evaluate(model, data, samples=samples, seed=0)
    seconds = time.perf_counter() - started
    flops = points * _flops(encoder, shape) + points * samples * _flops(decoder, [latent])
    iwae_se = math.sqrt(float((result.points.iwae_stderr**2).sum())) / points
    return {"seconds": seconds, "flops": flops, "mean_log_px": result.summary.iwae.mean, "stderr": iwae_se}


def child_parts(samples: int, points: int) -> dict:
    """Where vaeeval's MLP time goes: seconds in the draws, the decoder, the likelihood, the statistics
    and k-hat (each stage timed around its call, best of 3 runs), the rest being q, p(z) and glue."""
    import collections
    import functools

    from vaeeval import evaluate, save_model
    from vaeeval.core import tuning
    from vaeeval.estimators.importance.evaluate import BatchEstimates, _SampleStatistics
    from vaeeval.format.likelihoods import BernoulliLikelihood
    from vaeeval.format.model import Model

    tuning.keep_freed_memory()
    evaluation = sys.modules["vaeeval.estimators.importance.evaluate"]
    spent: collections.Counter = collections.Counter()

    def timed(owner, name: str, stage: str) -> None:
        function = getattr(owner, name)

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[stage] += time.perf_counter() - started

        setattr(owner, name, wrapper)

    timed(evaluation, "standard_normal", "draws")
    timed(Model, "decode_through_head", "decoder")
    timed(BernoulliLikelihood, "log_prob_through_linear", "likelihood")
    timed(_SampleStatistics, "update", "statistics")
    timed(BatchEstimates, "part", "k-hat")
    encoder, decoder = _mlp_modules()
    with tempfile.TemporaryDirectory() as folder:
        model = save_model(Path(folder) / "m.safetensors", encoder, decoder, likelihood={"family": "bernoulli"},
                           input_shape=[MLP["dims"]], latent_dim=MLP["latent"])
    data = _data([MLP["dims"]], points)
    evaluate(model, data[:32], samples=128, seed=1)
    best: dict | None = None
    for _ in range(3):
        spent.clear()
        started = time.perf_counter()
        evaluate(model, data, samples=samples, seed=0)
        total = time.perf_counter() - started
        if best is None or total < best["seconds"]:
            best = {"seconds": total, **dict(spent), "rest": total - sum(spent.values())}
    return best


def child_products(samples: int, points: int, workload: str = "mlp") -> dict:
    """The floor under vaeeval's time: its loaded decoder alone, on as many latent rows, in its chunk size."""
    import torch

    from vaeeval import save_model
    from vaeeval.core import tuning
    from vaeeval.estimators.importance.evaluate import DEFAULT_BATCH_SIZE, chunk_size_for

    tuning.keep_freed_memory()  # as vaeeval's own run does
    encoder, decoder = _mlp_modules() if workload == "mlp" else _conv_modules()
    shape = [MLP["dims"]] if workload == "mlp" else [1, 28, 28]
    latent = MLP["latent"] if workload == "mlp" else 16
    with tempfile.TemporaryDirectory() as folder:
        model = save_model(Path(folder) / "m.safetensors", encoder, decoder, likelihood={"family": "bernoulli"},
                           input_shape=shape, latent_dim=latent)
    batch = min(DEFAULT_BATCH_SIZE, points)
    rows = batch * chunk_size_for(model, batch, samples, 2**40)
    latents = torch.randn(points * samples, latent).split(rows)
    with torch.inference_mode():
        model.decoder(latents[0])
        started = time.perf_counter()
        for z in latents:
            model.decoder(z)
        return {"seconds": time.perf_counter() - started}


def child_pythae(workload: str, samples: int, points: int, batch_size: int) -> dict:
    import torch
    from pythae.models import VAE, VAEConfig
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder

    encoder, decoder = _mlp_modules() if workload == "mlp" else _conv_modules()
    shape = (MLP["dims"],) if workload == "mlp" else (1, 28, 28)
    latent = MLP["latent"] if workload == "mlp" else 16

    class Encoder(BaseEncoder):
        def __init__(self):
            super().__init__()
            self.net = encoder

        def forward(self, x):
            out = self.net(x)
            return ModelOutput(embedding=out[:, :latent], log_covariance=out[:, latent:])

    class Decoder(BaseDecoder):
        def __init__(self):
            super().__init__()
            self.net = decoder

        def forward(self, z):
            return ModelOutput(reconstruction=torch.sigmoid(self.net(z)).reshape(-1, *shape))

    model = VAE(VAEConfig(input_dim=shape, latent_dim=latent, reconstruction_loss="bce"), encoder=Encoder(), decoder=Decoder())
    model.eval()
    data = torch.from_numpy(_data(shape, points))
    with torch.no_grad():
        model.get_nll(data[:4], n_samples=batch_size, batch_size=batch_size)  # a warm-up at its shapes too
    torch.manual_seed(0)
    started = time.perf_counter()
    with torch.no_grad():
        mean_log_px = float(model.get_nll(data, n_samples=samples, batch_size=batch_size))
    return {"seconds": time.perf_counter() - started, "mean_log_px": mean_log_px}


def child_peak() -> dict:
    """The machine's float32 GEMM rate: a 1024^3 product, the faster of torch's matmul (MKL) and
    the oneDNN product vaeeval's linear layers use (best of 10 each)."""
    import torch

    from vaeeval.format.layers import Linear

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    linear = Linear(1024, 1024, bias=False)
    rates = []
    for product in (lambda: a @ b, lambda: linear(a)):
        with torch.inference_mode():
            for _ in range(3):
                product()
            times = []
            for _ in range(10):
                started = time.perf_counter()
                product()
                times.append(time.perf_counter() - started)
        rates.append(2 * 1024**3 / min(times) / 1e9)
    return {"gflops": max(rates)}


def _cpu() -> dict:
    """The processor's name, torch's vector ISA and thread count: what the seconds depend on."""
    import torch

    name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"cpu": name, "isa": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def fixed_cost(repeats: int) -> dict:
    """Seconds of the whole command on one point at K = 1, and of its imports alone (best of the alternating runs)."""
    models = Path(__file__).resolve().parent.parent / "sample_models"
    command = [sys.executable, "-m", "vaeeval", "elbo", str(models / "digits_bernoulli.safetensors"),
               str(models / "digits_binary_test.npy"), "-k", "1", "--limit", "1", "--json"]
    imports = "import torch, numpy, safetensors, click, rich"
    argvs = {
        "command": command,
        "imports": [sys.executable, "-c", imports],
        # as vaeeval's __main__ imports: the garbage collector paused meanwhile
        "imports_collector_paused": [sys.executable, "-c", f"import gc; gc.disable(); {imports}; gc.freeze(); gc.enable()"],
    }
    cached = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
    environments = dict.fromkeys(argvs, cached)
    argvs["source_compiled"] = command  # every start compiles vaeeval's modules from source
    environments["source_compiled"] = {**cached, "PYTHONDONTWRITEBYTECODE": "1"}
    times: dict[str, list[float]] = {name: [] for name in argvs}
    for attempt in range(repeats + 4):
        for name, argv in argvs.items():
            started = time.perf_counter()
            subprocess.run(argv, capture_output=True, check=True, env=environments[name])
            if attempt:  # the first run writes the bytecode cache
                times[name].append(time.perf_counter() - started)
    seconds = {f"{name}_seconds": min(found) for name, found in times.items()}
    return {**seconds, "beyond_imports_seconds": seconds["command_seconds"] - seconds["imports_collector_paused_seconds"]}


# Machine-independent figures: (name, how to read it from a result, True when higher is better).
RATIOS = (
    ("vaeeval / its decoder products alone", lambda r: r["mlp"]["contenders"]["vaeeval"]["seconds"]
     / r["mlp"]["decoder_products_seconds"], False),
    ("elbo: share of peak GEMM", lambda r: r["mlp"]["contenders"]["vaeeval"]["share_of_peak"], True),
    ("elbo: speed-up vs pythae get_nll (batch 100)", lambda r: r["mlp"]["speedup_vs_pythae_100"], True),
    ("elbo: speed-up vs pythae get_nll (batch 1000)", lambda r: r["mlp"]["speedup_vs_pythae_1000"], True),
    ("conv: share of peak GEMM", lambda r: r["conv"]["share_of_peak"], True),
    ("ais: speed-up vs plain batched AIS", lambda r: r["ais"]["speedup_vs_plain"], True),
    ("ais: share of peak GEMM", lambda r: r["ais"]["contenders"]["vaeeval"]["share_of_peak"], True),
)
WORSE_BY = 0.10


def ratios(result: dict) -> dict[str, float]:
    """The machine-independent figures this result has."""
    found = {}
    for name, read, _ in RATIOS:
        try:
            found[name] = read(result)
        except KeyError:  # a workload this run skipped
            continue
    return found


def against_baseline(result: dict, baseline: dict) -> tuple[str, bool]:
    """A table of each ratio now and in the baseline, and whether none got worse by more than 10%."""
    now, then = ratios(result), ratios(baseline)
    higher_is_better = {name: higher for name, _, higher in RATIOS}
    rows = [f"against the baseline (measured on {baseline.get('machine', {}).get('cpu', '?')}):",
            f"{'':48}{'baseline':>10}{'now':>10}{'change':>9}"]
    fine = True
    for name in now:
        if name not in then:
            continue
        change = now[name] / then[name] - 1
        worse = -change if higher_is_better[name] else change
        verdict = "WORSE by more than 10%" if worse > WORSE_BY else ""
        fine &= worse <= WORSE_BY
        rows.append(f"{name:48}{then[name]:10.3f}{now[name]:10.3f}{change:+9.1%}  {verdict}")
    rows.append("no ratio got worse by more than 10%" if fine else "SOME RATIO GOT WORSE BY MORE THAN 10%")
    return "\n".join(rows), fine


def _child(arguments: list[str]) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", *arguments], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the orchestra


def measure(repeats: int, conv: bool, ais: bool = True) -> dict:
    peak = max(_child(["peak"])["gflops"] for _ in range(3))
    runs: dict[str, list[dict]] = {"vaeeval": [], "pythae_100": [], "pythae_1000": []}
    products = []
    for _ in range(repeats):  # alternating, so drifts in machine load hit every contender alike
        products.append(_child(["products", str(SAMPLES), str(POINTS)])["seconds"])
        runs["vaeeval"].append(_child(["vaeeval", "mlp", str(SAMPLES), str(POINTS)]))
        runs["pythae_100"].append(_child(["pythae", "mlp", str(SAMPLES), str(POINTS), "100"]))
        runs["pythae_1000"].append(_child(["pythae", "mlp", str(SAMPLES), str(POINTS), "1000"]))
    best = {name: min(r["seconds"] for r in results) for name, results in runs.items()}  # best of the runs
    mine = runs["vaeeval"][0]
    flops = mine["flops"]
    parts = _child(["parts", str(SAMPLES), str(POINTS)])
    rss = {str(k): statistics.median(_child(["vaeeval", "mlp", str(k), "20"])["rss_mb"] for _ in range(2)) for k in (500, 5000)}
    result = {
        "machine": {**_cpu(), "peak_gemm_gflops": peak},
        "fixed_cost": fixed_cost(repeats),
        "mlp": {
            "points": POINTS,
            "samples": SAMPLES,
            "flops": flops,
            "limit_seconds": flops / (peak * 1e9),
            "decoder_products_seconds": min(products),
            "parts_seconds": {k: v for k, v in parts.items() if k != "rss_mb"},
            "contenders": {
                name: {
                    "seconds": best[name],
                    "points_x_samples_per_second": POINTS * SAMPLES / best[name],
                    "effective_gflops": flops / best[name] / 1e9,
                    "share_of_peak": flops / best[name] / 1e9 / peak,
                    "peak_rss_mb": statistics.median(r["rss_mb"] for r in runs[name]),
                    "mean_log_px": statistics.median(r["mean_log_px"] for r in runs[name]),
                }
                for name in runs
            },
            "speedup_vs_pythae_100": best["pythae_100"] / best["vaeeval"],
            "speedup_vs_pythae_1000": best["pythae_1000"] / best["vaeeval"],
            "agreement": {  # both estimate the same log p(x) with independent noise of about the same size
                "vaeeval_minus_pythae": mine["mean_log_px"] - runs["pythae_100"][0]["mean_log_px"],
                "stderr_of_difference": math.sqrt(2) * mine["stderr"],
            },
            "rss_mb_at_samples": rss,
            "rss_growth_500_to_5000": rss["5000"] / rss["500"] - 1,
        },
    }
    if conv:
        times, decoder_alone = [], []
        for _ in range(repeats):
            times.append(_child(["vaeeval", "conv", str(CONV_SAMPLES), str(CONV_POINTS)]))
            decoder_alone.append(_child(["products", str(CONV_SAMPLES), str(CONV_POINTS), "conv"])["seconds"])
        seconds = min(t["seconds"] for t in times)
        flops, decoder_seconds = times[0]["flops"], min(decoder_alone)
        decoder_flops = CONV_POINTS * CONV_SAMPLES * _flops(_conv_modules()[1], [16])
        result["conv"] = {
            "points": CONV_POINTS,
            "samples": CONV_SAMPLES,
            "seconds": seconds,
            "decoder_products_seconds": decoder_seconds,
            "decoder_share_of_peak": decoder_flops / decoder_seconds / 1e9 / peak,
            "points_x_samples_per_second": CONV_POINTS * CONV_SAMPLES / seconds,
            "effective_gflops": flops / seconds / 1e9,
            "share_of_peak": flops / seconds / 1e9 / peak,
            "peak_rss_mb": statistics.median(t["rss_mb"] for t in times),
        }
    if ais:
        import ais_bench

        result["ais"] = ais_bench.measure(repeats)
    return result


def render(result: dict) -> str:
    mlp = result["mlp"]
    machine = result["machine"]
    rows = [
        f"{machine['cpu']}, torch {machine['torch']} ({machine['isa']}), {machine['threads']} threads",
        f"peak float32 GEMM (1024^3 matmul): {machine['peak_gemm_gflops']:.1f} GFLOP/s",
        f"MLP 784-400-20 Bernoulli, {mlp['points']} points x K = {mlp['samples']}: limit {mlp['limit_seconds']:.3f} s; "
        f"vaeeval's decoder products alone {mlp['decoder_products_seconds']:.3f} s",
        "",
        f"{'':14}{'seconds':>9}{'points*K/s':>12}{'GFLOP/s':>9}{'of peak':>9}{'RSS MB':>8}{'mean log p(x)':>15}",
    ]
    for name, c in mlp["contenders"].items():
        rows.append(
            f"{name:14}{c['seconds']:9.3f}{c['points_x_samples_per_second']:12.0f}{c['effective_gflops']:9.1f}"
            f"{c['share_of_peak']:9.0%}{c['peak_rss_mb']:8.0f}{c['mean_log_px']:15.3f}"
        )
    parts = mlp["parts_seconds"]
    rows.append("where vaeeval's time goes (best of 3, seconds): " + ", ".join(
        f"{name} {seconds:.3f}" for name, seconds in parts.items() if name != "seconds"))
    agreement = mlp["agreement"]
    rows += [
        "",
        f"speed-up vs pythae get_nll: x{mlp['speedup_vs_pythae_100']:.1f} (batch 100), x{mlp['speedup_vs_pythae_1000']:.1f} (batch 1000)",
        f"vaeeval - pythae mean log p(x): {agreement['vaeeval_minus_pythae']:+.3f} "
        f"(Monte Carlo standard error of the difference {agreement['stderr_of_difference']:.3f})",
        f"vaeeval peak RSS: {mlp['rss_mb_at_samples']['500']:.0f} MB at K = 500, {mlp['rss_mb_at_samples']['5000']:.0f} MB at K = 5000"
        f" ({mlp['rss_growth_500_to_5000']:+.1%})",
    ]
    if "conv" in result:
        conv = result["conv"]
        rows.append(
            f"conv VAE 28x28, {conv['points']} points x K = {conv['samples']}: {conv['seconds']:.2f} s, "
            f"{conv['points_x_samples_per_second']:.0f} points*K/s, {conv['effective_gflops']:.1f} GFLOP/s "
            f"({conv['share_of_peak']:.0%} of peak), {conv['peak_rss_mb']:.0f} MB; its decoder alone "
            f"{conv['decoder_products_seconds']:.2f} s ({conv['decoder_share_of_peak']:.0%} of peak)"
        )
    cost = result["fixed_cost"]
    rows.append(f"fixed cost: the command on one point {cost['command_seconds']:.2f} s; its imports alone "
                f"{cost['imports_seconds']:.2f} s ({cost['imports_collector_paused_seconds']:.2f} s with the garbage "
                f"collector paused, as vaeeval imports them): {cost['beyond_imports_seconds']:.2f} s beyond them "
                f"({cost['source_compiled_seconds']:.2f} s for the command when no bytecode may be cached)")
    if "ais" in result:
        import ais_bench

        rows += ["", ais_bench.render(result["ais"])]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per contender (the best is kept)")
    parser.add_argument("--no-conv", action="store_true", help="skip the convolutional workload")
    parser.add_argument("--no-ais", action="store_true", help="skip the AIS workload (ais_bench.py)")
    parser.add_argument("--baseline", type=Path, help="a --json result to compare the ratios with (exit 1 if one is >10%% worse)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "peak":
            out = child_peak()
        elif kind == "parts":
            out = child_parts(int(rest[0]), int(rest[1]))
        elif kind == "products":
            out = child_products(int(rest[0]), int(rest[1]), *rest[2:])
        elif kind == "vaeeval":
            out = child_vaeeval(rest[0], int(rest[1]), int(rest[2]))
        else:
            out = child_pythae(rest[0], int(rest[1]), int(rest[2]), int(rest[3]))
        out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(out))
        return
    result = measure(args.repeats, not args.no_conv, not args.no_ais)
    print(json.dumps(result, indent=2) if args.json else render(result))
    if args.baseline is not None:
        report, fine = against_baseline(result, json.loads(args.baseline.read_text()))
        print(report, file=sys.stderr if args.json else sys.stdout)
        if not fine:
            sys.exit(1)


if __name__ == "__main__":
    main()
