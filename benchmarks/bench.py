"""Speed of vaeeval beside its peer (pythae's ``VAE.get_nll``) and the machine's matmul limit.

Run by hand, not in CI (needs ``pip install pythae``; about ten minutes on 2 cores)::

    python benchmarks/bench.py            # a table
    python benchmarks/bench.py --json     # the same numbers as JSON, to compare across commits

Every measurement runs in a fresh child process, so each reports its own peak RSS,
and times only the computation (not interpreter start-up, imports or model
building). The runs alternate (vaeeval, pythae at batch 100, pythae at batch
1000, ...) and each figure is the median of ``--repeats`` runs.

Workloads:

* ``mlp``: the MNIST-size MLP VAE 784-400-20 (ReLU, Bernoulli), random weights,
  synthetic binary data, K = 1000, 100 points: vaeeval, pythae at batch 100 and
  at batch 1000 (the same weights wrapped in pythae's BaseEncoder/BaseDecoder),
  and vaeeval's peak RSS at K = 500 and K = 5000.
* ``conv``: a convolutional VAE on 28x28 images, K = 5000, 20 points.

Beside the limit, the run times vaeeval's own decoder alone on the same number of
latent rows (its matrix products and ReLU, no sampling, likelihood or statistics):
the floor that vaeeval's time is measured against.

The limit: the FLOPs of every encoder and decoder pass vaeeval makes (one
encoder pass per point, one decoder pass per sample), divided by the peak
float32 GEMM rate measured in the same run (a 1024^3 matmul).
"""

from __future__ import annotations

import argparse
import json
import math
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
    from vaeeval import evaluate, save_model, tuning

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


def child_products(samples: int, points: int) -> dict:
    """The floor under vaeeval's time: its loaded decoder alone, on as many latent rows, in its chunk size."""
    import torch

    from vaeeval import save_model
    from vaeeval.evaluate import DEFAULT_BATCH_SIZE, chunk_size_for

    encoder, decoder = _mlp_modules()
    with tempfile.TemporaryDirectory() as folder:
        model = save_model(Path(folder) / "m.safetensors", encoder, decoder, likelihood={"family": "bernoulli"},
                           input_shape=[MLP["dims"]], latent_dim=MLP["latent"])
    rows = DEFAULT_BATCH_SIZE * chunk_size_for(model, DEFAULT_BATCH_SIZE, samples, 2**40)
    latents = torch.randn(points * samples, MLP["latent"]).split(rows)
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
    import torch

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        started = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - started)
    return {"gflops": 2 * 1024**3 / statistics.median(times) / 1e9}


def _child(arguments: list[str]) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", *arguments], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the orchestra


def measure(repeats: int, conv: bool) -> dict:
    import torch

    peak = statistics.median(_child(["peak"])["gflops"] for _ in range(3))
    runs: dict[str, list[dict]] = {"vaeeval": [], "pythae_100": [], "pythae_1000": []}
    products = []
    for _ in range(repeats):  # alternating, so drifts in machine load hit every contender alike
        products.append(_child(["products", str(SAMPLES), str(POINTS)])["seconds"])
        runs["vaeeval"].append(_child(["vaeeval", "mlp", str(SAMPLES), str(POINTS)]))
        runs["pythae_100"].append(_child(["pythae", "mlp", str(SAMPLES), str(POINTS), "100"]))
        runs["pythae_1000"].append(_child(["pythae", "mlp", str(SAMPLES), str(POINTS), "1000"]))
    median = {name: statistics.median(r["seconds"] for r in results) for name, results in runs.items()}
    mine = runs["vaeeval"][0]
    flops = mine["flops"]
    rss = {k: statistics.median(_child(["vaeeval", "mlp", str(k), "20"])["rss_mb"] for _ in range(2)) for k in (500, 5000)}
    result = {
        "machine": {"threads": torch.get_num_threads(), "peak_gemm_gflops": peak},
        "mlp": {
            "points": POINTS,
            "samples": SAMPLES,
            "flops": flops,
            "limit_seconds": flops / (peak * 1e9),
            "decoder_products_seconds": statistics.median(products),
            "contenders": {
                name: {
                    "seconds": median[name],
                    "points_x_samples_per_second": POINTS * SAMPLES / median[name],
                    "effective_gflops": flops / median[name] / 1e9,
                    "share_of_peak": flops / median[name] / 1e9 / peak,
                    "peak_rss_mb": statistics.median(r["rss_mb"] for r in runs[name]),
                    "mean_log_px": statistics.median(r["mean_log_px"] for r in runs[name]),
                }
                for name in runs
            },
            "speedup_vs_pythae_100": median["pythae_100"] / median["vaeeval"],
            "speedup_vs_pythae_1000": median["pythae_1000"] / median["vaeeval"],
            "agreement": {  # both estimate the same log p(x) with independent noise of about the same size
                "vaeeval_minus_pythae": mine["mean_log_px"] - runs["pythae_100"][0]["mean_log_px"],
                "stderr_of_difference": math.sqrt(2) * mine["stderr"],
            },
            "rss_mb_at_samples": rss,
            "rss_growth_500_to_5000": rss[5000] / rss[500] - 1,
        },
    }
    if conv:
        times = [_child(["vaeeval", "conv", str(CONV_SAMPLES), str(CONV_POINTS)]) for _ in range(repeats)]
        seconds = statistics.median(t["seconds"] for t in times)
        result["conv"] = {
            "points": CONV_POINTS,
            "samples": CONV_SAMPLES,
            "seconds": seconds,
            "points_x_samples_per_second": CONV_POINTS * CONV_SAMPLES / seconds,
            "effective_gflops": times[0]["flops"] / seconds / 1e9,
            "share_of_peak": times[0]["flops"] / seconds / 1e9 / peak,
            "peak_rss_mb": statistics.median(t["rss_mb"] for t in times),
        }
    return result


def render(result: dict) -> str:
    mlp = result["mlp"]
    rows = [
        f"peak float32 GEMM (1024^3 matmul): {result['machine']['peak_gemm_gflops']:.1f} GFLOP/s",
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
    agreement = mlp["agreement"]
    rows += [
        "",
        f"speed-up vs pythae get_nll: x{mlp['speedup_vs_pythae_100']:.1f} (batch 100), x{mlp['speedup_vs_pythae_1000']:.1f} (batch 1000)",
        f"vaeeval - pythae mean log p(x): {agreement['vaeeval_minus_pythae']:+.3f} "
        f"(Monte Carlo standard error of the difference {agreement['stderr_of_difference']:.3f})",
        f"vaeeval peak RSS: {mlp['rss_mb_at_samples'][500]:.0f} MB at K = 500, {mlp['rss_mb_at_samples'][5000]:.0f} MB at K = 5000"
        f" ({mlp['rss_growth_500_to_5000']:+.1%})",
    ]
    if "conv" in result:
        conv = result["conv"]
        rows.append(
            f"conv VAE 28x28, {conv['points']} points x K = {conv['samples']}: {conv['seconds']:.2f} s, "
            f"{conv['points_x_samples_per_second']:.0f} points*K/s, {conv['effective_gflops']:.1f} GFLOP/s "
            f"({conv['share_of_peak']:.0%} of peak), {conv['peak_rss_mb']:.0f} MB"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per contender (median)")
    parser.add_argument("--no-conv", action="store_true", help="skip the convolutional workload")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "peak":
            out = child_peak()
        elif kind == "products":
            out = child_products(int(rest[0]), int(rest[1]))
        elif kind == "vaeeval":
            out = child_vaeeval(rest[0], int(rest[1]), int(rest[2]))
        else:
            out = child_pythae(rest[0], int(rest[1]), int(rest[2]), int(rest[3]))
        out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(out))
        return
    result = measure(args.repeats, not args.no_conv)
    print(json.dumps(result, indent=2) if args.json else render(result))


if __name__ == "__main__":
    main()
