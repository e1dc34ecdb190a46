"""Data on any affine grid: 8-bit images in [0, 1], in [-1, 1] or as the integers 0..255.

The probability of a value's bin does not depend on the units the data is written in, so
the same images scored in any of them, by the correspondingly rescaled model, give the
same log-probabilities; data in other units than a model expects is refused, naming both
ranges and the ``--rescale`` that maps one onto the other.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli, linear
from torch import nn

from vaeeval import save_model
from vaeeval.errors import SpecError
from vaeeval.estimators.annealing.bdmc import simulate
from vaeeval.format.domains import Domain, Grid, detect_domain, domain_from_spec
from vaeeval.format.likelihoods.base import bin_edges

DIMS, LATENT, LEVELS = 6, 2, 256


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    """A small Gaussian VAE on [0, 1]: decoder means near 0.5, sigma 0.08."""
    rng = np.random.default_rng(seed)
    return {
        "We": rng.normal(0, 0.8, (2 * LATENT, DIMS)), "be": np.concatenate([np.zeros(LATENT), np.full(LATENT, -1.0)]),
        "Wd": rng.normal(0, 0.1, (DIMS, LATENT)), "bd": rng.uniform(0.35, 0.65, DIMS),
    }


def _save(path: Path, low: float, high: float, sigma: float = 0.08, data: dict | None = None):
    """The [0, 1] model written for data in [low, high]: x' = low + (high - low) x, the same model in other units."""
    w, span = _weights(), high - low
    encoder = nn.Sequential(linear(w["We"] / span, w["be"] - w["We"] @ np.full(DIMS, low / span)))
    decoder = nn.Sequential(linear(w["Wd"] * span, w["bd"] * span + low))
    return save_model(path, encoder, decoder, likelihood={"family": "gaussian", "sigma": sigma * span},
                      input_shape=[DIMS], latent_dim=LATENT, data=data)


def _levels(n: int = 40, seed: int = 1) -> np.ndarray:
    """8-bit levels k of n images near the model's means (a few far out in both tails)."""
    rng = np.random.default_rng(seed)
    k = np.clip(np.round(rng.normal(0.5, 0.12, (n, DIMS)) * 255), 0, 255)
    k[0, 0], k[1, 1] = 0, 255
    return k.astype(np.uint8)


def _elbo(model: Path, data: Path, *extra: str) -> dict:
    return json.loads(cli("elbo", model, data, "-k", "64", "--json", *extra).stdout)


def test_grid_on_the_unit_interval_is_format_1s_formula_bit_for_bit():
    x = torch.from_numpy(np.arange(17, dtype=np.float64) / 16)
    lower, upper = bin_edges(x, Grid(17), -np.inf, np.inf)
    step = 16
    k = torch.round(x * step)
    assert torch.equal(lower, torch.where(k <= 0, torch.full_like(x, -np.inf), x - 0.5 / step))
    assert torch.equal(upper, torch.where(k >= step, torch.full_like(x, np.inf), x + 0.5 / step))


def test_detects_eight_bit_images_in_every_usual_unit():
    k = _levels().astype(np.float64)
    assert detect_domain((k / 255).astype(np.float32)) == Domain("discrete", LEVELS)
    signed = detect_domain((2 * k / 255 - 1).astype(np.float32))
    assert signed == Domain("discrete", LEVELS, -1.0, 1.0)
    assert signed.grid.describe() == "256 levels on [-1, 1], step 0.00784314"
    integers = detect_domain(k.astype(np.uint8))
    assert integers.kind == "counts" and integers.byte_grid() == Grid(LEVELS, 0.0, 255.0)
    assert detect_domain(np.random.default_rng(0).uniform(-1, 1, (100, 5))).kind == "real"


def test_the_same_images_score_the_same_in_any_units(tmp_path):
    """[-1, 1] and 0..255 images under the rescaled model: the log-probabilities of [0, 1] under the original."""
    k = _levels()
    scores = {}
    for name, (low, high) in {"unit": (0.0, 1.0), "signed": (-1.0, 1.0), "bytes": (0.0, 255.0)}.items():
        model = _save(tmp_path / f"{name}.safetensors", low, high)
        data = tmp_path / f"{name}.npy"
        np.save(data, (low + (high - low) * k.astype(np.float64) / 255).astype(np.float32))
        extra = ("--discretize", "256", "--range", "0,255") if name == "bytes" else ()
        document = _elbo(model.path, data, *extra)
        assert document["summary"]["scoring"]["measure"] == "probability" and document["summary"]["scoring"]["levels"] == LEVELS
        assert document["summary"]["scoring"]["range"] == [low, high]
        scores[name] = np.array([p["iwae"] for p in document["points"]]), document["summary"]["bits_per_dim"]["mean"]
    unit, unit_bits = scores["unit"]
    assert unit_bits > 0  # a probability of an 8-bit event (a density on this grid can exceed one)
    for name in ("signed", "bytes"):
        points, bits = scores[name]
        np.testing.assert_allclose(points, unit, rtol=0, atol=2e-4)  # float32 rounding of the rescaled weights
        assert bits == pytest.approx(unit_bits, abs=1e-6)


def test_rescale_reads_bytes_as_the_unit_interval_bit_for_bit(tmp_path):
    model = _save(tmp_path / "unit.safetensors", 0.0, 1.0)
    k = _levels()
    np.save(tmp_path / "bytes.npy", k)
    np.save(tmp_path / "unit.npy", (k.astype(np.float64) / 255).astype(np.float32))
    rescaled = _elbo(model.path, tmp_path / "bytes.npy", "--rescale", "0,255")
    plain = _elbo(model.path, tmp_path / "unit.npy")
    assert rescaled["points"] == plain["points"] and rescaled["summary"] == plain["summary"]
    assert rescaled["data"]["digest"] == plain["data"]["digest"]  # the points as evaluated
    assert any("--rescale" in note for note in rescaled["model"]["notes"])


@pytest.mark.parametrize("declared", [{"domain": "discrete", "levels": 256}, {"domain": "unit_interval"}])
def test_bytes_given_to_a_unit_interval_model_are_refused_naming_both_ranges(tmp_path, declared):
    model = _save(tmp_path / "unit.safetensors", 0.0, 1.0, data=declared)
    np.save(tmp_path / "bytes.npy", _levels())
    line = cli("elbo", model.path, tmp_path / "bytes.npy", code=2).stderr.strip()
    assert "\n" not in line
    for phrase in ("the values span [0, 255]", "outside the model's [0, 1]", "--rescale 0,255 maps [0, 255] onto [0, 1]"):
        assert phrase in line, line


def test_bytes_given_to_a_bernoulli_model_suggest_the_rescale(tmp_path, bernoulli_model):
    np.save(tmp_path / "bytes.npy", _levels())
    line = cli("elbo", bernoulli_model.path, tmp_path / "bytes.npy", code=2).stderr
    assert "bernoulli likelihood scores exactly 0 or 1" in line and "--rescale 0,255" in line


def test_a_model_calibrated_on_unit_data_refuses_bytes(tmp_path):
    model = _save(tmp_path / "unit.safetensors", 0.0, 1.0)
    np.save(tmp_path / "unit.npy", (_levels().astype(np.float64) / 255).astype(np.float32))
    cli("calibrate", model.path, tmp_path / "unit.npy", "-k", "16", "-o", tmp_path / "fitted.safetensors")
    np.save(tmp_path / "bytes.npy", _levels(seed=2))
    line = cli("elbo", tmp_path / "fitted.safetensors", tmp_path / "bytes.npy", code=2).stderr
    assert "its scale was calibrated on discrete data on 256 levels k/255" in line and "--rescale 0,255" in line


def test_a_declared_range_is_read_written_and_checked(tmp_path):
    spec = {"domain": "discrete", "levels": 256, "range": [-1, 1]}
    model = _save(tmp_path / "signed.safetensors", -1.0, 1.0, data=spec)
    assert model.domain == Domain("discrete", 256, -1.0, 1.0) and model.domain.to_spec() == {**spec, "range": [-1.0, 1.0]}
    inspect = cli("inspect", model.path).stdout
    assert "256 levels on [-1, 1]" in inspect
    k = _levels().astype(np.float64)
    np.save(tmp_path / "signed.npy", (2 * k / 255 - 1).astype(np.float32))
    document = _elbo(model.path, tmp_path / "signed.npy")
    assert document["summary"]["scoring"]["range"] == [-1.0, 1.0] and document["model"]["domain"]["range"] == [-1.0, 1.0]
    np.save(tmp_path / "off.npy", (k / 255).astype(np.float32))  # k/255 is on the step-2/255 grid only for odd k
    assert "the model declares discrete data on 256 levels on [-1, 1]" in cli("elbo", model.path, tmp_path / "off.npy", code=2).stderr
    for bad in ([1, 1], [0], [0, "1"], [0, float("inf")]):
        with pytest.raises(SpecError, match="range"):
            domain_from_spec({"domain": "discrete", "levels": 256, "range": bad})
    with pytest.raises(SpecError, match="belongs to a \"discrete\" domain"):
        domain_from_spec({"domain": "real", "range": [0, 1]})


@pytest.mark.parametrize(("args", "phrase"), [
    (("--discretize", "256", "--range", "1,1"), "LO < HI"),
    (("--discretize", "256", "--range", "2,1"), "LO < HI"),
    (("--discretize", "256", "--range", "a,b"), "two numbers"),
    (("--discretize", "256", "--range", "0,nan"), "LO < HI"),
    (("--range", "0,255"), "give L too"),
    (("--discretize", "5", "--range", "0,4"), "not on the grid of 5 levels on [0, 4]"),
    (("--rescale", "3,3"), "LO < HI"),
    (("--density", "--discretize", "256"), "contradict"),
])
def test_bad_grid_options_get_one_line(tmp_path, args, phrase):
    model = _save(tmp_path / "unit.safetensors", 0.0, 1.0)
    np.save(tmp_path / "data.npy", (_levels().astype(np.float64) / 255).astype(np.float32) * 4)
    before = (tmp_path / "data.npy").read_bytes()
    line = cli("elbo", model.path, tmp_path / "data.npy", *args, code=2).stderr.strip()
    assert phrase in line and "\n" not in line, line
    assert (tmp_path / "data.npy").read_bytes() == before


def test_simulated_points_lie_on_the_declared_grid(tmp_path):
    model = _save(tmp_path / "signed.safetensors", -1.0, 1.0, data={"domain": "discrete", "levels": 256, "range": [-1, 1]})
    simulated = simulate(model, 50, seed=3, bins=model.domain.grid)
    assert not model.domain.outside(simulated.x).any()
    assert simulated.x.min() >= -1 and simulated.x.max() <= 1


def test_a_density_on_a_signed_grid_is_dequantized_with_its_own_step(tmp_path):
    model = _save(tmp_path / "signed.safetensors", -1.0, 1.0)
    np.save(tmp_path / "signed.npy", (2 * _levels().astype(np.float64) / 255 - 1).astype(np.float32))
    table = cli("elbo", model.path, tmp_path / "signed.npy", "-k", "8", "--density").stdout
    assert "Δ = 0.00784314" in table
    document = _elbo(model.path, tmp_path / "signed.npy", "--density")
    bits = document["summary"]["bits_per_dim"]["mean"]
    dequantized = document["summary"]["dequantized_bits_per_dim"]["mean"]
    assert dequantized == pytest.approx(bits - np.log(2 / 255) / np.log(2), rel=1e-12)
