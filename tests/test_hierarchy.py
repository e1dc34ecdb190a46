"""Hierarchical latents (user/hierarchy.py): a linear-Gaussian two-level model z2 -> z1 -> x with closed-form log p(x).

z2 ~ N(0, I), z1 | z2 ~ N(A z2 + a, diag s1²), x | z1 ~ N(B z1 + b, σ² I), so x ~ N(B a + b,
B (A Aᵀ + diag s1²) Bᵀ + σ² I). Its exact posterior is a chain of Gaussians, top-down
q(z2|x) q(z1|z2, x) or bottom-up q(z1|x) q(z2|z1): under it every log-weight is log p(x), so
the ELBO and IWAE equal the closed form; a loose chain bounds it from below.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch.distributions import MultivariateNormal

from vaeeval.cli import main

MODELS = '''
import math

import torch
from torch import nn
from torch.distributions import Independent, MultivariateNormal, Normal


def eye(n):
    return torch.eye(n, dtype=torch.float64)


class LinearGaussian(nn.Module):
    """z2 -> z1 -> x, all Gaussian, computed in float64 from its float32 parameters.

    q: ``top_down`` (the exact q(z2|x) q(z1|z2, x)), ``bottom_up`` (the exact q(z1|x) q(z2|z1): given z1,
    z2 does not depend on x), ``loose`` (top-down, scales doubled, z2's mean shifted) or ``diagonal``
    (top-down, z1's factor with the exact one's means and variances but no correlations).
    """

    def __init__(self, d2=2, d1=3, dx=5, q="top_down"):
        super().__init__()
        self.A, self.a = nn.Parameter(torch.zeros(d1, d2)), nn.Parameter(torch.zeros(d1))
        self.log_s1 = nn.Parameter(torch.zeros(d1))
        self.B, self.b = nn.Parameter(torch.zeros(dx, d1)), nn.Parameter(torch.zeros(dx))
        self.log_sigma = nn.Parameter(torch.zeros(()))
        self.q = q

    def generative(self):
        return (self.A.double(), self.a.double(), self.log_s1.double().exp(), self.B.double(), self.b.double(),
                self.log_sigma.double().exp())

    def encode(self, x):
        A, a, s1, B, b, sigma = self.generative()
        x = x.double()
        prior1 = A @ A.T + torch.diag(s1**2)  # z1's marginal covariance
        if self.q == "bottom_up":
            cov1 = torch.linalg.inv(torch.linalg.inv(prior1) + B.T @ B / sigma**2)
            loc1 = (torch.linalg.inv(prior1) @ a + (x - b) @ B / sigma**2) @ cov1.T
            cov2 = torch.linalg.inv(eye(A.shape[1]) + A.T @ torch.diag(s1**-2) @ A)
            gain = cov2 @ A.T @ torch.diag(s1**-2)
            tril2 = torch.linalg.cholesky(cov2)  # once: a covariance given per draw would be factorized per draw
            return {"z1": MultivariateNormal(loc1, cov1),
                    "z2": lambda z1: MultivariateNormal((z1.double() - a) @ gain.T, scale_tril=tril2, validate_args=False)}
        M, m = B @ A, B @ a + b
        inverse = torch.linalg.inv(B @ torch.diag(s1**2) @ B.T + sigma**2 * eye(B.shape[0]))
        cov2 = torch.linalg.inv(eye(A.shape[1]) + M.T @ inverse @ M)
        loc2 = (x - m) @ (cov2 @ M.T @ inverse).T
        cov1 = torch.linalg.inv(torch.diag(s1**-2) + B.T @ B / sigma**2)
        shift = ((x - b) @ B / sigma**2 + a / s1**2) @ cov1.T
        gain = cov1 @ torch.diag(s1**-2) @ A
        if self.q == "loose":
            cov1, cov2, loc2 = 4 * cov1, 4 * cov2, loc2 + 0.3
        if self.q == "diagonal":  # z1's factor a diagonal Normal, as p's: torch has their KL at every draw of z2
            scale1 = torch.diagonal(cov1).sqrt()
            return {"z2": MultivariateNormal(loc2, cov2),
                    "z1": lambda z2: Independent(Normal(shift + z2.double() @ gain.T, scale1, validate_args=False), 1)}
        tril1 = torch.linalg.cholesky(cov1)
        return {"z2": MultivariateNormal(loc2, cov2),
                "z1": lambda z2: MultivariateNormal(shift + z2.double() @ gain.T, scale_tril=tril1, validate_args=False)}

    def decode(self, z):
        A, a, s1, B, b, sigma = self.generative()
        return Independent(Normal(z["z1"].double() @ B.T + b, sigma.expand(B.shape[0])), 1)

    def prior(self):
        A, a, s1, B, b, sigma = self.generative()
        zeros = torch.zeros(A.shape[1], dtype=torch.float64)
        return {"z2": Independent(Normal(zeros, torch.ones_like(zeros)), 1),
                "z1": lambda z2: Independent(Normal(z2.double() @ A.T + a, s1, validate_args=False), 1)}


class Broken(LinearGaussian):
    """The same model with one fault: a NaN factor, a group of the wrong size, other names, a later group."""

    def __init__(self, fault):
        super().__init__()
        self.fault = fault

    def encode(self, x):
        groups = super().encode(x)
        if self.fault == "nan":
            z1 = groups["z1"]
            groups["z1"] = lambda z2: MultivariateNormal(z1(z2).loc * math.nan, scale_tril=z1(z2).scale_tril, validate_args=False)
        if self.fault == "later":
            groups = {"z2": lambda z1: groups["z2"], "z1": groups["z1"]}
        if self.fault == "flat_q":
            return Independent(Normal(x.new_zeros(x.shape[0], 5), 1.0), 1)
        return groups

    def prior(self):
        groups = super().prior()
        if self.fault == "size":
            groups["z1"] = Independent(Normal(torch.zeros(4), torch.ones(4)), 1)
        if self.fault == "names":
            groups = {"top": groups["z2"], "z1": groups["z1"]}
        if self.fault == "flat_p":
            return Independent(Normal(torch.zeros(5), torch.ones(5)), 1)
        return groups
'''

D2, D1, DX, N = 2, 3, 5, 12
PARAMETERS: dict[Path, tuple[torch.Tensor, ...]] = {}  # each fixture folder's model, float64


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """models.py, LinearGaussian's weights (random, fixed), 12 points drawn from it, and its parameters in float64."""
    folder = tmp_path_factory.mktemp("hierarchy")
    (folder / "models.py").write_text(MODELS)
    sys.path.insert(0, str(folder))
    try:
        import importlib

        module = importlib.import_module("models")
        model = module.LinearGaussian()
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.copy_(0.7 * torch.randn(parameter.shape, generator=generator))
            model.log_sigma.fill_(-0.5)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "lg.safetensors")
        A, a, s1, B, b, sigma = (t.detach() for t in model.generative())
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("models", None)
    rng = np.random.default_rng(0)
    z2 = rng.standard_normal((N, D2))
    z1 = z2 @ A.numpy().T + a.numpy() + rng.standard_normal((N, D1)) * s1.numpy()
    x = z1 @ B.numpy().T + b.numpy() + rng.standard_normal((N, DX)) * float(sigma)
    np.save(folder / "x.npy", x.astype(np.float32))
    PARAMETERS[folder] = (A, a, s1, B, b, sigma)
    return folder


def log_px(folder, x: np.ndarray) -> np.ndarray:
    """The closed form: log N(x; B a + b, B (A Aᵀ + diag s1²) Bᵀ + σ² I), float64."""
    A, a, s1, B, b, sigma = PARAMETERS[folder]
    covariance = B @ (A @ A.T + torch.diag(s1**2)) @ B.T + sigma**2 * torch.eye(B.shape[0], dtype=torch.float64)
    return MultivariateNormal(B @ a + b, covariance).log_prob(torch.from_numpy(np.asarray(x, dtype=np.float64))).numpy()


def _run(folder, command, *args, model="LinearGaussian", data=True):
    inputs = [str(folder / "lg.safetensors")] + ([str(folder / "x.npy")] if data else [])
    return CliRunner().invoke(main, [command, *inputs, "--arch", f"{folder / 'models.py'}:{model}", *args])


def _json(folder, command, *args, **how):
    result = _run(folder, command, "--json", *args, **how)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _truth(folder):
    return log_px(folder, np.load(folder / "x.npy"))


@pytest.mark.parametrize("q", ["top_down", "bottom_up"])
def test_the_exact_posterior_chain_gives_the_closed_form(folder, q):
    """Every log-weight is log p(x): the ELBO and IWAE equal it, with no spread, whichever way q runs."""
    document = _json(folder, "elbo", "-k", "64", "--arch-args", json.dumps({"q": q}))
    points = document["points"]
    truth = _truth(folder)
    for metric in ("elbo", "iwae"):
        np.testing.assert_allclose([p[metric] for p in points], truth, rtol=0, atol=1e-9)
    assert max(p["elbo_stderr"] for p in points) < 1e-9
    assert document["model"]["kl"] == "monte_carlo" and document["model"]["latent_dim"] == D1 + D2
    assert any(note.startswith("hierarchical latent: groups ") for note in document["model"]["notes"])


def test_a_loose_chain_bounds_the_closed_form_and_iwae_reaches_it(folder):
    points = _json(folder, "elbo", "-k", "2000", "--arch-args", '{"q": "loose"}')["points"]
    truth = _truth(folder)
    elbo, iwae = np.array([p["elbo"] for p in points]), np.array([p["iwae"] for p in points])
    stderr = np.array([p["iwae_stderr"] for p in points])
    assert np.all(elbo < truth - 1)  # the loose q is far from the posterior: a gap the ELBO shows
    assert np.all(np.abs(iwae - truth) < 3 * stderr + 1e-3), (iwae - truth, stderr)
    kl = np.array([p["kl"] for p in points])
    np.testing.assert_allclose(np.array([p["recon"] for p in points]) - kl, elbo, rtol=0, atol=1e-9)


@pytest.mark.parametrize("q", ["top_down", "loose"])
def test_every_number_is_bit_identical_for_any_batch_size(folder, q):
    documents = []
    for batch_size in (1, 7, 100):
        document = _json(folder, "elbo", "-k", "50", "--batch-size", str(batch_size), "--arch-args", json.dumps({"q": q}))
        assert document["settings"].pop("batch_size") == batch_size
        documents.append(json.dumps(document))
    assert documents[0] == documents[1] == documents[2]


@pytest.mark.parametrize("q", ["top_down", "bottom_up", "loose"])
def test_latents_splits_the_kl_by_group_and_counts_active_units_per_group(folder, q):
    """Sampled per group, the KLs add up to the chain's Monte Carlo KL; the exact top-down q(z2|x)'s KL is the
    closed form KL(N(m2, C2) || N(0, I)) on average; and the numbers are the same bits for any batch size."""
    sizes = (1, 7, 100) if q == "loose" else (100,)
    documents = [_json(folder, "latents", "-k", "200", "--batch-size", str(size), "--arch-args", json.dumps({"q": q}))
                 for size in sizes]
    for document in documents:  # the settings say how it was batched and chunked; nothing else may differ
        document["settings"].pop("batch_size"), document["settings"].pop("chunk_size")
    assert all(json.dumps(document) == json.dumps(documents[0]) for document in documents)
    latents = documents[0]["latents"]
    groups = {g["name"]: g for g in latents["groups"]}
    order = ["z1", "z2"] if q == "bottom_up" else ["z2", "z1"]
    assert [g["name"] for g in latents["groups"]] == order
    assert groups[order[0]]["units"] == [0, {"z2": D2, "z1": D1}[order[0]]]
    assert all(g["kl_kind"] == "monte_carlo" and g["kl_stderr"] > 0 for g in groups.values())
    assert sum(g["kl"] for g in groups.values()) == pytest.approx(latents["mean_kl"], abs=1e-9)
    assert sum(g["active_units"] for g in groups.values()) == latents["active_units"]
    if q == "top_down":  # q(z2|x) is the exact marginal posterior: its KL to N(0, I) in closed form, per point
        loc2, cov2, *_ = _exact_top_down(folder, torch.from_numpy(np.load(folder / "x.npy")).double())
        closed = 0.5 * (torch.trace(cov2) + (loc2**2).sum(-1) - D2 - torch.logdet(cov2))
        assert abs(groups["z2"]["kl"] - float(closed.mean())) < 3 * groups["z2"]["kl_stderr"]


def _exact_top_down(folder, x):
    """The exact q(z2|x) = N(loc2, cov2) and q(z1|z2, x) = N(shift + gain z2, cov1), float64."""
    A, a, s1, B, b, sigma = PARAMETERS[folder]
    M, m = B @ A, B @ a + b
    inverse = torch.linalg.inv(B @ torch.diag(s1**2) @ B.T + sigma**2 * torch.eye(DX, dtype=torch.float64))
    cov2 = torch.linalg.inv(torch.eye(D2, dtype=torch.float64) + M.T @ inverse @ M)
    loc2 = (x - m) @ (cov2 @ M.T @ inverse).T
    cov1 = torch.linalg.inv(torch.diag(s1**-2) + B.T @ B / sigma**2)
    shift = ((x - b) @ B / sigma**2 + a / s1**2) @ cov1.T
    return loc2, cov2, shift, cov1 @ torch.diag(s1**-2) @ A, cov1


def test_a_groups_kl_given_the_draws_of_its_parents_is_the_closed_form_on_average(folder):
    """q(z1|z2, x) and p(z1|z2) diagonal Normals: the group's KL is E_q(z2|x)[KL(q1 || p1)] from torch's closed form
    at each draw of z2, which for these Gaussians has a closed form itself:
    1/2 Σ_i (v_i / s_i² + E[Δ_i²] / s_i² - 1 - log(v_i / s_i²)), Δ = shift - a + (gain - A) z2 with z2 ~ N(loc2, cov2)."""
    latents = _json(folder, "latents", "-k", "200", "--arch-args", '{"q": "diagonal"}')["latents"]
    groups = {g["name"]: g for g in latents["groups"]}
    assert groups["z1"]["kl_kind"] == "analytic_given_draws" and groups["z2"]["kl_kind"] == "monte_carlo"
    A, a, s1, *_ = PARAMETERS[folder]
    loc2, cov2, shift, gain, cov1 = _exact_top_down(folder, torch.from_numpy(np.load(folder / "x.npy")).double())
    variance, gap = torch.diagonal(cov1), gain - A
    mean_delta = shift - a + loc2 @ gap.T
    squares = mean_delta**2 + torch.diagonal(gap @ cov2 @ gap.T)
    closed = 0.5 * ((variance + squares) / s1**2 - 1 - torch.log(variance / s1**2)).sum(-1)
    assert abs(groups["z1"]["kl"] - float(closed.mean())) < 3 * groups["z1"]["kl_stderr"]
    assert groups["z1"]["kl_stderr"] < 0.05  # the closed form at each draw: far less spread than log q - log p's


def test_ais_anneals_through_the_joint_to_the_closed_form(folder):
    """From the prior chain (drawn keyed, group by group) and from a loose q chain: within 3 standard errors."""
    truth = _truth(folder)[:4]
    for init, q in (("prior", "top_down"), ("encoder", "loose")):
        document = _json(folder, "ais", "--limit", "4", "--init", init, "--arch-args", json.dumps({"q": q}),
                         "--steps", "30", "--chains", "16", "--leapfrog", "4", "-k", "10")
        ais, stderr = (np.array([p[key] for p in document["points"]]) for key in ("ais", "ais_stderr"))
        assert np.all(np.abs(ais - truth) < 3 * stderr + 0.02), (init, ais - truth, stderr)


def test_bdmc_brackets_the_closed_form(folder, tmp_path):
    """Simulated from the prior chain and the decoder, the points' closed form lies between the two AIS runs."""
    saved = tmp_path / "simulated.npz"
    document = _json(folder, "bdmc", "--input-shape", str(DX), "--n", "8", "--steps", "40", "--chains", "8",
                     "--leapfrog", "4", "-k", "10", "--save-data", str(saved), "--arch-args", '{"q": "loose"}', data=False)
    truth = log_px(folder, np.load(saved)["x"])
    lower, upper = (np.array([p[key] for p in document["points"]]) for key in ("lower", "upper"))
    for bound, sign in ((lower, 1), (upper, -1)):  # E lower <= log p(x) <= E upper, by points drawn independently
        difference = sign * (bound - truth)
        assert difference.mean() < 3 * difference.std(ddof=1) / np.sqrt(difference.size) + 0.05, (bound - truth)
    assert np.all(np.abs(lower - truth) < 1) and np.all(np.abs(upper - truth) < 1)


def test_the_prior_chain_draws_with_its_own_law(folder):
    """Keyed draws through the prior chain: z1's covariance is A Aᵀ + diag s1², z2 and z1 correlate through A."""
    from vaeeval.user.arch import ArchOptions, arch_model

    model = arch_model(folder / "lg.safetensors", ArchOptions(f"{folder / 'models.py'}:LinearGaussian"), (DX,))
    A, a, s1, *_ = PARAMETERS[folder]
    normal = torch.from_numpy(np.random.default_rng(1).standard_normal((20000, model.prior.noise_width)))
    z = model.prior.sample(normal, torch.rand(20000, dtype=torch.float64)).numpy()
    expected = np.block([[np.eye(D2), A.numpy().T], [A.numpy(), (A @ A.T + torch.diag(s1**2)).numpy()]])
    np.testing.assert_allclose(np.cov(z.T), expected, atol=0.1)
    np.testing.assert_allclose(z.mean(0), np.concatenate([np.zeros(D2), a.numpy()]), atol=0.05)


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("nan", "encode(x)'s group 'z1' (MultivariateNormal): log_prob is NaN for "),
        ("size", "prior()'s group 'z1' is Independent(Normal) over 4 values; encode(x) gives the group 3"),
        ("names", "prior()'s groups (top, z1) are not encode(x)'s (z2, z1); q and p must name the same groups"),
        ("later", "encode(x)'s group 'z2' takes 'z1', which is not a group before it in encode(x)'s mapping"),
        ("flat_q", "prior() returned groups (a mapping); encode(x) must then return the same groups"),
    ],
)
def test_bad_groups_are_one_line_errors(folder, fault, message):
    result = _run(folder, "elbo", "-k", "4", "--arch-args", json.dumps({"fault": fault}), model="Broken")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert message in result.stderr, result.stderr


def test_a_flat_prior_under_grouped_posterior_has_no_kl_per_group(folder):
    """p(z) one distribution over the flat z: evaluated as it is; latents counts active units per group, no KL."""
    document = _json(folder, "latents", "-k", "20", "--arch-args", '{"fault": "flat_p"}', model="Broken")
    groups = document["latents"]["groups"]
    assert [(g["name"], g["kl"], g["kl_stderr"], g["kl_kind"]) for g in groups] == [("z2", None, None, None), ("z1", None, None, None)]
    assert sum(g["active_units"] for g in groups) == document["latents"]["active_units"]


README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- tests/test_hierarchy.py runs this block and the commands after it -->"
SMALL = {"elbo": ["-k", "20"], "latents": ["-k", "20"], "ais": ["--steps", "5", "--chains", "2", "--leapfrog", "2", "-k", "10"]}


def _glue(code: str) -> list[str]:
    """The lines of the protocol's methods (encode, prior, decode) besides their ``def``s and comments."""
    lines, inside = [], False
    for line in code.splitlines():
        if re.match(r"\s+def (encode|prior|decode)\(", line):
            inside = True
        elif re.match(r"\s*(def|class) ", line):
            inside = False
        elif inside and line.strip() and not line.strip().startswith("#"):
            lines.append(line)
    return lines


def test_readme_ladder_example_runs(tmp_path):
    """The README's Ladder VAE, verbatim: at most 10 lines of glue; elbo, latents and ais run on it."""
    after = README.read_text().split(MARKER, 1)[1]
    match = re.match(r"\n```python\n(.*?)```\s*\n```sh\n(.*?)```", after, re.S)
    assert match, "the marked example is a ```python block, then a ```sh block"
    code, commands = match.group(1), [line.split("#", 1)[0].split() for line in match.group(2).splitlines()]
    assert 0 < len(_glue(code)) <= 10, _glue(code)
    (tmp_path / "ladder.py").write_text(code)
    namespace: dict = {}
    exec(compile(code, "README.md (Ladder VAE)", "exec"), namespace)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        module = namespace["LadderVAE"]()
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, tmp_path / "ladder.safetensors")
    np.save(tmp_path / "mnist_test.npy", (np.random.default_rng(1).random((5, 784)) < 0.3).astype(np.float32))
    documents = {}
    for command in commands:
        assert command[0] == "vaeeval"
        args = [str(tmp_path / a) if a.endswith((".npy", ".safetensors")) or ".py:" in a else a for a in command[1:]]
        result = CliRunner().invoke(main, [*args, *SMALL[args[0]], "--json"])
        assert result.exit_code == 0, result.output
        documents[args[0]] = json.loads(result.stdout)
    assert documents["elbo"]["model"]["latent_dim"] == 12 and documents["elbo"]["model"]["kl"] == "monte_carlo"
    assert all(np.isfinite(p["iwae"]) for p in documents["elbo"]["points"])
    assert np.isfinite(documents["ais"]["summary"]["ais"]["mean"])
    elbo = [str(tmp_path / a) if a.endswith((".npy", ".safetensors")) or ".py:" in a else a for a in commands[0][1:]]
    batched = []  # the nets of q's and p's factors see padded rows: the same bits for any batch size
    for size in ("1", "3", "100"):
        result = CliRunner().invoke(main, [*elbo, *SMALL["elbo"], "--json", "--batch-size", size])
        batched.append(json.loads(result.stdout)["points"])
    assert batched[0] == batched[1] == batched[2] == documents["elbo"]["points"]
    latents = documents["latents"]["latents"]  # z2's factors condition on nothing: its KL in closed form
    (top, bottom) = latents["groups"]
    assert (top["name"], top["kl_kind"], top["kl_stderr"], top["units"]) == ("z2", "analytic", 0.0, [0, 4])
    assert (bottom["name"], bottom["kl_kind"], bottom["units"]) == ("z1", "analytic_given_draws", [4, 12])
    assert abs(top["kl"] + bottom["kl"] - latents["mean_kl"]) < 3 * documents["elbo"]["summary"]["kl"]["stderr"] + 1e-9
