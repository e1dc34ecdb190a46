"""vaeeval calibrate: the ELBO-optimal scale of a Gaussian likelihood, against probabilistic PCA's closed form."""

from __future__ import annotations

import json
import math

import jsonschema
import numpy as np
import pytest
import torch
from conftest import cli, linear, make_ppca
from torch import nn

from vaeeval import evaluate, load_data, load_model, save_model
from vaeeval.analysis.calibrate import calibrate
from vaeeval.results.schemas import schema

SAMPLES, SEED = 64, 3


@pytest.fixture
def written_wrong(tmp_path):
    """PPCA with sigma 0.3 whose file says sigma 1 (as a decoder trained with MSE would be written),
    its encoder the exact posterior at 0.3; and 300 held-out points drawn from the truth."""
    truth = make_ppca(dims=6, latent=2, sigma=0.3, seed=5)
    model = save_model(tmp_path / "wrong.safetensors", truth.encoder(), nn.Sequential(linear(truth.W, truth.b)),
                       likelihood={"family": "gaussian", "sigma": 1.0}, input_shape=[6], latent_dim=2)
    np.save(tmp_path / "heldout.npy", truth.sample(300, np.random.default_rng(8)).astype(np.float32))
    return truth, model, load_data(tmp_path / "heldout.npy", model)


def _expected_squares(truth, x):
    """E_q (x_d - W z - b)_d^2 per point and dimension under the encoder's q, in closed form, with their
    variance over single draws (for the Monte Carlo tolerance)."""
    mean, var = truth.posterior(x)
    residual = x - mean @ truth.W.T - truth.b
    spread = (truth.W**2) @ var  # [D]: Var of (W z)_d under q
    expected = residual**2 + spread
    # (r - s e)^2 with s e ~ N(0, spread): variance 4 r^2 spread + 2 spread^2
    return expected, 4 * residual**2 * spread + 2 * spread**2


def test_the_fitted_sigma_is_the_closed_form_elbo_optimum(written_wrong, tmp_path):
    truth, model, data = written_wrong
    x = np.asarray(data.array, dtype=np.float64)
    expected, variance = _expected_squares(truth, x)
    n, dims = x.shape

    shared = calibrate(model, data, tmp_path / "shared.safetensors", samples=SAMPLES, seed=SEED)
    target = expected.mean()
    stderr = math.sqrt(variance.sum() / SAMPLES) / (n * dims)
    assert shared.scale**2 == pytest.approx(target, abs=4 * stderr + 1e-6 * target)
    assert shared.after["elbo"] > shared.before["elbo"] + 1  # sigma 1 -> 0.3: several nats per point in 6 dimensions

    per_dim = calibrate(model, data, tmp_path / "per_dim.safetensors", samples=SAMPLES, seed=SEED, per_dimension=True)
    targets = expected.mean(axis=0)
    stderrs = np.sqrt(variance.sum(axis=0) / SAMPLES) / n
    np.testing.assert_array_less(np.abs(per_dim.scale**2 - targets), 4.5 * stderrs + 1e-6 * targets)
    assert per_dim.after["elbo"] >= shared.after["elbo"]  # more free parameters: at least as good on the same data


def test_the_calibrated_model_meets_its_identities_and_log_px(written_wrong, tmp_path):
    truth, model, data = written_wrong
    fitted = calibrate(model, data, tmp_path / "new.safetensors", samples=SAMPLES, seed=SEED)
    new = load_model(tmp_path / "new.safetensors")
    assert new.likelihood.spec["sigma"] == fitted.scale and new.calibration["data"]["digest"] == data.digest

    # on the same draws, the mean reconstruction term at the ELBO optimum is -(D/2)(1 + log 2 pi sigma^2)
    same = evaluate(new, data, samples=SAMPLES, seed=SEED)
    assert same.summary.recon.mean == pytest.approx(-3 * (1 + math.log(2 * math.pi * fitted.scale**2)), rel=1e-6)

    # its log p(x) is probabilistic PCA's at the fitted sigma (q is all but exact there)
    at_fit = make_ppca(dims=6, latent=2, sigma=fitted.scale, seed=5)
    x = np.asarray(data.array, dtype=np.float64)
    iwae = evaluate(new, data, samples=1000, seed=1).points.iwae
    difference = iwae - at_fit.log_px(x)
    assert abs(difference.mean()) < 4 * difference.std(ddof=1) / math.sqrt(len(x)) + 1e-3

    # a file written by hand with that sigma evaluates bit for bit alike
    by_hand = save_model(tmp_path / "hand.safetensors", truth.encoder(), nn.Sequential(linear(truth.W, truth.b)),
                         likelihood={"family": "gaussian", "sigma": fitted.scale}, input_shape=[6], latent_dim=2)
    other = evaluate(by_hand, data, samples=SAMPLES, seed=SEED)
    for name in ("elbo", "recon", "kl", "iwae", "ess"):
        np.testing.assert_array_equal(getattr(same.points, name), getattr(other.points, name))


def test_the_fit_does_not_depend_on_the_batch_size_and_keeps_every_tensor(written_wrong, tmp_path):
    _, model, data = written_wrong
    a = calibrate(model, data, tmp_path / "a.safetensors", samples=SAMPLES, seed=SEED, batch_size=7, per_dimension=True)
    b = calibrate(model, data, tmp_path / "b.safetensors", samples=SAMPLES, seed=SEED, batch_size=64, per_dimension=True)
    np.testing.assert_array_equal(a.scale, b.scale)
    from safetensors.torch import load_file

    old, new = load_file(str(model.path)), load_file(str(tmp_path / "a.safetensors"))
    assert set(new) == set(old) | {"likelihood.log_sigma"}
    assert all(torch.equal(old[name], new[name]) for name in old)


def test_the_command_writes_reports_and_notes_the_fit(written_wrong, tmp_path):
    _, model, _ = written_wrong
    heldout, out = tmp_path / "heldout.npy", tmp_path / "cal.safetensors"
    document = json.loads(cli("calibrate", model.path, heldout, "-o", out, "-k", "16", "--json").stdout)
    jsonschema.Draft202012Validator(schema("vaeeval.calibrate/1")).validate(document)
    assert document["family"] == "gaussian" and document["fitted"] == load_model(out).likelihood.spec["sigma"]
    inspected = cli("inspect", out).stdout
    assert "fitted by vaeeval calibrate" in " ".join(inspected.split())
    same = json.loads(cli("elbo", out, heldout, "-k", "4", "--json").stdout)
    assert any(note.startswith("optimistic") for note in same["model"]["notes"])
    np.save(tmp_path / "other.npy", np.load(heldout)[:20] + 0.01)
    other = json.loads(cli("elbo", out, tmp_path / "other.npy", "-k", "4", "--json").stdout)
    assert not any(note.startswith("optimistic") for note in other["model"]["notes"])
    compared = json.loads(cli("compare", model.path, out, heldout, "-k", "4", "--json").stdout)
    assert any(note.startswith("Optimistic: cal") for note in compared["notes"])


@pytest.mark.parametrize(
    ("case", "phrase"),
    [
        ("bernoulli", "has no free scale"),
        ("output is model", "--output"),
        ("per-dimension on bins", "one shared scale only"),
    ],
)
def test_what_calibrate_refuses_is_one_line_exit_2(written_wrong, bernoulli_model, binary_data, tmp_path, case, phrase):
    _, model, _ = written_wrong
    heldout = tmp_path / "heldout.npy"
    if case == "bernoulli":
        args = (bernoulli_model.path, binary_data, "-o", tmp_path / "x.safetensors")
    elif case == "output is model":
        args = (model.path, heldout, "-o", model.path)
    else:
        np.save(tmp_path / "grid.npy", np.round(np.clip(np.load(heldout), 0, 1) * 4) / 4)
        args = (model.path, tmp_path / "grid.npy", "-o", tmp_path / "x.safetensors", "--per-dimension")
    before = model.path.read_bytes()
    done = cli("calibrate", *args, code=2)
    assert phrase in done.stderr and done.stderr.count("\n") == 1
    assert model.path.read_bytes() == before


def _objective(model, data, sigma, criterion, density=False):
    from dataclasses import replace

    from vaeeval.analysis.calibrate import with_scale

    trial = replace(model, likelihood=with_scale(model, "sigma", sigma))
    return getattr(evaluate(trial, data, samples=SAMPLES, seed=SEED, density=density).summary, criterion).mean


@pytest.mark.parametrize("criterion", ["elbo", "iwae"])
def test_on_bins_and_for_the_iwae_the_search_finds_the_maximum(written_wrong, tmp_path, criterion):
    """No closed form there: the searched sigma beats its neighbours 0.1% away on the same draws, and on
    bins it differs from the density's closed form."""
    truth, model, data = written_wrong
    if criterion == "elbo":  # the same points on a grid of 9 levels over [0, 1]: scored by their bins
        x = np.clip(np.asarray(data.array), 0, 1)
        np.save(tmp_path / "grid.npy", (np.round(x * 8) / 8).astype(np.float32))
        data = load_data(tmp_path / "grid.npy", model)
        assert data.domain.kind == "discrete"
    fitted = calibrate(model, data, tmp_path / "s.safetensors", samples=SAMPLES, seed=SEED, criterion=criterion)
    assert fitted.record["criterion"] == criterion
    best = _objective(model, data, fitted.scale, criterion)
    for factor in (0.999, 1.001):
        assert best >= _objective(model, data, fitted.scale * factor, criterion)
    assert fitted.after[criterion] == pytest.approx(best, rel=1e-12)
    if criterion == "elbo":
        closed_form = calibrate(model, data, tmp_path / "d.safetensors", samples=SAMPLES, seed=SEED, density=True).scale
        assert abs(fitted.scale / closed_form - 1) > 1e-3


ARCH = """
import torch
from torch import nn


class MSEVAE(nn.Module):
    \"\"\"A linear VAE trained with a squared error: decode returns the mean, there is no sigma.\"\"\"

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(6, 4)
        self.decoder = nn.Linear(2, 6)

    def encode(self, x):
        mean, log_var = self.encoder(x).chunk(2, dim=-1)
        return mean, log_var

    def decode(self, z):
        return self.decoder(z)
"""


def test_an_arch_model_gets_its_weights_with_the_fitted_log_scale_and_the_sigma_to_pass(written_wrong, tmp_path):
    """--arch: the same fit as the format-1 file of the same network; the weights written again with the
    log-scale as one more tensor, and the printed --sigma, both give the calibrated ELBO."""
    from safetensors.torch import load_file, save_file

    truth, model, data = written_wrong
    (tmp_path / "mse.py").write_text(ARCH)
    weights = load_file(str(model.path))
    save_file({"encoder.weight": weights["encoder.0.weight"], "encoder.bias": weights["encoder.0.bias"],
               "decoder.weight": weights["decoder.0.weight"], "decoder.bias": weights["decoder.0.bias"]},
              str(tmp_path / "w.safetensors"))
    heldout = tmp_path / "heldout.npy"
    arch = ["--arch", f"{tmp_path / 'mse.py'}:MSEVAE", "--likelihood", "gaussian"]
    done = json.loads(cli("calibrate", tmp_path / "w.safetensors", heldout, "-o", tmp_path / "w2.safetensors", "-k", "32",
                          "--json", *arch, "--sigma", "1").stdout)
    as_file = calibrate(model, data, tmp_path / "f.safetensors", samples=32, seed=0)
    assert done["fitted"] == pytest.approx(as_file.scale, rel=1e-6)
    assert done["arch_options"] == ["--log-sigma-tensor", "calibrated_log_scale"]
    with_tensor = json.loads(cli("elbo", tmp_path / "w2.safetensors", heldout, "-k", "32", "--json", *arch,
                                 "--log-sigma-tensor", "calibrated_log_scale").stdout)
    with_sigma = json.loads(cli("elbo", tmp_path / "w.safetensors", heldout, "-k", "32", "--json", *arch,
                                "--sigma", repr(done["fitted"])).stdout)
    assert with_tensor["summary"]["elbo"]["mean"] == pytest.approx(done["after"]["elbo"], rel=1e-9)
    assert with_sigma["summary"]["elbo"]["mean"] == pytest.approx(done["after"]["elbo"], rel=1e-6)
    assert set(load_file(str(tmp_path / "w2.safetensors"))) == {*load_file(str(tmp_path / "w.safetensors")), "calibrated_log_scale"}



# ---------------------------------------------------------------- the reconstruction term written out (--explain)


def test_recon_terms_of_a_fixed_sigma_gaussian_add_up_and_its_sse_is_the_closed_form(written_wrong, tmp_path):
    truth, model, data = written_wrong
    document = json.loads(cli("elbo", model.path, tmp_path / "heldout.npy", "-k", "256", "--json").stdout)
    terms = document["summary"]["recon_terms"]
    assert sum(term["mean"] for term in terms["terms"]) == pytest.approx(document["summary"]["recon"]["mean"], rel=1e-12)
    x = np.asarray(data.array, dtype=np.float64)
    expected, variance = _expected_squares(truth, x)
    # the file's sigma is 1: the SSE is E_q ||x - W z - b||^2 under the encoder, per point, averaged
    stderr = math.sqrt(variance.sum() / 256) / len(x)
    assert terms["loss"]["name"] == "SSE"
    assert terms["loss"]["mean"] == pytest.approx(expected.sum(axis=1).mean(), abs=4 * stderr + 1e-5)
    assert terms["mse_per_dim"]["mean"] == pytest.approx(terms["loss"]["mean"] / 6, rel=1e-12)
    implied = terms["implied_sigma"]
    assert implied["in_file"] == 1.0 and implied["mean_reduced_mse"] == pytest.approx(math.sqrt(3))
    assert implied["fitted_by_calibrate"] == pytest.approx(math.sqrt(expected.mean()), rel=0.02)
    table = cli("elbo", model.path, tmp_path / "heldout.npy", "-k", "16", "--explain").stdout
    assert "-E[SSE]/(2 sigma^2)" in table and "sum-reduced MSE" in table


def test_recon_terms_of_a_bernoulli_are_its_bce_on_the_same_draws(bernoulli_model, binary_data):
    from vaeeval.core.rng import standard_normal

    document = json.loads(cli("elbo", bernoulli_model.path, binary_data, "-k", "32", "--seed", "4", "--json").stdout)
    terms = document["summary"]["recon_terms"]
    data = load_data(binary_data, bernoulli_model)
    x = torch.as_tensor(np.array(data.array), dtype=torch.float32)
    with torch.inference_mode():
        mean, log_var = bernoulli_model.encode(x)
        eps = standard_normal(4, np.arange(data.n), 0, 32, bernoulli_model.latent_dim)
        z = (mean.double()[:, None] + (0.5 * log_var.double()).exp()[:, None] * eps).float()
        logits = bernoulli_model.decode(z.reshape(-1, z.shape[-1]))[:, 0].double().reshape(data.n, 32, -1)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, x.double()[:, None].expand_as(logits), reduction="none").sum(-1).mean(-1)
    assert terms["loss"]["name"] == "BCE"
    assert terms["loss"]["mean"] == pytest.approx(bce.mean().item(), rel=1e-6)


def test_recon_terms_that_need_the_second_pass_say_so_without_explain(tmp_path):
    samples = "sample_models"
    binned = json.loads(cli("elbo", f"{samples}/digits_gaussian.safetensors", f"{samples}/digits_grey_test.npy", "-k", "4",
                            "--limit", "5", "--json").stdout)["summary"]["recon_terms"]
    assert binned["terms"] is None and "bin" in binned["why"] and "--explain computes it" in binned["why"]
    cb = json.loads(cli("elbo", f"{samples}/digits_continuous_bernoulli.safetensors", f"{samples}/digits_grey_test.npy",
                        "-k", "4", "--limit", "5", "--density", "--json").stdout)["summary"]["recon_terms"]
    assert cb["terms"] is None and "log C" in cb["why"] and "--explain computes it" in cb["why"]
    # (tests/test_recon_terms.py: with --explain, every family's split)
