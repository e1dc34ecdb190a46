"""vaeeval.adapters.diffusers: a tiny AutoencoderKL and a tiny VQModel trained here on the 8x8 digits.

The digits are made 8-bit images on [-1, 1] (2k/255 - 1, [N, 1, 8, 8]), as diffusers holds
images; each model is trained for a few dozen steps and written with ``save_pretrained``,
then read as the README says: ``--arch vaeeval.adapters.diffusers:AutoencoderKL`` (or
``:VQModel``) on the ``diffusion_pytorch_model.safetensors`` in its folder. Checks:

* AutoencoderKL: vaeeval's IWAE and ELBO on the 8-bit bins against an importance-sampling
  computation written here in float64 (diffusers' own ``latent_dist`` and ``decode``, scipy's
  normal CDF on the same bins), within 3 standard errors;
* VQModel: the ELBO equals log p(x|z_q) - M log K computed through diffusers' own
  ``VQModel.decode`` (which quantizes itself) to float32 rounding; iwae = elbo, KL = M log K,
  and the note says why;
* the README's commands, with SIGMA the --sigma that calibrate prints;
* refusals in one line with exit 2: convert, weights without their config.json, a config of
  the other class.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shlex
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli
from scipy import special, stats
from sklearn.datasets import load_digits
from torch import nn

diffusers = pytest.importorskip("diffusers")

from vaeeval.adapters.diffusers import WEIGHTS, wrap  # noqa: E402 (diffusers is optional: skipped above without it)

ROOT = Path(__file__).resolve().parents[1]
TRAIN = 1500  # digits 0..1499 train; the next VALID calibrate; the next EVALUATED are scored
VALID = 100
EVALUATED = 50
STEP = 2 / 255  # the 8-bit grid on [-1, 1]
SIGMA = 0.2
K = 100
Z = 3.0
ARCH = {"AutoencoderKL": "vaeeval.adapters.diffusers:AutoencoderKL", "VQModel": "vaeeval.adapters.diffusers:VQModel"}
COMMON = {  # two tiny blocks: 8x8 images, 4x4 latents
    "in_channels": 1, "out_channels": 1, "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2, "block_out_channels": (8, 8), "layers_per_block": 1,
    "latent_channels": 2, "norm_num_groups": 4, "sample_size": 8,
}
CODES = 16  # K of the VQModel: K^M = 16^16 values of z, far past --max-support, so vaeeval samples


def images() -> np.ndarray:
    """The 1797 digits as 8-bit images on [-1, 1], ``[N, 1, 8, 8]`` float32."""
    levels = np.rint(load_digits().images / 16 * 255)
    return (2 * levels / 255 - 1).astype(np.float32)[:, None]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train(model: nn.Module, data: torch.Tensor, loss_of, steps: int = 40) -> nn.Module:
    """A few dozen Adam steps on batches of 32: enough to make the model far from its initialization."""
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        batch = data[torch.randint(0, len(data), (32,), generator=generator)]
        loss = loss_of(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def kl_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """AutoencoderKL's training loss: the negative ELBO of a Gaussian decoder of σ = SIGMA, as its KL term is trained."""
    posterior = model.encode(x).latent_dist
    error = (model.decode(posterior.sample()).sample - x).square().sum((1, 2, 3))
    return (error / (2 * SIGMA**2) + posterior.kl()).mean()


def vq_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """VQModel's: squared error plus diffusers' codebook and commitment loss."""
    output = model(x)
    return (output.sample - x).square().mean() + output.commit_loss.mean()


@dataclass(frozen=True)
class Trained:
    model: nn.Module  # diffusers' own model, as trained
    folder: Path  # what save_pretrained wrote
    weights: Path
    test: Path  # the EVALUATED images, .npy
    valid: Path

    @property
    def x(self) -> torch.Tensor:
        return torch.from_numpy(np.load(self.test))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Trained]:
    data = images()
    where = tmp_path_factory.mktemp("diffusers")
    np.save(where / "test.npy", data[TRAIN + VALID : TRAIN + VALID + EVALUATED])
    np.save(where / "valid.npy", data[TRAIN : TRAIN + VALID])
    found = {}
    with one_thread():
        torch.manual_seed(0)
        for name, model, loss in (
            ("AutoencoderKL", diffusers.AutoencoderKL(**COMMON), kl_loss),
            ("VQModel", diffusers.VQModel(**COMMON, num_vq_embeddings=CODES, vq_embed_dim=2), vq_loss),
        ):
            train(model, torch.from_numpy(data[:TRAIN]), loss)
            folder = where / name
            model.save_pretrained(folder)
            found[name] = Trained(model, folder, folder / WEIGHTS, where / "test.npy", where / "valid.npy")
    return found


def elbo(case: Trained, name: str, *options: object) -> dict:
    result = cli("elbo", case.weights, case.test, "--arch", ARCH[name], "--likelihood", "gaussian", "--json", *options)
    return json.loads(result.stdout)


# ---------------------------------------------------------------- the independent float64 computation


def log_bins(x: np.ndarray, mean: np.ndarray, sigma: float) -> np.ndarray:
    """log P(x's 8-bit bin | N(mean, sigma^2)) summed over a point's last three axes, float64: the bin
    [x - STEP/2, x + STEP/2], open at -1 and 1, its mass from whichever tail keeps it exact."""
    low = np.where(x <= -1 + STEP / 4, -np.inf, (x - STEP / 2 - mean) / sigma)
    high = np.where(x >= 1 - STEP / 4, np.inf, (x + STEP / 2 - mean) / sigma)
    upper = low > 0  # both ends above the mean: the mass as a difference of upper tails
    a, b = np.where(upper, -high, low), np.where(upper, -low, high)
    log_b, log_a = special.log_ndtr(b), special.log_ndtr(a)
    return (log_b + np.log1p(-np.exp(log_a - log_b))).sum(axis=(-3, -2, -1))


def independent_estimates(model: nn.Module, x: torch.Tensor, samples: int, sigma: float) -> dict[str, np.ndarray]:
    """Per point: IWAE (logsumexp - log K) and its delta-method standard error, the ELBO (recon - analytic KL) and
    its standard error, from K draws of diffusers' latent_dist decoded by diffusers' decode; every density in float64."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        posterior = model.encode(x).latent_dist
        mean, std = posterior.mean.double().numpy(), posterior.std.double().numpy()  # [B, C', h, w]
        eps = torch.randn(samples, *posterior.mean.shape, generator=generator, dtype=torch.float64).numpy()
        z = mean + std * eps  # [K, B, C', h, w]
        decoded = model.decode(torch.from_numpy(z.reshape(-1, *mean.shape[1:])).float()).sample
    image = decoded.double().numpy().reshape(samples, *x.shape)
    recon = log_bins(x.double().numpy()[None], image, sigma)  # [K, B]
    axes = (-3, -2, -1)
    log_prior = stats.norm.logpdf(z).sum(axis=axes)
    log_q = stats.norm.logpdf(z, mean, std).sum(axis=axes)
    log_w = recon + log_prior - log_q
    log_sum = special.logsumexp(log_w, axis=0)
    ess = np.exp(2 * log_sum - special.logsumexp(2 * log_w, axis=0))
    kl = (0.5 * (mean**2 + std**2 - 1) - np.log(std)).sum(axis=axes)
    return {
        "iwae": log_sum - math.log(samples),
        "iwae_stderr": np.sqrt(np.clip(1 / ess - 1 / samples, 0, None)),
        "elbo": recon.mean(0) - kl,
        "elbo_stderr": recon.std(0, ddof=1) / math.sqrt(samples),
    }


@pytest.fixture(scope="module")
def kl_document(trained) -> dict:
    """``vaeeval elbo --json`` of the AutoencoderKL on the test images, K draws per point."""
    return elbo(trained["AutoencoderKL"], "AutoencoderKL", "--sigma", SIGMA, "-k", K)


@pytest.mark.parametrize("metric", ["iwae", "elbo"])
def test_autoencoderkl_agrees_with_an_independent_float64_computation(trained, kl_document, metric):
    case = trained["AutoencoderKL"]
    ours = independent_estimates(case.model, case.x, K, SIGMA)
    theirs = np.array([point[metric] for point in kl_document["points"]])
    their_stderr = np.array([point[f"{metric}_stderr"] for point in kl_document["points"]])
    difference = theirs.mean() - ours[metric].mean()
    allowed = Z * math.sqrt(np.sum(their_stderr**2) + np.sum(ours[f"{metric}_stderr"] ** 2)) / EVALUATED
    assert abs(difference) < allowed, (metric, difference, allowed)
    assert kl_document["summary"][metric]["mean"] == pytest.approx(theirs.mean(), rel=1e-12)


def test_autoencoderkl_is_scored_on_the_8_bit_bins_in_bits_per_subpixel(kl_document):
    assert kl_document["data"]["domain"] == {"domain": "discrete", "levels": 256, "range": [-1.0, 1.0]}
    assert kl_document["summary"]["measure"] == "probability"
    iwae, bits = kl_document["summary"]["iwae"]["mean"], kl_document["summary"]["bits_per_dim"]["mean"]
    assert bits == pytest.approx(-iwae / (64 * math.log(2)), rel=1e-12)
    assert kl_document["model"]["prior"]["source"] == "N(0, I) assumed: the model defines no prior()"


def test_state_dict_is_diffusers_and_the_model_is_shared(trained):
    model = trained["AutoencoderKL"].model
    adapter = wrap(model)
    assert list(adapter.state_dict()) == list(model.state_dict())
    assert all(adapter.state_dict()[name] is value or torch.equal(adapter.state_dict()[name], value)
               for name, value in model.state_dict().items())
    x = trained["AutoencoderKL"].x[:3]
    with torch.no_grad():
        q = adapter.encode(x)
        assert torch.equal(q.base_dist.loc, model.encode(x).latent_dist.mean.flatten(1))
        # the same layers on a contiguous copy of the latents: equal to float32 rounding
        expected = model.decode(model.encode(x).latent_dist.mean).sample.flatten(1)
        torch.testing.assert_close(adapter.decode(q.base_dist.loc), expected, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- VQModel


def test_vqmodel_elbo_is_log_p_x_given_z_q_minus_m_log_k(trained):
    case = trained["VQModel"]
    document = elbo(case, "VQModel", "--sigma", SIGMA, "-k", 5)
    with torch.no_grad():  # diffusers' own path: encode, then decode quantizes to the nearest codes
        latents = case.model.encode(case.x).latents
        image = case.model.decode(latents).sample.double().numpy()
    positions = latents.shape[2] * latents.shape[3]
    expected = log_bins(case.x.double().numpy(), image, SIGMA) - positions * math.log(CODES)
    points = document["points"]
    for metric in ("elbo", "iwae"):
        np.testing.assert_allclose([p[metric] for p in points], expected, rtol=1e-5, atol=1e-3)
    assert [p["iwae"] for p in points] == [p["elbo"] for p in points]
    np.testing.assert_allclose([p["kl"] for p in points], positions * math.log(CODES), rtol=1e-12)
    assert not any(p["unreliable"] for p in points)
    assert any(note.startswith("q(z|x) is a point mass") for note in document["model"]["notes"])


def test_vqmodel_codes_are_diffusers_quantize_s(trained):
    model = trained["VQModel"].model
    x = trained["VQModel"].x[:4]
    with torch.no_grad():
        q = wrap(model).encode(x)
        _, _, (_, _, indices) = model.quantize(model.encode(x).latents)
    assert torch.equal(q.base_dist.probs.argmax(-1).flatten(), indices)
    assert bool((q.base_dist.probs.max(-1).values == 1).all())
    prior = wrap(model).prior()
    assert tuple(prior.event_shape) == (16,) and torch.allclose(prior.base_dist.probs, torch.full((16, CODES), 1 / CODES))


# ---------------------------------------------------------------- the README's commands


def readme_commands() -> list[list[str]]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### diffusers models", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```sh\n(.*?)```", section, re.S)[0]
    return [shlex.split(line) for line in block.splitlines() if line.startswith("vaeeval ")]


def test_readme_commands_run(trained, tmp_path, monkeypatch):
    for name, folder in (("AutoencoderKL", "my_vae"), ("VQModel", "my_vq")):
        shutil.copytree(trained[name].folder, tmp_path / folder)
    shutil.copy(trained["AutoencoderKL"].test, tmp_path / "test.npy")
    shutil.copy(trained["AutoencoderKL"].valid, tmp_path / "valid.npy")
    monkeypatch.chdir(tmp_path)
    calibrate, *evaluations = readme_commands()
    assert calibrate[1] == "calibrate" and len(evaluations) == 2
    quick = ("-k", 2, "--limit", 10)
    # --density: the closed-form σ in one pass. On the bins calibrate searches, decoding every draw again at each of
    # ~50 steps (a minute here); that search is tests/test_calibrate.py's. Under test here: the commands and the σ handed on.
    printed = cli(*calibrate[1:], *quick, "--density").stdout
    sigma = re.search(r"pass --sigma (\S+) to an --arch model", printed).group(1)
    assert (tmp_path / "my_vae" / "calibrated.safetensors").is_file()
    for command in evaluations:
        document = json.loads(cli(*[sigma if word == "SIGMA" else word for word in command[1:]], *quick, "--json").stdout)
        assert math.isfinite(document["summary"]["iwae"]["mean"])
    # the calibrated file, with its tensor, gives the numbers of the printed --sigma (which it holds to float32)
    fitted = json.loads(cli("elbo", "my_vae/calibrated.safetensors", "valid.npy", "--arch", ARCH["AutoencoderKL"], "--likelihood",
                            "gaussian", "--log-sigma-tensor", "calibrated_log_scale", *quick, "--json").stdout)
    given = json.loads(cli("elbo", "my_vae/" + WEIGHTS, "valid.npy", "--arch", ARCH["AutoencoderKL"], "--likelihood", "gaussian",
                           "--sigma", sigma, *quick, "--json").stdout)
    assert fitted["summary"]["elbo"]["mean"] == pytest.approx(given["summary"]["elbo"]["mean"], rel=1e-5)


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("name", ARCH)
def test_convert_refuses_in_one_line(trained, name, tmp_path):
    result = cli("convert", trained[name].weights, "--arch", ARCH[name], "--likelihood", "gaussian", "--sigma", 1,
                 "--input-shape", "1,8,8", "-o", tmp_path / "out.safetensors", code=2)
    assert result.stderr == (
        f"vaeeval: error: convert: diffusers {name}: format 1 cannot hold it (its ResNet blocks add skip connections; group "
        "norms and attention are no format-1 layers); evaluate it as it is: vaeeval elbo WEIGHTS DATA --arch "
        f"vaeeval.adapters.diffusers:{name}\n"
    )
    assert not (tmp_path / "out.safetensors").exists()


def test_weights_without_their_config_are_refused_in_one_line(trained, tmp_path):
    weights = tmp_path / "vae.safetensors"
    shutil.copy(trained["AutoencoderKL"].weights, weights)
    arch = ARCH["AutoencoderKL"]
    result = cli("elbo", weights, trained["AutoencoderKL"].test, "--arch", arch, "--likelihood", "gaussian", "--sigma", 1, code=2)
    assert result.stderr == (
        f"vaeeval: error: --arch {arch}: AutoencoderKL(weights='{weights}') raised ValueError: no config.json beside "
        f"{weights}: name the {WEIGHTS} that diffusers' save_pretrained wrote, in its folder\n"
    )


def test_a_config_of_the_other_class_is_refused_in_one_line(trained):
    case, arch = trained["VQModel"], ARCH["AutoencoderKL"]
    result = cli("elbo", case.weights, case.test, "--arch", arch, "--likelihood", "gaussian", "--sigma", 1, code=2)
    assert result.stderr == (
        f"vaeeval: error: --arch {arch}: AutoencoderKL(weights='{case.weights}') raised ValueError: {case.folder / 'config.json'} "
        "is a VQModel's; read it with --arch vaeeval.adapters.diffusers:VQModel\n"
    )


def test_wrap_refuses_other_models():
    with pytest.raises(ValueError, match=r"^Linear is no diffusers model vaeeval reads \(AutoencoderKL, VQModel\)$"):
        wrap(nn.Linear(2, 2))


def test_a_config_of_a_class_vaeeval_does_not_read_is_refused_in_one_line(trained, tmp_path):
    folder = tmp_path / "tiny"
    shutil.copytree(trained["AutoencoderKL"].folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_class_name": "AutoencoderTiny"}))
    arch = ARCH["AutoencoderKL"]
    result = cli("elbo", folder / WEIGHTS, trained["AutoencoderKL"].test, "--arch", arch, "--likelihood", "gaussian", "--sigma", 1,
                 code=2)
    assert result.stderr == (
        f"vaeeval: error: --arch {arch}: AutoencoderKL(weights='{folder / WEIGHTS}') raised ValueError: {folder / 'config.json'} "
        "is a AutoencoderTiny's; vaeeval reads diffusers' AutoencoderKL and VQModel\n"
    )


def test_calibrate_refuses_the_vqmodel_in_one_line_naming_sigma(trained, tmp_path):
    case = trained["VQModel"]
    result = cli("calibrate", case.weights, case.valid, "--arch", ARCH["VQModel"], "--likelihood", "gaussian", "--sigma", 1,
                 "-o", tmp_path / "fitted.safetensors", code=2)
    assert result.stderr == (
        "vaeeval: error: calibrate fits a scale on the draws of a Gaussian q(z|x); this model's latent is discrete (q(z|x) "
        "Independent(Categorical) and p(z) Independent(Categorical)): give the scale with --sigma\n"
    )
