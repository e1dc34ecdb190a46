"""Train the shipped sample models on scikit-learn's 8x8 digits, and save their test data.

Makes, in the output folder (default: this script's folder):

* ``digits_bernoulli.safetensors`` -- Bernoulli decoder (logits) on the digits
  binarized at 8 (``images >= 8``);
* ``digits_gaussian.safetensors`` -- Gaussian decoder (means) with one learned
  scalar log-sigma, on the grey digits ``images / 16`` (17 levels k/16);
* ``digits_continuous_bernoulli.safetensors`` -- continuous Bernoulli decoder
  (logits) on the grey digits;
* ``digits_categorical.safetensors`` -- categorical decoder over the 17 grey
  levels (17 blocks of 64 logits) on the grey digits;
* ``digits_binary_test.npy`` and ``digits_grey_test.npy`` -- the held-out test
  points of each version, float32 ``[297, 64]``;
* ``digits_grey_valid.npy`` -- the 200 grey validation points, float32 ``[200, 64]``:
  held-out data to fit a decoder's sigma on (``vaeeval calibrate``) before scoring
  the test points. ``--data-only`` writes the data files alone, without training.

All have latent_dim 8, encoder 64-128-128-16 (8 means, then 8 log-variances)
and decoder 8-128-128-(P x 64), ReLU in between. The split is fixed:
``np.random.default_rng(0).permutation(1797)``: the first 1300 train, the next 200
validate, the last 297 are the test points.
Training maximizes the single-sample reparameterized ELBO (analytic KL to N(0, I),
linear KL warm-up over 50 epochs) with Adam (lr 1e-3, minibatches of 100), and is
reproducible on the CPU (seed 0 per model, one thread). Training stops early: 200
of the 1500 training points are held back for validation, and the weights kept are
those of the epoch with the best validation ELBO (checked every 25 epochs, up to
``max_epochs``); the 297 test points are never used for any choice. The Gaussian
model needs this most: past its best epoch its learned sigma keeps shrinking on
the training set and the held-out ELBO falls.

Needs the ``train`` extra (scikit-learn, for the data)::

    pip install -e '.[train]'
    python sample_models/train.py [--out DIR]

From a source checkout it also runs without installing vaeeval: it then imports
the checkout's ``vaeeval`` package.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

try:
    from vaeeval import save_model
except ImportError:  # run from a source checkout without installing: use the checkout's vaeeval
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from vaeeval import save_model
from vaeeval.format.likelihoods.continuous_bernoulli import continuous_bernoulli_log_norm

LATENT_DIM = 8
HIDDEN = 128
INPUT_DIM = 64
GREY_LEVELS = 17  # the digits' pixels are 0..16
TRAIN_POINTS = 1300
VALIDATION_POINTS = 200
CHECK_EVERY = 25  # epochs between validation checks
BATCH_SIZE = 100
LEARNING_RATE = 1e-3
WARMUP_EPOCHS = 50
REPORT_EVERY = 100
MONITOR_SAMPLES = 10  # ELBO samples per point when printing progress


# ---------------------------------------------------------------- data


def digit_splits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The fixed train/validation/test split of the raw digits (values 0..16): 1300, 200 and 297 points."""
    images = load_digits().data.astype(np.float64)
    perm = np.random.default_rng(0).permutation(len(images))
    cut = TRAIN_POINTS + VALIDATION_POINTS
    return images[perm[:TRAIN_POINTS]], images[perm[TRAIN_POINTS:cut]], images[perm[cut:]]


def binarize(images: np.ndarray) -> np.ndarray:
    """``images >= 8`` as float32 {0, 1}."""
    return (images >= 8).astype(np.float32)


def grey(images: np.ndarray) -> np.ndarray:
    """``images / 16`` as float32 in [0, 1], on the 17 levels k/16."""
    return (images / 16).astype(np.float32)


# ---------------------------------------------------------------- model


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers of the given widths with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for index, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        if index:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


def make_encoder() -> nn.Sequential:
    """x [B, 64] -> [B, 16]: 8 means of q(z|x), then 8 log-variances."""
    return mlp([INPUT_DIM, HIDDEN, HIDDEN, 2 * LATENT_DIM])


def make_decoder(params_per_pixel: int = 1) -> nn.Sequential:
    """z [B, 8] -> [B, P * 64]: P likelihood parameters per pixel, as P blocks of 64."""
    return mlp([LATENT_DIM, HIDDEN, HIDDEN, params_per_pixel * INPUT_DIM])


class BernoulliNLL(nn.Module):
    """-log p(x|z) for Bernoulli pixels; the decoder outputs logits."""

    params_per_pixel = 1

    def forward(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)

    def spec(self) -> dict[str, Any]:
        return {"family": "bernoulli"}


class GaussianNLL(nn.Module):
    """-log p(x|z) for Normal(mean, sigma) pixels, one learned scalar log sigma; the decoder outputs means."""

    params_per_pixel = 1

    def __init__(self) -> None:
        super().__init__()
        self.log_sigma = nn.Parameter(torch.tensor(0.0))

    def forward(self, mean: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        z = (x - mean) / self.log_sigma.exp()
        return (0.5 * z**2 + self.log_sigma + 0.5 * math.log(2 * math.pi)).sum(-1)

    def spec(self) -> dict[str, Any]:
        return {"family": "gaussian", "log_sigma": self.log_sigma.detach()}


class ContinuousBernoulliNLL(nn.Module):
    """-log p(x|z) for continuous Bernoulli pixels on [0, 1]; the decoder outputs logits."""

    params_per_pixel = 1

    def forward(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
        return (bce - continuous_bernoulli_log_norm(logits)).sum(-1)

    def spec(self) -> dict[str, Any]:
        return {"family": "continuous_bernoulli"}


class CategoricalNLL(nn.Module):
    """-log p(x|z) for pixels taking one of 17 grey levels; the decoder outputs 17 blocks of 64 logits."""

    params_per_pixel = GREY_LEVELS

    def forward(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        levels = torch.round(x * (GREY_LEVELS - 1)).long()
        blocks = logits.reshape(len(x), GREY_LEVELS, INPUT_DIM)
        return F.cross_entropy(blocks, levels, reduction="none").sum(-1)

    def spec(self) -> dict[str, Any]:
        return {"family": "categorical", "levels": GREY_LEVELS}


@dataclass(frozen=True)
class SampleModel:
    """One shipped model: its files, data version, likelihood and training length."""

    name: str
    test_file: str
    prepare: Callable[[np.ndarray], np.ndarray]
    nll: Callable[[], nn.Module]
    data: dict[str, Any]
    data_words: str
    max_epochs: int  # the weights kept are those of the best validation ELBO up to here
    weight_decay: float  # Adam's L2 penalty


SAMPLE_MODELS = (
    SampleModel(
        name="digits_bernoulli",
        test_file="digits_binary_test.npy",
        prepare=binarize,
        nll=BernoulliNLL,
        data={"domain": "binary"},
        data_words="Bernoulli decoder on binarized 8x8 digits (pixel >= 8 of 16)",
        max_epochs=1000,
        weight_decay=3e-3,  # without it the held-out ELBO peaks early and then falls
    ),
    SampleModel(
        name="digits_gaussian",
        test_file="digits_grey_test.npy",
        prepare=grey,
        nll=GaussianNLL,
        data={"domain": "discrete", "levels": 17},
        data_words="Gaussian decoder with one learned sigma on grey 8x8 digits (pixel / 16)",
        max_epochs=600,
        weight_decay=0.0,  # weight decay only lowered the held-out ELBO
    ),
    SampleModel(
        name="digits_continuous_bernoulli",
        test_file="digits_grey_test.npy",
        prepare=grey,
        nll=ContinuousBernoulliNLL,
        data={"domain": "discrete", "levels": GREY_LEVELS},
        data_words="continuous Bernoulli decoder on grey 8x8 digits (pixel / 16)",
        max_epochs=1000,
        weight_decay=0.0,
    ),
    SampleModel(
        name="digits_categorical",
        test_file="digits_grey_test.npy",
        prepare=grey,
        nll=CategoricalNLL,
        data={"domain": "discrete", "levels": GREY_LEVELS},
        data_words="categorical decoder over the 17 grey levels of 8x8 digits (pixel / 16)",
        max_epochs=1000,
        weight_decay=1e-3,
    ),
)


# ---------------------------------------------------------------- training


def elbo(
    encoder: nn.Module,
    decoder: nn.Module,
    nll: nn.Module,
    x: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-sample reparameterized estimate per point: ``(log p(x|z), KL(q(z|x) || N(0, I)))``, ``[B]`` each."""
    mean, log_var = encoder(x).chunk(2, dim=-1)
    eps = torch.randn(mean.shape, generator=generator)
    z = mean + (0.5 * log_var).exp() * eps
    kl = 0.5 * (mean**2 + log_var.exp() - 1 - log_var).sum(-1)
    return -nll(decoder(z), x), kl


@torch.no_grad()
def mean_elbo(encoder: nn.Module, decoder: nn.Module, nll: nn.Module, x: torch.Tensor) -> float:
    """Mean ELBO over ``x``, each point's averaged over ``MONITOR_SAMPLES`` samples of a fixed-seed generator."""
    generator = torch.Generator().manual_seed(1)
    total = 0.0
    for _ in range(MONITOR_SAMPLES):
        log_px_z, kl = elbo(encoder, decoder, nll, x, generator)
        total += (log_px_z - kl).mean().item()
    return total / MONITOR_SAMPLES


def train(
    encoder: nn.Module,
    decoder: nn.Module,
    nll: nn.Module,
    x_train: torch.Tensor,
    x_valid: torch.Tensor,
    max_epochs: int,
    weight_decay: float = 0.0,
) -> tuple[int, float]:
    """Adam on the negative ELBO (KL weight ramped 0 -> 1 over ``WARMUP_EPOCHS``), stopped early.

    Leaves the modules at the epoch with the best validation ELBO and returns that epoch and ELBO.
    """
    modules = nn.ModuleList([encoder, decoder, nll])
    optimizer = torch.optim.Adam(modules.parameters(), lr=LEARNING_RATE, weight_decay=weight_decay)
    best_epoch, best_elbo, best_state = 0, -math.inf, copy.deepcopy(modules.state_dict())
    for epoch in range(1, max_epochs + 1):
        beta = min(1.0, epoch / WARMUP_EPOCHS)
        for batch in torch.randperm(len(x_train)).split(BATCH_SIZE):
            log_px_z, kl = elbo(encoder, decoder, nll, x_train[batch])
            loss = (beta * kl - log_px_z).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if epoch % CHECK_EVERY == 0 and epoch >= WARMUP_EPOCHS:
            valid_elbo = mean_elbo(encoder, decoder, nll, x_valid)
            if valid_elbo > best_elbo:
                best_epoch, best_elbo, best_state = epoch, valid_elbo, copy.deepcopy(modules.state_dict())
            if epoch % REPORT_EVERY == 0:
                train_elbo = mean_elbo(encoder, decoder, nll, x_train)
                print(f"  epoch {epoch:5d}  train ELBO {train_elbo:9.3f}  validation ELBO {valid_elbo:9.3f}", flush=True)
    modules.load_state_dict(best_state)
    return best_epoch, best_elbo


def make_sample_model(
    spec: SampleModel, splits: tuple[np.ndarray, np.ndarray, np.ndarray], out: Path
) -> None:
    """Train one model from scratch and write it and its test data to ``out``."""
    x_train, x_valid, x_test = (torch.from_numpy(spec.prepare(images)) for images in splits)
    write_data(spec, splits, out)
    nll = spec.nll()
    encoder, decoder = make_encoder(), make_decoder(nll.params_per_pixel)
    print(f"{spec.name}: up to {spec.max_epochs} epochs on {len(x_train)} points, weight decay {spec.weight_decay:g}")
    started = time.perf_counter()
    epoch, valid_elbo = train(encoder, decoder, nll, x_train, x_valid, spec.max_epochs, spec.weight_decay)
    test_elbo = mean_elbo(encoder, decoder, nll, x_test)
    print(
        f"  kept epoch {epoch}: validation ELBO {valid_elbo:.3f}, test ELBO {test_elbo:.3f} nats "
        f"({time.perf_counter() - started:.1f} s)",
        flush=True,
    )
    description = (
        f"MLP VAE, latent_dim {LATENT_DIM}, {spec.data_words}; epoch {epoch} of {spec.max_epochs} "
        f"(best validation ELBO); test data {spec.test_file}; reproduce: python sample_models/train.py"
    )
    save_model(
        out / f"{spec.name}.safetensors",
        encoder,
        decoder,
        likelihood=nll.spec(),
        input_shape=[INPUT_DIM],
        latent_dim=LATENT_DIM,
        data=spec.data,
        description=description,
    )
    for path in (out / f"{spec.name}.safetensors", out / spec.test_file):
        path.chmod(0o644)


def data_files(spec: SampleModel, splits: tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    """The data files a sample model comes with: its test points, and the grey validation points."""
    _, valid, test = (spec.prepare(images) for images in splits)
    files = {spec.test_file: test}
    if spec.test_file == "digits_grey_test.npy":
        files["digits_grey_valid.npy"] = valid
    return files


def write_data(spec: SampleModel, splits: tuple[np.ndarray, np.ndarray, np.ndarray], out: Path) -> None:
    for name, array in data_files(spec, splits).items():
        np.save(out / name, array)
        (out / name).chmod(0o644)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output folder")
    parser.add_argument("--data-only", action="store_true", help="write the data files only, without training")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    splits = digit_splits()
    if args.data_only:
        for spec in SAMPLE_MODELS:
            write_data(spec, splits, args.out)
        return
    torch.set_num_threads(1)  # one thread: the same numbers on every run
    for spec in SAMPLE_MODELS:
        torch.manual_seed(0)  # per model, so each can be reproduced on its own
        make_sample_model(spec, splits, args.out)


if __name__ == "__main__":
    main()
