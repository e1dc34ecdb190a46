"""vaeeval.adapters.pythae: pythae models trained here on the 8x8 digits, scored against pythae's own ``get_nll``.

Four models (VAE and IWAE and VAMP with a Bernoulli decoder on binarized digits, a VAE
with a unit-variance Gaussian decoder on grey values) are trained once per session
with pythae's ``TrainingPipeline`` and read back with ``AutoModel.load_from_folder``,
as a user's ``load.py`` would. Three kinds of check:

* the same draws as ``get_nll``: every density and constant agrees to float32 rounding;
* independent draws at the same K: IWAE from the protocol's distributions (here, and
  through the ``vaeeval elbo --arch`` command) within Monte Carlo error of ``get_nll``;
* the adapter's shape: state-dict keys kept, VAMP's prior equal to ``_log_p_z``, every
  pythae model either read or refused in one line naming its class.

``get_nll`` quirks this file works around: it returns the MEAN log p(x) over the data it
is given (called per point below when per-point values are needed); it draws
``batch_size`` samples, not ``n_samples``, when ``n_samples <= batch_size`` (both are K
here); it leaves the model's train/eval mode and gradients as they are; VAMP's prints a
running mean to stdout.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from pythae import models as pythae_models
from pythae.models import IWAE, VAE, VAMP, AutoModel, IWAEConfig, VAEConfig, VAMPConfig
from pythae.pipelines import TrainingPipeline
from pythae.trainers import BaseTrainerConfig
from pythae.trainers.base_trainer import base_trainer
from pythae.trainers.training_callbacks import TrainingCallback
from safetensors.torch import load_file, save_file
from sklearn.datasets import load_digits
from torch import nn

from vaeeval.adapters.pythae import PRIORS, REFUSED, wrap
from vaeeval.cli import main

SHAPE = {"input_dim": (1, 8, 8), "latent_dim": 4}
TRAIN = 1600  # digits 0..1599 train the models; the next EVALUATED are scored
EVALUATED = 100
K = 1000
Z = 4.0  # standard errors allowed between two independent estimates
SEEDS = 3  # get_nll runs averaged: its side of a comparison has 1/SEEDS of one run's variance



def _readme_load_py() -> str:
    """The README's three-line ``load.py`` for pythae models, its folder a ``{folder!r}`` to fill: the tests run the documented code."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### pythae models", 1)[1].split("\n## ", 1)[0]
    load_py = re.findall(r"```python\n(.*?)```", section, re.S)[1]
    assert '"my_model/final_model"' in load_py and "{" not in load_py
    return load_py.replace('"my_model/final_model"', "{folder!r}")


LOAD_PY = _readme_load_py()


@dataclass(frozen=True)
class Trained:
    """A pythae model after training, wrapped, with the data it is scored on and ``get_nll``'s answer."""

    model: nn.Module  # read back from ``folder`` and wrapped
    folder: Path  # pythae's final_model folder
    data: np.ndarray  # [EVALUATED, 8, 8] float32: binary for bce, grey for mse
    get_nll: float  # pythae's mean log p(x) over ``data`` at K samples, averaged over SEEDS runs

    @property
    def x(self) -> torch.Tensor:
        return torch.from_numpy(self.data)


def digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 digits as [N, 8, 8] float32: grey values in [0, 1], and binarized at 0.5."""
    grey = (load_digits().data.astype(np.float32) / 16).reshape(-1, 8, 8)
    return grey, (grey > 0.5).astype(np.float32)


MODELS: dict[str, tuple[Callable[[], nn.Module], bool]] = {  # name -> (untrained model, on binary data)
    "vae_bce": (lambda: VAE(VAEConfig(**SHAPE, reconstruction_loss="bce")), True),
    "iwae_bce": (lambda: IWAE(IWAEConfig(**SHAPE, reconstruction_loss="bce", number_samples=5)), True),
    "vamp_bce": (lambda: VAMP(VAMPConfig(**SHAPE, reconstruction_loss="bce", number_components=10)), True),
    "vae_mse": (lambda: VAE(VAEConfig(**SHAPE, reconstruction_loss="mse")), False),
}
BERNOULLI = [name for name in MODELS if MODELS[name][1]]


class _NoProgressBar(TrainingCallback):
    """Stands in for pythae's per-epoch tqdm bar."""


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One torch thread: these matrices are too small to share, and a second thread waiting for a busy core made
    training ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def quiet_pythae() -> Iterator[None]:
    """pythae logs at INFO from every trainer and draws a progress bar per epoch: neither here."""
    disabled = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(base_trainer, "ProgressBarCallback", _NoProgressBar)
            yield
    finally:
        logging.disable(disabled)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


def train(name: str, data: np.ndarray, output: Path) -> Path:
    """Train ``MODELS[name]`` on ``data`` with pythae's pipeline; its final_model folder."""
    torch.manual_seed(0)
    model = MODELS[name][0]()
    config = BaseTrainerConfig(
        output_dir=str(output), num_epochs=15, learning_rate=1e-3, per_device_train_batch_size=64, no_cuda=True, seed=0
    )
    pipeline = TrainingPipeline(model=model, training_config=config)
    pipeline(train_data=data.reshape(-1, *SHAPE["input_dim"]))
    return Path(pipeline.trainer.training_dir) / "final_model"


def get_nll(model: nn.Module, x: torch.Tensor, *, samples: int, seed: int) -> float:
    """pythae's ``get_nll`` at exactly ``samples`` draws per point (``batch_size`` = ``n_samples``): mean log p(x)."""
    torch.manual_seed(seed)
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):  # VAMP's prints a running mean
        return float(model.get_nll(x.reshape(-1, *SHAPE["input_dim"]), n_samples=samples, batch_size=samples))


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Trained]:
    grey, binary = digits()
    output = tmp_path_factory.mktemp("pythae")
    models = {}
    with one_thread(), quiet_pythae():
        for name, (_, on_binary) in MODELS.items():
            data = binary if on_binary else grey
            folder = train(name, data[:TRAIN], output / name)
            model = wrap(AutoModel.load_from_folder(str(folder)))
            evaluated = data[TRAIN : TRAIN + EVALUATED]
            runs = [get_nll(model, torch.from_numpy(evaluated), samples=K, seed=seed) for seed in range(SEEDS)]
            models[name] = Trained(model, folder, evaluated, float(np.mean(runs)))
    return models


def log_weights(model: nn.Module, x: torch.Tensor, samples: int) -> torch.Tensor:
    """log p(x|z) + log p(z) - log q(z|x), ``[samples, B]`` float64, for draws z ~ q(z|x), through the protocol only."""
    q = model.encode(x)
    z = q.sample((samples,))  # [K, B, L]
    rows = z.reshape(-1, z.shape[-1])
    points = x.reshape(1, x.shape[0], -1).expand(samples, -1, -1).reshape(rows.shape[0], -1)
    log_px_z = model.decode(rows).log_prob(points).reshape(samples, -1)
    return (log_px_z + model.prior().log_prob(z) - q.log_prob(z)).double()


def iwae(log_w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per point: the IWAE estimate logsumexp_k log w_k - log K, and its delta-method standard error sqrt(1/ESS - 1/K)."""
    samples = log_w.shape[0]
    log_sum = torch.logsumexp(log_w, 0)
    ess = torch.exp(2 * log_sum - torch.logsumexp(2 * log_w, 0))
    return (log_sum - math.log(samples)).numpy(), (1 / ess - 1 / samples).clamp(min=0).sqrt().numpy()


def direct_iwae(model: nn.Module, x: torch.Tensor, *, samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``iwae`` of ``log_weights``, 20 points at a time (a K x 20-row decoder pass, not one per point)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        parts = [iwae(log_weights(model, chunk, samples)) for chunk in x.split(20)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def tolerance(stderr: np.ndarray) -> float:
    """Z standard errors of (one run's mean over N points) - (get_nll's mean over SEEDS runs) of the same IWAE estimator.

    Both sides draw K samples per point from the same q(z|x), so both estimate the same
    K-sample bound (same bias); point i's estimate has Monte Carlo standard error s_i
    (``stderr``, the delta method: sqrt(1/ESS - 1/K)) on either side. One run's mean over
    N points has variance sum s_i^2 / N^2; get_nll's average over SEEDS runs 1/SEEDS of
    that. Over 20 seeds the spread of either side's mean was within 30% of this delta-method figure.
    """
    return Z * math.sqrt((1 + 1 / SEEDS) * np.sum(stderr**2)) / len(stderr)


# ---------------------------------------------------------------- against get_nll


@pytest.mark.parametrize("name", MODELS)
def test_same_draws_as_get_nll_give_the_same_numbers(trained, name):
    """With get_nll's own draws, every log-density and constant agrees: only float32 rounding is left."""
    model, x = trained[name].model, trained[name].x[:10]
    samples = 100
    for i in range(len(x)):
        expected = get_nll(model, x[i : i + 1], samples=samples, seed=i)
        torch.manual_seed(i)  # get_nll's only draw for one point: randn_like of a [samples, L] std
        eps = torch.randn(samples, SHAPE["latent_dim"])
        with torch.no_grad():
            q = model.encode(x[i : i + 1])
            z = q.base_dist.loc + eps * q.base_dist.scale
            log_w = model.decode(z).log_prob(x[i].reshape(1, -1).expand(samples, -1)) + model.prior().log_prob(z) - q.log_prob(z)
        ours = float(torch.logsumexp(log_w.double(), 0)) - math.log(samples)
        assert ours == pytest.approx(expected, abs=1e-4), (i, ours, expected)


@pytest.mark.parametrize("name", MODELS)
def test_iwae_from_the_protocol_agrees_with_get_nll(trained, name):
    case = trained[name]
    estimates, stderr = direct_iwae(case.model, case.x, samples=K, seed=2)
    assert abs(estimates.mean() - case.get_nll) < tolerance(stderr), (estimates.mean(), case.get_nll, tolerance(stderr))


def run_elbo(trained: Trained, where: Path, *options: str) -> dict:
    """``vaeeval elbo --arch load.py:load -k K --json`` on the saved state dict, in-process; its JSON document."""
    weights, data, load = where / "vae.safetensors", where / "digits.npy", where / "load.py"
    save_file(trained.model.state_dict(), str(weights))
    np.save(data, trained.data)
    load.write_text(LOAD_PY.format(folder=str(trained.folder)))
    result = CliRunner().invoke(main, ["elbo", str(weights), str(data), "--arch", f"{load}:load", "-k", str(K), "--json", *options])
    assert result.exit_code == 0, (result.exit_code, result.stderr, repr(result.exception))
    return json.loads(result.stdout)


@pytest.mark.parametrize("name", MODELS)
def test_vaeeval_elbo_agrees_with_get_nll(trained, name, tmp_path):
    """The command a user runs; a Gaussian decoder's density is kept on the (17-level) grey digits, as get_nll scores it."""
    bernoulli = name in BERNOULLI
    document = run_elbo(trained[name], tmp_path, *(() if bernoulli else ("--density",)))
    stderr = np.array([point["iwae_stderr"] for point in document["points"]])
    assert len(stderr) == EVALUATED
    assert document["model"]["measure"] == ("probability" if bernoulli else "density")
    assert document["model"]["prior"]["source"] == "prior()"
    mean = document["summary"]["iwae"]["mean"]
    assert abs(mean - trained[name].get_nll) < tolerance(stderr), (mean, trained[name].get_nll, tolerance(stderr))


@pytest.mark.parametrize("name", BERNOULLI)
def test_bernoulli_probabilities_differ_from_bce_far_below_monte_carlo_error(trained, name):
    """torch clamps probabilities to [eps, 1 - eps], pythae's binary_cross_entropy its log terms at -100: on the same draws
    the IWAE estimates differ by under 1% of each point's Monte Carlo standard error."""
    model, x = trained[name].model, trained[name].x
    torch.manual_seed(3)
    with torch.no_grad():
        q = model.encode(x)
        z = q.sample((K,))
        rows = z.reshape(-1, SHAPE["latent_dim"])
        points = x.reshape(1, EVALUATED, -1).expand(K, -1, -1).reshape(rows.shape[0], -1)
        log_latent = (model.prior().log_prob(z) - q.log_prob(z)).double()
        torch_terms = model.decode(rows).log_prob(points).reshape(K, -1)
        probabilities = model.decoder(rows)["reconstruction"].reshape(rows.shape[0], -1)
        pythae_terms = -F.binary_cross_entropy(probabilities, points, reduction="none").sum(-1).reshape(K, -1)
    ours, stderr = iwae(torch_terms.double() + log_latent)
    theirs, _ = iwae(pythae_terms.double() + log_latent)
    assert np.all(np.abs(ours - theirs) < 0.01 * stderr), (np.abs(ours - theirs).max(), stderr.min())


# ---------------------------------------------------------------- the adapter


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_is_pythae_s_and_loads_strictly(trained, name, tmp_path):
    model = trained[name].model
    plain = AutoModel.load_from_folder(str(trained[name].folder))
    assert list(model.state_dict()) == list(plain.state_dict())
    save_file(plain.state_dict(), str(tmp_path / "vae.safetensors"))
    model.load_state_dict(load_file(str(tmp_path / "vae.safetensors")), strict=True)
    assert wrap(model) is model
    assert type(model).__name__ == type(plain).__name__
    assert not model.training


def test_vamp_prior_is_pythae_s_log_p_z(trained):
    """``_log_p_z`` drops -L/2 log 2 pi, as get_nll's log q does; the prior keeps it."""
    model = trained["vamp_bce"].model
    z = torch.randn(50, SHAPE["latent_dim"], generator=torch.Generator().manual_seed(4)) * 2
    with torch.no_grad():
        expected = model._log_p_z(z) - SHAPE["latent_dim"] / 2 * math.log(2 * math.pi)
        assert torch.allclose(model.prior().log_prob(z), expected, atol=1e-5)
        assert model.prior().batch_shape == () and model.prior().event_shape == (SHAPE["latent_dim"],)


def test_encode_takes_any_shape_holding_a_point(trained):
    model, x = trained["vae_bce"].model, trained["vae_bce"].x[:5]
    with torch.no_grad():
        means = [model.encode(x.reshape(5, *shape)).mean for shape in ((64,), (8, 8), (1, 8, 8))]
    assert all(torch.equal(means[0], mean) for mean in means[1:])
    with pytest.raises(ValueError, match=r"^x is \[5, 63\]: 63 values per point, but pythae VAE's input_dim \[1, 8, 8\] holds 64$"):
        model.encode(x.reshape(5, 64)[:, :63])


def build(name: str, **config: object) -> nn.Module:
    """An untrained pythae model of class ``name`` for 8x8 inputs (configs are ``NameConfig`` or ``Name_Config``)."""
    config_class = getattr(pythae_models, f"{name}Config", None) or getattr(pythae_models, f"{name}_Config")
    torch.manual_seed(0)
    return getattr(pythae_models, name)(config_class(**SHAPE, **config))


@pytest.mark.parametrize("name", sorted(PRIORS))
def test_every_gaussian_pythae_model_speaks_the_protocol(name):
    model = build(name, reconstruction_loss="bce")
    keys = list(model.state_dict())
    model = wrap(model)
    with torch.no_grad():
        q = model.encode(torch.rand(3, 8, 8))
        z = q.sample((5,))
        decoded, prior = model.decode(z.reshape(15, -1)), model.prior()
        assert prior.log_prob(z).shape == (5, 3)
    assert (q.batch_shape, q.event_shape) == ((3,), (4,))
    assert (decoded.batch_shape, decoded.event_shape) == ((15,), (64,))
    assert (prior.batch_shape, prior.event_shape) == ((), (4,))
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_other_pythae_models_are_refused_naming_their_class(name):
    with pytest.raises(ValueError) as error:
        wrap(build(name))
    assert str(error.value) == f"pythae {name}: {REFUSED[name]}"


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            lambda: build("Adversarial_AE", deterministic_posterior=True),
            "pythae Adversarial_AE: its posterior is a point (deterministic_posterior=True), not a distribution over z",
        ),
        (lambda: nn.Linear(64, 4), "Linear is not a pythae model (no class of pythae.models among its bases)"),
        (
            lambda: type("NewVAE", (nn.Module,), {"__module__": "pythae.models.new_vae"})(),
            "pythae NewVAE: vaeeval does not know this pythae model (it reads Adversarial_AE, BetaTCVAE, BetaVAE, CIWAE, "
            "DisentangledBetaVAE, FactorVAE, INFOVAE_MMD, IWAE, MIWAE, PIWAE, VAE, VAE_IAF, VAE_LinNF, VAMP)",
        ),
    ],
)
def test_refusals_are_one_line(model, message):
    with pytest.raises(ValueError) as error:
        wrap(model())
    assert str(error.value) == message


def test_vaeeval_names_a_refused_model_in_one_line(tmp_path):
    model = build("AE")
    model.save(str(tmp_path / "ae"))
    save_file(model.state_dict(), str(tmp_path / "ae.safetensors"))
    np.save(tmp_path / "digits.npy", digits()[1][:5])
    (tmp_path / "load.py").write_text(LOAD_PY.format(folder=str(tmp_path / "ae")))
    arch = f"{tmp_path / 'load.py'}:load"
    result = CliRunner().invoke(main, ["elbo", str(tmp_path / "ae.safetensors"), str(tmp_path / "digits.npy"), "--arch", arch])
    assert result.exit_code == 2
    assert result.stderr == (
        f"vaeeval: error: --arch {arch}: load() raised ValueError: pythae AE: its encoder gives a point, not a distribution over z\n"
    )
