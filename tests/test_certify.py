"""``ais --target-gap``: BDMC at growing settings certifies the gap, then AIS runs at the settings reached."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import jsonschema
import numpy as np
import pytest
from conftest import cli, make_ppca

from vaeeval import evaluate
from vaeeval.errors import VaeevalError
from vaeeval.estimators.annealing.ais import AISOptions
from vaeeval.estimators.annealing.bdmc import run_bdmc
from vaeeval.estimators.annealing.certify import STILL_RISING, Z_UPPER, ais_next_step, certify
from vaeeval.estimators.importance.evaluate import EvaluationOptions
from vaeeval.results.schemas import schema

# one pilot (from q(z|x)) on the sigmoid schedule, so that a stage's cost is the sum below
FIRST = AISOptions(steps=4, leapfrog=2, chains=4, pilot_chains=4, init="encoder", schedule="sigmoid")
POINTS = 10
SETTINGS = ("--steps", "4", "--leapfrog", "2", "--chains", "4", "--pilot-chains", "4", "-k", "10", "--init", "encoder",
            "--schedule", "sigmoid")


def gradients(steps: int, leapfrog: int, chains: int = 4, pilot: int = 4, points: int = POINTS) -> int:
    """One BDMC stage by hand: pilot chains once, forward and reverse chains, 1 + (T - 1) L gradients a chain."""
    per_chain = 1 + (steps - 1) * leapfrog
    return points * (pilot * per_chain + 2 * chains * per_chain)


@pytest.fixture
def poor(tmp_path):
    """A PPCA model with a shifted, too narrow encoder: weak AIS settings leave a gap of several nats."""
    ppca = make_ppca(dims=6, latent=2, sigma=0.5)
    model = ppca.save(tmp_path / "poor.safetensors", mean_scale=0.5, log_var_shift=-2.0)
    data = tmp_path / "data.npy"
    np.save(data, ppca.sample(7, np.random.default_rng(5)).astype(np.float32))
    return model, data


def test_stages_grow_until_the_upper_bound_is_below_the_target(poor):
    model, _ = poor
    certificate = certify(model, FIRST, EvaluationOptions(samples=10), 0.6, 10**7, points=POINTS)
    stages = certificate.stages
    assert certificate.reached and len(stages) >= 3
    assert (stages[0].steps, stages[0].leapfrog) == (4, 2) and stages[1].steps == 8  # T doubles first
    for before, after in zip(stages, stages[1:], strict=False):  # each stage doubles T or L, never both
        assert (after.steps, after.leapfrog) in ((2 * before.steps, before.leapfrog), (before.steps, 2 * before.leapfrog))
    for stage in stages:
        assert stage.cost == gradients(stage.steps, stage.leapfrog)
        assert stage.upper == pytest.approx(stage.gap + Z_UPPER * stage.stderr, abs=1e-12)
    assert certificate.cost == sum(gradients(s.steps, s.leapfrog) for s in stages)
    assert stages[-1].upper < 0.6 and all(s.upper >= 0.6 for s in stages[:-1])
    # the final stage is an ordinary BDMC run at its settings, bit for bit
    direct, _ = run_bdmc(model, POINTS, certificate.settings(FIRST), EvaluationOptions(samples=10))
    assert direct.summary.gap.mean == stages[-1].gap and direct.summary.gap.stderr == stages[-1].stderr


def test_a_budget_that_runs_out_stops_before_the_stage_that_would_exceed_it(poor):
    model, _ = poor
    budget = gradients(4, 2) + gradients(8, 2) + gradients(16, 2) - 1
    certificate = certify(model, FIRST, EvaluationOptions(samples=10), 0.6, budget, points=POINTS)
    assert not certificate.reached and [s.steps for s in certificate.stages] == [4, 8]
    assert certificate.cost <= budget and certificate.final.upper >= 0.6


def test_a_budget_in_seconds_runs_a_stage_only_when_its_predicted_time_fits(poor):
    model, _ = poor
    ticks = iter(range(0, 1000, 10))  # a clock read before and after each stage: every stage takes 10 s
    certificate = certify(model, FIRST, EvaluationOptions(samples=10), 0.01, None, max_seconds=45.0, points=POINTS,
                          clock=lambda: float(next(ticks)))
    # after 2 stages (20 s over 2,640 gradient evaluations), the third (3,720) is predicted at 28.2 s: 48.2 > 45
    assert [s.steps for s in certificate.stages] == [4, 8] and not certificate.reached
    assert [s.seconds for s in certificate.stages] == [10.0, 10.0]
    assert certificate.to_record()["max_seconds"] == 45.0 and certificate.to_record()["max_cost"] is None
    assert "--max-cost 45s" in certificate.failure()
    ticks = iter(range(0, 1000, 10))
    longer = certify(model, FIRST, EvaluationOptions(samples=10), 0.01, None, max_seconds=49.0, points=POINTS,
                     clock=lambda: float(next(ticks)))
    assert [s.steps for s in longer.stages[:3]] == [4, 8, 16]


@pytest.mark.parametrize("target, budget, points", [(0.0, 10**7, 10), (-1.0, 10**7, 10), (math.nan, 10**7, 10),
                                                    (math.inf, 10**7, 10), (0.5, gradients(4, 2) - 1, 10),
                                                    (0.5, 10**7, 1)])
def test_bad_targets_and_budgets_are_refused_before_anything_runs(poor, target, budget, points):
    model, _ = poor
    with pytest.raises(VaeevalError):
        certify(model, FIRST, EvaluationOptions(samples=10), target, budget, points=points)


def test_cli_certifies_then_runs_plain_ais_at_the_settings_reached(poor):
    model, data = poor
    out = cli("ais", model.path, data, *SETTINGS, "--target-gap", "0.6", "--certify-points", POINTS, "--json")
    document = json.loads(out.stdout)
    jsonschema.Draft202012Validator(schema("vaeeval.ais/1")).validate(document)
    certificate = document["certificate"]
    assert certificate["reached"] and certificate["upper"] < 0.6 and certificate["simulated_points"] == POINTS
    assert certificate["cost"] == sum(stage["cost"] for stage in certificate["stages"]) <= certificate["max_cost"]
    assert document["settings"]["steps"] == certificate["steps"] > 4
    plain = json.loads(cli("ais", model.path, data, *SETTINGS[4:], "--steps", certificate["steps"],
                           "--leapfrog", certificate["leapfrog"], "--json").stdout)
    assert "certificate" not in plain
    assert document["points"] == plain["points"] and document["summary"] == plain["summary"]  # bit for bit
    table = cli("ais", model.path, data, *SETTINGS, "--target-gap", "0.6", "--certify-points", POINTS).stdout
    assert "Certificate: BDMC gap on 10 simulated points" in table and "Target reached" in table


def test_cli_budget_exhausted_exits_1_with_one_line_and_still_prints_the_results(poor):
    model, data = poor
    budget = gradients(4, 2) + gradients(8, 2)
    out = cli("ais", model.path, data, *SETTINGS, "--target-gap", "0.01", "--max-cost", budget,
              "--certify-points", POINTS, "--json", code=1)
    assert len(out.stderr.strip().splitlines()) == 1 and "target gap 0.01 not reached" in out.stderr
    assert f"--max-cost {budget:,}" in out.stderr
    document = json.loads(out.stdout)
    jsonschema.Draft202012Validator(schema("vaeeval.ais/1")).validate(document)
    assert not document["certificate"]["reached"] and document["settings"]["steps"] == 8
    assert len(document["points"]) == 7


@pytest.mark.parametrize("extra", [("--target-gap", "0"), ("--target-gap", "-0.5"), ("--target-gap", "nan"),
                                   ("--target-gap", "0.5", "--max-cost", "10"),
                                   ("--target-gap", "0.5", "--certify-points", "1"),
                                   ("--target-gap", "0.5", "--max-cost", "0s"), ("--target-gap", "0.5", "--max-cost", "ten"),
                                   ("--target-gap", "0.5", "--max-cost", "nans")])
def test_cli_bad_target_one_line_exit_2_nothing_written(poor, tmp_path, extra):
    model, data = poor
    output = tmp_path / "out.jsonl"
    out = cli("ais", model.path, data, *SETTINGS, *extra, "--output", output, code=2)
    assert out.stdout == "" and len(out.stderr.strip().splitlines()) == 1 and not output.exists()


# ---------------------------------------------------------------- elbo names the next step


def test_elbo_note_names_ais_target_gap_where_points_are_unreliable(poor, tmp_path):
    model, data = poor
    document = json.loads(cli("elbo", model.path, data, "-k", "100", "--json").stdout)
    jsonschema.Draft202012Validator(schema("vaeeval.elbo/1")).validate(document)
    flagged = sum(point["unreliable"] for point in document["points"])
    assert flagged > 0
    (note,) = document["notes"]
    assert f"k-hat flags {flagged} of 7 points unreliable" in note
    assert f"vaeeval ais {model.path} {data} --target-gap 0.5" in note and "estimate" in note
    per_point = (2 * 4 + 12) * (1 + 499 * 10)  # two pilots (--init auto) and the reported chains at T = 500, L = 10
    assert f"{gradients(500, 10, chains=12, pilot=2 * 4, points=20):,} gradient evaluations" in note
    assert f"{per_point * 7:,} for AIS on these 7 points" in note
    table = cli("elbo", model.path, data, "-k", "100").stdout
    assert "note: k-hat flags" in table and "--target-gap 0.5" in table


def test_elbo_has_no_such_note_where_the_encoder_fits(tmp_path):
    ppca = make_ppca(dims=6, latent=2, sigma=0.5)
    model = ppca.save(tmp_path / "wide.safetensors", log_var_shift=0.5)  # q(z|x) a little wider than the posterior
    data = tmp_path / "data.npy"
    np.save(data, ppca.sample(7, np.random.default_rng(5)).astype(np.float32))
    document = json.loads(cli("elbo", model.path, data, "-k", "100", "--convergence", "--json").stdout)
    assert not any(point["unreliable"] for point in document["points"]) and "notes" not in document
    assert "--target-gap" not in cli("elbo", model.path, data, "-k", "100", "--convergence").stdout


def test_elbo_note_names_a_convergence_still_rising_and_only_above_the_threshold(tmp_path):
    ppca = make_ppca(dims=6, latent=2, sigma=0.5)
    model = ppca.save(tmp_path / "wide.safetensors", log_var_shift=3.0)
    x = ppca.sample(7, np.random.default_rng(5)).astype(np.float32)
    result = evaluate(model, x, samples=100)
    unflagged = replace(result, summary=replace(result.summary, diagnostics=replace(result.summary.diagnostics,
                                                                                      unreliable=())))
    gain = float(np.mean(result.convergence.iwae[:, -1] - result.convergence.iwae[:, -2]))
    assert gain > STILL_RISING
    note = ais_next_step(unflagged, "m.safetensors", "x.npy")
    assert note.startswith(f"IWAE still rose by {gain:.3f} nats per point from K = 10 to 100")
    assert "vaeeval ais m.safetensors x.npy --target-gap 0.5" in note
    assert "--arch" not in note
    assert "--target-gap 0.5 (with this run's --arch options)" in ais_next_step(unflagged, "m", "x", arch=True)
    levelled = np.repeat(result.convergence.iwae[:, -1:], len(result.convergence.samples), 1)  # flat in K
    flat = replace(unflagged, convergence=replace(result.convergence, iwae=levelled))
    assert ais_next_step(flat, "m.safetensors", "x.npy") is None


# ---------------------------------------------------------------- compare --estimator ais --target-gap


def test_compare_certifies_each_model_and_runs_all_at_the_strongest_settings_reached(poor, tmp_path):
    model, data = poor
    wide = make_ppca(dims=6, latent=2, sigma=0.5).save(tmp_path / "wide.safetensors", log_var_shift=0.5)
    out = cli("compare", model.path, wide.path, data, "--estimator", "ais", *SETTINGS, "--target-gap", "0.6",
              "--certify-points", POINTS, "--json")
    document = json.loads(out.stdout)
    jsonschema.Draft202012Validator(schema("vaeeval.compare/1")).validate(document)
    first, second = document["certificates"]
    assert first["reached"] and second["reached"] and first["upper"] < 0.6 and second["upper"] < 0.6
    alone = certify(model, FIRST, EvaluationOptions(samples=10), 0.6, 10**9, points=POINTS)
    assert (first["steps"], first["leapfrog"]) == (alone.final.steps, alone.final.leapfrog)  # as ais --target-gap finds
    assert document["settings"]["steps"] == max(first["steps"], second["steps"])
    assert document["settings"]["leapfrog"] == max(first["leapfrog"], second["leapfrog"])
    refused = cli("compare", model.path, wide.path, data, "--target-gap", "0.6", code=2)
    assert "--estimator ais" in refused.stderr and refused.stdout == ""


def test_compare_budget_exhausted_exits_1_after_printing(poor, tmp_path):
    model, data = poor
    wide = make_ppca(dims=6, latent=2, sigma=0.5).save(tmp_path / "wide.safetensors", log_var_shift=0.5)
    out = cli("compare", model.path, wide.path, data, "--estimator", "ais", *SETTINGS, "--target-gap", "0.01",
              "--max-cost", gradients(4, 2), "--certify-points", POINTS, code=1)
    assert len(out.stderr.strip().splitlines()) == 1 and "target gap 0.01 not reached" in out.stderr
    assert "Certificate: BDMC gap" in out.stdout and "NOT reached" in out.stdout


POISSON_VAE = '''
import torch
from torch import nn


class CountVAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(6, 4)
        self.dec = nn.Linear(2, 6)

    def encode(self, x):
        mean, log_var = self.enc(x).chunk(2, dim=-1)
        return mean, log_var

    def decode(self, z):
        return self.dec(z)
'''


def test_a_model_bdmc_cannot_simulate_from_is_refused_with_one_line_and_exit_2(tmp_path):
    import torch
    from safetensors.torch import save_file

    (tmp_path / "count_vae.py").write_text(POISSON_VAE)
    torch.manual_seed(0)
    save_file({"enc.weight": torch.randn(4, 6) * 0.1, "enc.bias": torch.zeros(4), "dec.weight": torch.randn(6, 2) * 0.1,
               "dec.bias": torch.zeros(6)}, tmp_path / "weights.safetensors")
    data = tmp_path / "counts.npy"
    np.save(data, np.random.default_rng(0).poisson(2.0, (5, 6)).astype(np.float32))
    arch = ("--arch", f"{tmp_path / 'count_vae.py'}:CountVAE", "--likelihood", "poisson")
    cli("ais", tmp_path / "weights.safetensors", data, *arch, *SETTINGS)  # AIS on data works
    out = cli("ais", tmp_path / "weights.safetensors", data, *arch, *SETTINGS, "--target-gap", "0.5", code=2)
    assert out.stdout == "" and len(out.stderr.strip().splitlines()) == 1 and "cannot simulate" in out.stderr


def test_cli_budget_in_seconds_runs_the_first_stage_and_reports_the_budget(poor):
    model, data = poor
    out = cli("ais", model.path, data, *SETTINGS, "--target-gap", "0.01", "--max-cost", "0.000001s",
              "--certify-points", POINTS, "--json", code=1)
    assert len(out.stderr.strip().splitlines()) == 1 and "--max-cost 1e-06s" in out.stderr
    document = json.loads(out.stdout)
    jsonschema.Draft202012Validator(schema("vaeeval.ais/1")).validate(document)
    certificate = document["certificate"]
    assert len(certificate["stages"]) == 1 and certificate["max_seconds"] == 1e-06 and certificate["max_cost"] is None
    assert document["settings"]["steps"] == 4
