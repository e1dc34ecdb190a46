"""--arch models with discrete latents: a 10-way categorical and eight Bernoulli units, against exact sums."""

from __future__ import annotations

import itertools
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from scipy import special
from torch.distributions import (
    Bernoulli,
    Categorical,
    Independent,
    Normal,
    OneHotCategorical,
    RelaxedBernoulli,
    RelaxedOneHotCategorical,
    kl_divergence,
    register_kl,
)

from vaeeval.cli import main
from vaeeval.user.discrete import point_mass
from vaeeval.user.distributions import analytic_kl, keyed, keyed_sample

MODELS = '''
import torch
from torch import nn
from torch.distributions import Bernoulli, Beta, Independent, OneHotCategorical, RelaxedOneHotCategorical


class CategoricalVAE(nn.Module):
    """One 10-way categorical latent, one-hot, a learned prior; six Bernoulli pixels."""

    def __init__(self, dims=16, classes=10):
        super().__init__()
        self.encoder = nn.Linear(dims, classes)
        self.decoder = nn.Linear(classes, dims)
        self.prior_logits = nn.Parameter(torch.zeros(classes))

    def encode(self, x):  # float64 logits: torch normalizes a Categorical's logits in their own dtype
        return OneHotCategorical(logits=self.encoder(x).double())

    def decode(self, z):
        return Independent(Bernoulli(logits=self.decoder(z)), 1)

    def prior(self):
        return OneHotCategorical(logits=self.prior_logits.double())


class BernoulliVAE(nn.Module):
    """Eight Bernoulli latents under a prior without batch dimensions, as users write it."""

    def __init__(self, dims=16, latent=8):
        super().__init__()
        self.encoder = nn.Linear(dims, latent)
        self.decoder = nn.Linear(latent, dims)

    def encode(self, x):
        return Independent(Bernoulli(logits=self.encoder(x)), 1)

    def decode(self, z):
        return Independent(Bernoulli(logits=self.decoder(z)), 1)

    def prior(self):
        return Independent(Bernoulli(0.5 * torch.ones(8)), 1)


class RelaxedVAE(BernoulliVAE):
    """A Gumbel-softmax latent over 8 categories at temperature 1/2: drawn keyed, its density vaeeval's own."""

    def encode(self, x):
        return RelaxedOneHotCategorical(torch.tensor(0.5), logits=self.encoder(x))

    def prior(self):
        return RelaxedOneHotCategorical(torch.tensor(0.5), logits=torch.zeros(8))


class BetaVAE(BernoulliVAE):
    """A posterior vaeeval cannot draw from keyed: evaluated, with a note."""

    def encode(self, x):
        return Independent(Beta(self.encoder(x).exp(), 1.0), 1)

    def prior(self):
        return Independent(Beta(torch.ones(8), torch.ones(8)), 1)
'''

DIMS, CLASSES, UNITS = 16, 10, 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """models.py, each model's weights (random, fixed) and 12 binary points."""
    folder = tmp_path_factory.mktemp("discrete")
    (folder / "models.py").write_text(MODELS)
    sys.path.insert(0, str(folder))
    try:
        import importlib

        module = importlib.import_module("models")
        torch.manual_seed(0)
        for name in ("CategoricalVAE", "BernoulliVAE", "RelaxedVAE", "BetaVAE"):
            model = getattr(module, name)()
            with torch.no_grad():
                for key, parameter in model.named_parameters():  # multiples of 1/8: every logit exact in float32
                    spread = 2 if key.startswith("encoder") else 12  # a broad q(z|x), that IWAE converges from
                    parameter.copy_(torch.round(torch.randn_like(parameter) * spread) / 8)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / f"{name}.safetensors")
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("models", None)
    np.save(folder / "x.npy", (np.random.default_rng(0).random((12, DIMS)) < 0.4).astype(np.float32))
    return folder


def _run(folder, name, *args):
    weights, data = str(folder / f"{name}.safetensors"), str(folder / "x.npy")
    return CliRunner().invoke(main, [*args[:1], weights, data, "--arch", f"{folder / 'models.py'}:{name}", *args[1:]])


def _json(folder, name, *args):
    result = _run(folder, name, "elbo", "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _weights(folder, name):
    from safetensors.numpy import load_file

    return {k: v.astype(np.float64) for k, v in load_file(folder / f"{name}.safetensors").items()}


def _log_bernoulli(x, logits):
    """sum_d log Bernoulli(x_d; sigmoid(logits_d)), float64."""
    return (x * logits - np.logaddexp(0, logits)).sum(-1)


def test_bernoulli_prior_without_batch_dimensions_gives_the_closed_form_kl(folder):
    document = _json(folder, "BernoulliVAE", "-k", "20")
    assert document["model"]["kl"] == "analytic"
    w = _weights(folder, "BernoulliVAE")
    x = np.load(folder / "x.npy").astype(np.float64)
    p = special.expit(x @ w["encoder.weight"].T + w["encoder.bias"])
    kl = (p * np.log(p / 0.5) + (1 - p) * np.log((1 - p) / 0.5)).sum(-1)
    np.testing.assert_allclose([point["kl"] for point in document["points"]], kl, rtol=1e-6)


class _Failing(Normal):
    pass


@register_kl(_Failing, _Failing)
def _kl_failing(p, q):
    raise IndexError("a closed form that breaks")


def test_a_closed_form_that_fails_for_any_reason_falls_back_to_sampling():
    posterior, prior = _Failing(torch.zeros(3), 1.0), _Failing(torch.zeros(()), 1.0)
    with pytest.raises(IndexError):
        kl_divergence(posterior, prior)
    assert analytic_kl(posterior, prior) is None
    # and a prior without the batch dimension is broadcast to it first
    assert analytic_kl(Normal(torch.zeros(3), 1.0), Normal(torch.zeros(()), 2.0)).shape == (3,)


@pytest.mark.parametrize("command", ["ais", "bdmc"])
def test_annealing_a_discrete_latent_is_refused_in_one_line(folder, command):
    if command == "bdmc":
        weights, arch = str(folder / "CategoricalVAE.safetensors"), f"{folder / 'models.py'}:CategoricalVAE"
        result = CliRunner().invoke(main, ["bdmc", weights, "--arch", arch, "--input-shape", str(DIMS)])
    else:
        result = _run(folder, "CategoricalVAE", "ais")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "the latent is discrete (q(z|x) OneHotCategorical and p(z) OneHotCategorical)" in result.stderr
    assert "HMC, which needs a continuous latent" in result.stderr and "--enumerate" in result.stderr


_PROBS = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.0, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])


@pytest.mark.parametrize(
    "family",
    [
        Independent(Bernoulli(probs=_PROBS), 1),
        OneHotCategorical(probs=_PROBS),
        Categorical(probs=_PROBS),
        Independent(RelaxedBernoulli(torch.tensor(0.5), probs=_PROBS), 1),
        RelaxedOneHotCategorical(torch.tensor(0.5), probs=_PROBS),
    ],
    ids=["bernoulli", "one_hot", "categorical", "relaxed_bernoulli", "relaxed_one_hot"],
)
def test_discrete_families_are_drawn_from_keyed_noise_with_their_own_law(family):
    assert keyed(family)
    indices = np.array([4, 9, 11])
    draws = keyed_sample(family, 3, indices, 0, 4000)  # [S, B, *event]
    # sample k of point i depends on (seed, i, k) only: the middle point drawn alone, from a later sample on
    alone = keyed_sample(_row(family, 1), 3, indices[1:2], 1000, 1200)
    assert torch.equal(alone[:, 0], draws[1000:1200, 1])
    if isinstance(family, Categorical):
        frequencies = torch.nn.functional.one_hot(draws, 4).double().mean(0)
    else:
        frequencies = draws.double().mean(0)
    if isinstance(family, Independent) and isinstance(family.base_dist, RelaxedBernoulli):
        assert ((draws > 0) & (draws < 1)).all()
        frequencies = (draws > 0.5).double().mean(0)  # logistic noise: P(draw > 1/2) = p, at any temperature
    if isinstance(family, RelaxedOneHotCategorical):
        assert torch.allclose(draws.sum(-1), torch.ones(()).double().float(), atol=1e-5)
        frequencies = torch.nn.functional.one_hot(draws.argmax(-1), 4).double().mean(0)  # Gumbel-max: the argmax is categorical
    # 4000 draws: a frequency's standard error is at most 0.008
    np.testing.assert_allclose(frequencies.numpy(), _PROBS.double().numpy(), atol=0.035)
    assert (frequencies[1, 1] == 0).item()  # a category of probability 0 is never drawn


def _row(family, row):
    """The same distribution for one point (row ``row`` of the batch)."""
    if isinstance(family, Independent):
        return Independent(_row(family.base_dist, row), family.reinterpreted_batch_ndims)
    if isinstance(family, RelaxedBernoulli | RelaxedOneHotCategorical):
        return type(family)(family.temperature, probs=family.probs[row : row + 1])
    return type(family)(probs=family.probs[row : row + 1])


@pytest.mark.parametrize(
    ("name", "how"),
    [(name, how) for name in ("CategoricalVAE", "BernoulliVAE") for how in ("--enumerate", "--no-enumerate")]
    + [("RelaxedVAE", "--no-enumerate")],
)
def test_every_number_is_bit_identical_for_any_batch_size(folder, name, how):
    documents = []
    for batch_size in (1, 7, 100):
        document = _json(folder, name, "-k", "50", "--batch-size", str(batch_size), how)
        assert document["settings"].pop("batch_size") == batch_size
        documents.append(json.dumps(document))
    assert documents[0] == documents[1] == documents[2]


def test_a_posterior_drawn_by_its_own_sample_is_evaluated_with_a_note(folder):
    document = _json(folder, "BetaVAE", "-k", "20")
    note = "q(z|x) is Independent(Beta), drawn by its own sample() under a generator seeded per batch: its numbers depend on --batch-size"
    assert any(n.startswith(note) for n in document["model"]["notes"])
    table = _run(folder, "BetaVAE", "elbo", "-k", "20")
    assert table.exit_code == 0 and "depend on --batch-size" in table.stdout


def _exact(folder, name):
    """log p(x), ELBO, recon and KL of every point by summing over z in NumPy float64 (the logits are exact in float32)."""
    w = _weights(folder, name)
    x = np.load(folder / "x.npy").astype(np.float64)
    encoded = x @ w["encoder.weight"].T + w["encoder.bias"]  # [N, units or classes]
    if name == "CategoricalVAE":
        z = np.eye(CLASSES)
        log_q = special.log_softmax(encoded, axis=1)  # [N, M]
        log_p = special.log_softmax(w["prior_logits"])  # [M]
    else:
        z = np.array(list(itertools.product([0.0, 1.0], repeat=UNITS)))
        log_q = z @ encoded.T - np.logaddexp(0, encoded).sum(1)  # [M, N]
        log_q, log_p = log_q.T, np.full(len(z), UNITS * np.log(0.5))
    decoded = z @ w["decoder.weight"].T + w["decoder.bias"]  # [M, D]
    log_lik = np.stack([_log_bernoulli(point, decoded) for point in x])  # [N, M]
    q = np.exp(log_q)
    recon, kl = (q * log_lik).sum(1), (q * (log_q - log_p)).sum(1)
    return special.logsumexp(log_lik + log_p, axis=1), recon - kl, recon, kl


@pytest.mark.parametrize("name", ["CategoricalVAE", "BernoulliVAE"])
def test_enumeration_gives_the_exact_sums(folder, name):
    document = _json(folder, name, "--enumerate")
    log_px, elbo, recon, kl = _exact(folder, name)
    found = {key: np.array([point[key] for point in document["points"]]) for key in ("iwae", "elbo", "recon", "kl")}
    for key, exact in (("iwae", log_px), ("elbo", elbo), ("recon", recon), ("kl", kl)):
        np.testing.assert_allclose(found[key], exact, rtol=1e-9, atol=0, err_msg=key)
    points = document["points"]
    assert all(p["khat"] is None and not p["unreliable"] and p["iwae_stderr"] == 0 for p in points)
    assert any(note.startswith("log p(x) exact: summed over all") for note in document["model"]["notes"])
    assert document["model"]["kl"] == "analytic"
    # chosen by itself below --max-support, not above it
    assert _json(folder, name)["points"] == points
    assert _json(folder, name, "--max-support", "9", "-k", "20")["points"][0]["iwae_stderr"] > 0


@pytest.mark.parametrize("name", ["CategoricalVAE", "BernoulliVAE"])
def test_iwae_at_large_k_agrees_with_the_enumeration(folder, name):
    sampled = _json(folder, name, "--no-enumerate", "-k", "4000")["points"]
    log_px = _exact(folder, name)[0]
    iwae, stderr = np.array([p["iwae"] for p in sampled]), np.array([p["iwae_stderr"] for p in sampled])
    assert np.all(np.abs(iwae - log_px) < 3 * stderr + 1e-12), (iwae - log_px) / stderr


def test_enumerate_past_the_limit_or_on_a_continuous_latent_is_refused_in_one_line(folder):
    result = _run(folder, "BernoulliVAE", "elbo", "--enumerate", "--max-support", "100")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "--enumerate: z takes 256 values, more than --max-support 100; raise --max-support" in result.stderr
    result = _run(folder, "BetaVAE", "elbo", "--enumerate")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "--enumerate sums over every value of z, which needs q(z|x) and p(z) discrete" in result.stderr


README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- tests/test_discrete_latents.py runs this block and the two commands after it -->"


def test_readme_categorical_example_runs(tmp_path):
    """The README's categorical latent, verbatim: elbo sums over its 10 values, ais refuses it."""
    after = README.read_text().split(MARKER, 1)[1]
    match = re.match(r"\n```python\n(.*?)```\s*\n```sh\n(.*?)```", after, re.S)
    assert match, "the marked example is a ```python block, then a ```sh block"
    code, commands = match.group(1), [line.split("#", 1)[0].split() for line in match.group(2).splitlines()]
    glue = [line for line in code.splitlines() if line.strip().startswith("return ")]
    assert len(glue) <= 5
    (tmp_path / "categorical.py").write_text(code)
    namespace: dict = {}
    exec(compile(code, "README.md (categorical latent)", "exec"), namespace)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        module = namespace["CategoricalVAE"]()
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, tmp_path / "categorical.safetensors")
    np.save(tmp_path / "mnist_test.npy", (np.random.default_rng(1).random((5, 784)) < 0.3).astype(np.float32))
    results = []
    for command in commands:
        assert command[0] == "vaeeval"
        args = [str(tmp_path / a) if a.endswith((".npy", ".safetensors")) or ".py:" in a else a for a in command[1:]]
        results.append(CliRunner().invoke(main, args + (["--json"] if args[0] == "elbo" else [])))
    elbo, ais = results
    assert elbo.exit_code == 0, elbo.output
    document = json.loads(elbo.stdout)
    assert any(note.startswith("log p(x) exact: summed over all 10 values of z") for note in document["model"]["notes"])
    assert ais.exit_code == 2 and "needs a continuous latent" in ais.stderr


@pytest.mark.parametrize("family", [RelaxedBernoulli, RelaxedOneHotCategorical])
def test_relaxed_densities_equal_torchs(family):
    from vaeeval.user import discrete

    generator = torch.Generator().manual_seed(0)
    distribution = family(torch.tensor(0.6, dtype=torch.float64), logits=torch.randn(3, 5, dtype=torch.float64, generator=generator))
    y = distribution.sample((4,)).clone()  # a fresh tensor: torch inverts it as vaeeval does, without its cache
    np.testing.assert_allclose(discrete.log_prob(distribution, y).numpy(), distribution.log_prob(y).numpy(), rtol=1e-12)


def test_point_mass_is_a_discrete_latent_with_probabilities_0_and_1_only():
    """A VQ-VAE's q(z|x): every draw is the same z (the note on iwae = elbo rests on this; tests/test_diffusers.py runs it)."""
    codes = torch.nn.functional.one_hot(torch.tensor([[3, 0], [1, 1]]), 4).float()
    assert point_mass(Independent(Categorical(probs=codes), 1))
    assert point_mass(OneHotCategorical(probs=codes[0]))
    assert point_mass(Independent(Bernoulli(probs=torch.tensor([[0.0, 1.0]])), 1))
    assert not point_mass(Independent(Categorical(probs=codes * 0.5 + 0.125), 1))
    assert not point_mass(Categorical(logits=torch.tensor([0.0, -10.0])))
    assert not point_mass(Independent(Normal(torch.zeros(2), torch.ones(2)), 1))
