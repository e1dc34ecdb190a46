"""AIS and BDMC against exact answers: probabilistic PCA in closed form, a 1-D latent by quadrature.

Monte Carlo checks allow 4 standard errors, taken from the chains' own weights
(the delta-method standard error of log mean w), plus AIS's known downward bias
of about se²/2 (the log of an unbiased estimate of p(x)).
"""

from __future__ import annotations

import json
import math

import jsonschema
import numpy as np
import pytest
import torch
from conftest import FAMILIES, PPCA, cli, family_data, make_ppca, one_dimensional_bernoulli
from conftest import linear as conftest_linear

from vaeeval import evaluate
from vaeeval.estimators.annealing.ais import AISOptions, evaluate_ais
from vaeeval.estimators.annealing.bdmc import run_bdmc, simulate
from vaeeval.estimators.importance.evaluate import EvaluationOptions
from vaeeval.results.schemas import schema

Z = 4.0
# every transition kernel and schedule: (mass matrix, schedule)
KERNELS = [("identity", "sigmoid"), ("diagonal", "sigmoid"), ("identity", "adaptive"), ("diagonal", "adaptive")]


def _within_error(estimate: np.ndarray, stderr: np.ndarray, truth: np.ndarray) -> bool:
    """The mean over points of ais - log p(x), bias-corrected, within Z standard errors of 0."""
    error = np.mean(estimate + stderr**2 / 2 - truth)
    return abs(error) < Z * math.sqrt(np.sum(stderr**2)) / len(truth) + 1e-4


@pytest.mark.parametrize("steps", [1, 3, 30])
@pytest.mark.parametrize("init", ["encoder", "prior"])
def test_exact_posterior_encoder_gives_zero_variance_weights_equal_to_log_px(ppca: PPCA, tmp_path, steps, init):
    """With q0 = p(z|x), log γ(z) - log q0(z) = log p(x) everywhere: every chain's weight is exact, for any T.

    From the prior (q0 = p(z)) only T = 1 is plain importance sampling; the test then asks
    for an unbiased estimate instead (below).
    """
    model = ppca.save(tmp_path / "ppca.safetensors")
    x = ppca.sample(12, np.random.default_rng(2))
    result = evaluate_ais(model, x, steps=steps, leapfrog=4, chains=8, init=init, samples=10, seed=1)
    if init == "encoder":
        np.testing.assert_allclose(result.points.ais, ppca.log_px(x), atol=2e-4, rtol=0)
        assert np.all(result.points.ais_stderr < 1e-4)
    else:
        assert np.isfinite(result.points.ais).all()


@pytest.mark.parametrize(("init", "mass", "schedule"), [
    ("encoder", "identity", "sigmoid"), ("prior", "identity", "sigmoid"), ("auto", "identity", "sigmoid"),
    ("encoder", "diagonal", "sigmoid"), ("encoder", "identity", "adaptive"), ("auto", "diagonal", "adaptive"),
])
def test_poor_encoder_iwae_is_over_a_nat_low_while_ais_is_within_its_error(tmp_path, init, mass, schedule):
    ppca = make_ppca(dims=6, latent=2, sigma=0.5)
    model = ppca.save(tmp_path / "poor.safetensors", mean_scale=0.5, log_var_shift=-3.0)  # shifted and too narrow
    x = ppca.sample(16, np.random.default_rng(3))
    truth = ppca.log_px(x)
    iwae = evaluate(model, x, samples=1000, seed=0).points.iwae
    assert np.mean(truth - iwae) > 1.0
    result = evaluate_ais(model, x, steps=100, leapfrog=5, chains=32, init=init, samples=1000, seed=0, mass=mass,
                          schedule=schedule)
    assert _within_error(result.points.ais, result.points.ais_stderr, truth)
    assert np.all(result.points.ais <= truth + Z * result.points.ais_stderr + 1e-3)
    assert 0.3 < result.summary.acceptance.mean < 0.98


@pytest.mark.parametrize(("mass", "schedule"), KERNELS)
def test_one_dimensional_bernoulli_against_quadrature(tmp_path, mass, schedule):
    exact = one_dimensional_bernoulli(tmp_path, points=16, encoder_shift=1.0)
    for init in ("encoder", "prior", "auto") if (mass, schedule) == KERNELS[0] else ("encoder", "auto"):
        result = evaluate_ais(exact.model, exact.x.astype(np.float32), steps=60, leapfrog=5, chains=32, init=init,
                              samples=100, seed=2, mass=mass, schedule=schedule)
        assert _within_error(result.points.ais, result.points.ais_stderr, exact.log_px), init


@pytest.mark.parametrize(("step_size", "mass", "schedule", "init"), [
    *((None, mass, schedule, "encoder") for mass, schedule in KERNELS), (None, "diagonal", "adaptive", "auto"),
    # a fixed ε for the identity mass only: 0.3 of q0's widths barely moves these chains, whose weights are then
    # too heavy-tailed for 3000 of them to estimate their own standard error (the kernel: test_annealing)
    (0.3, "identity", "sigmoid", "encoder"), (0.3, "identity", "adaptive", "encoder"), (0.3, "identity", "sigmoid", "auto"),
])
def test_exp_ais_is_unbiased_for_p_x_with_tuned_or_fixed_step_sizes(tmp_path, step_size, mass, schedule, init):
    """E[w] = p(x) exactly: the mean of many chains' weights over p(x) is 1 within its standard error.

    With ``step_size=None`` a pilot tunes ε per point and step and the run uses it frozen; a
    step size adapted on the reported chains themselves would make the transitions depend on
    their past and break this.
    """
    exact = one_dimensional_bernoulli(tmp_path, points=6, encoder_shift=1.5)  # a poor start: weights vary
    chains = 3000
    result = evaluate_ais(exact.model, exact.x.astype(np.float32), steps=4, leapfrog=3, chains=chains,
                          step_size=step_size, pilot_chains=8, samples=10, seed=5, mass=mass, schedule=schedule, init=init)
    ratio = np.exp(result.points.ais - exact.log_px)  # mean over chains of w / p(x)
    stderr = result.points.ais_stderr * ratio  # delta method, back from the log
    assert np.all(stderr > 1e-3), "the test needs weights that vary"
    assert np.all(np.abs(ratio - 1) < Z * stderr)
    pooled = np.sqrt(np.sum(stderr**2)) / len(ratio)
    assert abs(ratio.mean() - 1) < Z * pooled


@pytest.mark.parametrize(("mass", "schedule", "init"), [("identity", "sigmoid", "encoder"), ("diagonal", "adaptive", "auto")])
def test_bdmc_sandwiches_log_px_and_the_gap_shrinks_as_steps_grow(tmp_path, mass, schedule, init):
    ppca = make_ppca(dims=6, latent=2, sigma=0.5)
    model = ppca.save(tmp_path / "poor.safetensors", mean_scale=0.5, log_var_shift=-2.0)
    gaps = []
    for steps in (2, 20, 200):
        annealing = AISOptions(steps=steps, leapfrog=5, chains=8, mass=mass, schedule=schedule, init=init)
        result, simulated = run_bdmc(model, 24, annealing, EvaluationOptions(samples=50))
        truth = ppca.log_px(simulated.x.astype(np.float64))
        points, n = result.points, len(truth)
        lower_se, upper_se = points.lower.std(ddof=1) / math.sqrt(n), points.upper.std(ddof=1) / math.sqrt(n)
        assert points.lower.mean() <= truth.mean() + Z * lower_se
        assert points.upper.mean() >= truth.mean() - Z * upper_se
        assert np.all(points.gap == points.upper - points.lower)
        gaps.append(points.gap.mean())
    assert gaps[0] > max(gaps[1:]) and 0 < gaps[2] < 0.5  # from T = 20 on, both gaps are within their noise


def test_simulated_points_follow_the_model(tmp_path):
    """x ~ p(x|z), z ~ p(z): for PPCA, x ~ N(b, W W^T + sigma^2 I)."""
    ppca = make_ppca(dims=3, latent=2, sigma=0.5)
    simulated = simulate(ppca.save(tmp_path / "ppca.safetensors"), 4000, seed=3)
    cov = ppca.W @ ppca.W.T + 0.25 * np.eye(3)
    assert np.abs(simulated.x.mean(0) - ppca.b).max() < Z * math.sqrt(cov.diagonal().max() / 4000)
    np.testing.assert_allclose(np.cov(simulated.x.T), cov, atol=0.15)
    assert simulated.z.shape == (4000, 2) and abs(simulated.z.std() - 1) < 0.05


@pytest.mark.parametrize(("mass", "schedule", "init"), [(*kernel, "encoder") for kernel in KERNELS] + [("diagonal", "adaptive", "auto")])
def test_same_numbers_whatever_the_batch(bernoulli_model, binary_data, mass, schedule, init):
    from vaeeval import load_data

    data = load_data(binary_data, bernoulli_model)
    runs = [evaluate_ais(bernoulli_model, data, steps=6, leapfrog=3, chains=4, batch_size=b, samples=20, seed=9,
                         mass=mass, schedule=schedule, init=init)
            for b in (1, 5, 23)]
    for other in runs[1:]:
        for name in ("ais", "ais_stderr", "acceptance", "step_size", "elbo", "iwae"):
            assert np.array_equal(getattr(runs[0].points, name), getattr(other.points, name), equal_nan=True), name


def test_same_numbers_whatever_the_batch_for_a_binned_gaussian(tmp_path):
    """The general path (autograd through the bin log-probabilities) keeps every point to itself too."""
    import torch
    from torch import nn

    from vaeeval import save_model

    torch.manual_seed(0)
    model = save_model(tmp_path / "g.safetensors", nn.Sequential(nn.Linear(5, 6)),
                       nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 5)),
                       likelihood={"family": "gaussian", "sigma": 0.3}, input_shape=[5], latent_dim=3,
                       data={"domain": "discrete", "levels": 9})
    x = (np.random.default_rng(0).integers(0, 9, (11, 5)) / 8).astype(np.float32)
    runs = [evaluate_ais(model, x, steps=5, leapfrog=2, chains=3, batch_size=b, samples=8, seed=2) for b in (1, 4, 11)]
    assert runs[0].scoring.levels == 9
    for other in runs[1:]:
        assert np.array_equal(runs[0].points.ais, other.points.ais)


# ---------------------------------------------------------------- the command line


def test_ais_json_is_its_documented_contract(bernoulli_model, binary_data):
    out = cli("ais", bernoulli_model.path, binary_data, "--steps", "5", "--leapfrog", "2", "--chains", "3", "-k", "20",
              "--limit", "6", "--json")
    document = json.loads(out.stdout)
    jsonschema.Draft202012Validator(schema("vaeeval.ais/1")).validate(document)
    assert document["settings"]["steps"] == 5 and document["settings"]["chains"] == 3
    assert [p["index"] for p in document["points"]] == list(range(6))
    assert set(document["points"][0]) >= {"index", "ais", "ais_stderr", "acceptance", "elbo", "iwae"}
    assert document["summary"]["ais"]["mean"] == pytest.approx(np.mean([p["ais"] for p in document["points"]]))
    assert document["summary"]["cost"]["pilot_gradients"] > 0
    assert document["summary"]["prior_starts"] == sum(point["from_prior"] for point in document["points"])


def test_ais_results_from_before_the_start_column_still_merge(bernoulli_model, binary_data, tmp_path):
    """A results file whose point lines lack ``from_prior`` (an older vaeeval) merges; its count is null."""
    out = tmp_path / "run.jsonl"
    cli("ais", bernoulli_model.path, binary_data, "--steps", "3", "--chains", "2", "--leapfrog", "1", "-k", "8", "--limit", "4",
        "--output", out)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    header, points = lines[0], [line for line in lines[1:] if "index" in line]
    for point in points:
        del point["from_prior"]
    older = tmp_path / "older.jsonl"
    older.write_text("".join(json.dumps(line) + "\n" for line in (header, *points)))  # unfinished: no summary line
    merged = json.loads(cli("merge", older, "--json").stdout)
    assert merged["summary"]["prior_starts"] is None and all("from_prior" not in point for point in merged["points"])


def test_ais_table_shows_elbo_iwae_and_ais_side_by_side(bernoulli_model, binary_data):
    out = cli("ais", bernoulli_model.path, binary_data, "--steps", "4", "--chains", "2", "--leapfrog", "2", "-k", "10").stdout
    for phrase in ("elbo", "iwae", "ais − iwae", "acceptance", "Cost:", "pilot", "largest ais − iwae"):
        assert phrase in out, phrase


def test_bdmc_json_and_table(bernoulli_model, tmp_path):
    saved = tmp_path / "simulated.npz"
    out = cli("bdmc", bernoulli_model.path, "--n", "5", "--steps", "4", "--chains", "2", "--leapfrog", "2", "-k", "10",
              "--save-data", saved, "--json")
    document = json.loads(out.stdout)
    jsonschema.Draft202012Validator(schema("vaeeval.bdmc/1")).validate(document)
    assert document["summary"]["gap"]["mean"] == pytest.approx(document["summary"]["upper"]["mean"] - document["summary"]["lower"]["mean"])
    assert [p["index"] for p in document["points"]] == list(range(5))
    with np.load(saved) as archive:
        assert archive["x"].shape == (5, 6) and archive["z"].shape == (5, 2)
        assert set(np.unique(archive["x"])) <= {0.0, 1.0}
    table = cli("bdmc", bernoulli_model.path, "--n", "4", "--steps", "2", "--chains", "2", "--leapfrog", "1", "-k", "5").stdout
    assert "too weak" in table or "within about" in table


def test_ais_shards_merge_into_the_single_run(bernoulli_model, binary_data, tmp_path):
    common = ["--steps", "4", "--chains", "3", "--leapfrog", "2", "-k", "16", "--limit", "9"]
    whole = json.loads(cli("ais", bernoulli_model.path, binary_data, *common, "--json").stdout)
    for shard in ("0/2", "1/2"):
        cli("ais", bernoulli_model.path, binary_data, *common, "--shard", shard, "--output", tmp_path / f"{shard[0]}.jsonl")
    merged = json.loads(cli("merge", tmp_path / "0.jsonl", tmp_path / "1.jsonl", "--json").stdout)
    assert merged["schema"] == "vaeeval.ais/1"
    assert merged["points"] == whole["points"] and merged["summary"] == whole["summary"]


def test_ais_output_resumes_to_the_same_numbers(bernoulli_model, binary_data, tmp_path):
    common = ["--steps", "3", "--chains", "2", "--leapfrog", "1", "-k", "8", "--batch-size", "4"]
    out = tmp_path / "run.jsonl"
    cli("ais", bernoulli_model.path, binary_data, *common, "--output", out)
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:3]) + "\n")  # a run stopped after two points
    resumed = json.loads(cli("ais", bernoulli_model.path, binary_data, *common, "--output", out, "--resume", "--json").stdout)
    whole = json.loads(cli("ais", bernoulli_model.path, binary_data, *common, "--json").stdout)
    assert resumed["points"] == whole["points"]


def test_fail_under_gates_the_ais_mean(bernoulli_model, binary_data):
    common = ["ais", bernoulli_model.path, binary_data, "--steps", "2", "--chains", "2", "--leapfrog", "1", "-k", "4"]
    assert cli(*common, "--fail-under", "ais=-1000").exit_code == 0
    failed = cli(*common, "--fail-under", "ais=-1", code=1)
    assert "ais mean" in failed.stderr


@pytest.mark.parametrize(("options", "phrase"), [
    (["--steps", "0"], "--steps"),
    (["--chains", "0"], "--chains"),
    (["--leapfrog", "0"], "--leapfrog"),
    (["--pilot-chains", "0"], "--pilot-chains"),
    (["--schedule", "cosine"], "--schedule"),
    (["--init", "uniform"], "--init"),
    (["--step-size", "0"], "--step-size"),
    (["--step-size", "nan"], "--step-size"),
    (["--step-size", "1.5"], "--step-size"),  # past 0.5 only in units of q0's widths (--mass diagonal)
    (["--mass", "dense"], "--mass"),
    (["--schedule", "adaptive", "--pilot-chains", "1"], "--pilot-chains"),
    (["--fail-under", "recon=-3"], "--fail-under"),
])
def test_bad_ais_options_are_one_line_exit_2(bernoulli_model, binary_data, options, phrase):
    result = cli("ais", bernoulli_model.path, binary_data, *options, code=2)
    assert phrase in result.stderr and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_library_names_the_parameters(bernoulli_model, binary_data):
    from vaeeval import VaeevalError

    with pytest.raises(VaeevalError, match="^steps must be an integer of at least 1"):
        evaluate_ais(bernoulli_model, np.zeros((2, 6), np.float32), steps=0)
    with pytest.raises(VaeevalError, match="^schedule 'cosine'"):
        evaluate_ais(bernoulli_model, np.zeros((2, 6), np.float32), schedule="cosine")


@pytest.mark.parametrize(("likelihood", "outputs", "kind"), FAMILIES, ids=[f[0]["family"] + str(f[1]) for f in FAMILIES])
def test_every_family_and_activation_anneals_the_same_bits_in_any_batch(tmp_path, likelihood, outputs, kind):
    """Gradients flow through every layer type and family (bin probabilities included), point by point."""
    import torch
    from torch import nn

    from vaeeval import save_model

    torch.manual_seed(0)
    dims = 12
    encoder = nn.Sequential(nn.Linear(dims, 16), nn.ELU(), nn.Linear(16, 6))
    decoder = nn.Sequential(
        nn.Linear(3, 16), nn.SiLU(), nn.Linear(16, 16), nn.Softplus(), nn.Linear(16, 16), nn.Sigmoid(),
        nn.Linear(16, 16), nn.LeakyReLU(0.1), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16), nn.Tanh(),
        nn.Linear(16, 16), nn.ELU(), nn.Linear(16, outputs * dims),
    )
    model = save_model(tmp_path / "m.safetensors", encoder, decoder, likelihood=likelihood, input_shape=[dims], latent_dim=3)
    data = family_data(kind, 13, dims)
    for options in ({}, {"density": True}) if kind == "grey" else ({},):
        runs = [evaluate_ais(model, data, steps=5, leapfrog=2, chains=3, samples=8, seed=1, batch_size=b, **options)
                for b in (13, 1, 5)]
        assert np.isfinite(runs[0].points.ais).all() and runs[0].summary.acceptance.mean > 0.2
        for other in runs[1:]:
            assert np.array_equal(runs[0].points.ais, other.points.ais), options


def test_a_mixture_prior_anneals_from_the_prior_and_from_the_encoder(tmp_path):
    """A mixture of Gaussians as p(z) on a linear-Gaussian decoder: log p(x) is a mixture of Gaussians too."""
    import torch
    from scipy.special import logsumexp
    from scipy.stats import multivariate_normal
    from torch import nn

    from vaeeval import save_model

    ppca = make_ppca(dims=4, latent=2, sigma=0.5)
    means, logits = torch.tensor([[-2.0, 0.0], [2.0, 1.0]]), torch.tensor([0.3, -0.3])
    model = save_model(
        tmp_path / "mix.safetensors", ppca.encoder(), nn.Sequential(conftest_linear(ppca.W, ppca.b)),
        likelihood={"family": "gaussian", "sigma": ppca.sigma}, input_shape=[4], latent_dim=2,
        prior={"family": "mixture_of_gaussians", "logits": logits, "means": means, "log_vars": torch.full((2, 2), -1.0)},
    )
    x = ppca.sample(10, np.random.default_rng(4))
    weights = torch.log_softmax(logits, 0).numpy()
    cov = 0.25 * np.eye(4)
    truth = logsumexp([w + multivariate_normal(ppca.W @ m + ppca.b, ppca.W @ np.diag(np.full(2, np.exp(-1.0))) @ ppca.W.T + cov).logpdf(x)
                       for w, m in zip(weights, means.numpy(), strict=True)], axis=0)
    for init in ("prior", "encoder"):
        result = evaluate_ais(model, x, steps=200, leapfrog=5, chains=32, init=init, samples=100, seed=2)
        assert _within_error(result.points.ais, result.points.ais_stderr, truth), init


def test_the_adaptive_schedule_is_fitted_in_the_pilot_and_reported():
    """``--schedule adaptive``: the pilot is run (and counted) even with a fixed ε, and the settings say so."""
    from conftest import make_ppca as _make

    ppca = _make(dims=4, latent=2, sigma=0.5)
    x = ppca.sample(3, np.random.default_rng(0))
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        model = ppca.save(Path(folder) / "m.safetensors", mean_scale=0.5, log_var_shift=-2.0)
        fixed = evaluate_ais(model, x, steps=10, leapfrog=2, chains=4, step_size=0.1, schedule="adaptive", samples=5,
                             init="encoder")
        plain = evaluate_ais(model, x, steps=10, leapfrog=2, chains=4, step_size=0.1, samples=5, init="encoder")
    assert fixed.cost.pilot == 4 * (1 + 9 * 2) and plain.cost.pilot == 0
    assert fixed.settings.schedule == "adaptive" and fixed.settings.mass == "identity"
    assert not np.array_equal(fixed.points.ais, plain.points.ais)  # another schedule, other numbers
    np.testing.assert_array_equal(fixed.points.step_size, plain.points.step_size)  # ε stays fixed


def test_init_auto_asks_the_priors_pilot_for_a_mean_log_weight_a_quarter_nat_ahead():
    """In nats, not in the pilots' standard errors: encoder chains stuck together (a tiny spread) lose to
    widely spread prior chains whose mean is clearly higher, and pilots within a quarter nat keep q(z|x)."""
    from vaeeval.estimators.annealing.ais import AUTO_MARGIN, prior_is_better

    stuck = torch.tensor([[-30.0, -30.01, -29.99, -30.0]], dtype=torch.float64)
    assert prior_is_better(stuck, torch.tensor([[-10.0, -50.0, -12.0, -36.0]], dtype=torch.float64)).item()  # 3 nats ahead, SE 10
    close = torch.tensor([[-10.0, -10.4, -9.8, -10.2]], dtype=torch.float64)
    assert not prior_is_better(close, close + 0.9 * AUTO_MARGIN).item() and prior_is_better(close, close + 1.1 * AUTO_MARGIN).item()


def test_init_auto_starts_each_point_where_its_pilot_had_the_clearly_higher_mean_log_weight(tmp_path):
    """Each point's numbers are, bit for bit, those of the run from the encoder or of the run from the prior;
    with an exact q(z|x) (every encoder chain's weight is p(x)) the encoder's, with one far too narrow and
    shifted mostly the prior's (where the pilots cannot be told apart, q(z|x) is kept). Both pilots are
    counted in the cost."""
    ppca = make_ppca(dims=6, latent=2, sigma=0.5)
    x = ppca.sample(12, np.random.default_rng(4))
    exact = ppca.save(tmp_path / "exact.safetensors")
    poor = ppca.save(tmp_path / "poor.safetensors", mean_scale=0.2, log_var_shift=-6.0)
    settings = {"steps": 8, "leapfrog": 3, "chains": 8, "samples": 10, "seed": 1}
    chosen = {}
    for name, model in (("exact", exact), ("poor", poor)):
        auto, encoder, prior = (evaluate_ais(model, x, init=init, **settings) for init in ("auto", "encoder", "prior"))
        from_encoder, from_prior = auto.points.ais == encoder.points.ais, auto.points.ais == prior.points.ais
        assert np.all(from_encoder | from_prior), name
        assert np.array_equal(auto.points.from_prior, ~from_encoder), name  # each point's start, as reported
        assert not encoder.points.from_prior.any() and prior.points.from_prior.all()
        assert auto.cost.pilot == encoder.cost.pilot + prior.cost.pilot
        chosen[name] = from_encoder.mean()
    assert chosen["exact"] == 1 and chosen["poor"] < 0.5
