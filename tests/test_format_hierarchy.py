"""Format 1's two latent groups (docs/FORMAT.md, "Two latent groups"): q(z1|x) q(z2|z1) bottom-up, p(z2) p(z1|z2)
top-down, every factor a diagonal Gaussian from layers, evaluated through user/hierarchy.py's chains.

The model is linear-Gaussian with closed-form log p(x): z2 ~ N(0, I), z1 | z2 ~ N(A z2 + a, diag s1²),
x | z1 ~ N(B z1 + b, σ² I), so x ~ N(B a + b, B (A Aᵀ + diag s1²) Bᵀ + σ² I). A's rows and B's columns
are orthogonal, so the exact posterior chain is diagonal, q(z1|x) = p(z1|x) and q(z2|z1) = p(z2|z1):
format 1's layers hold it, every log-weight is log p(x), and the ELBO and IWAE equal the closed form to
float32 rounding of the weights; AIS agrees within its standard error.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import linear
from scipy import stats
from torch import nn

from vaeeval import evaluate, load_data, load_model, save_model
from vaeeval.cli import main
from vaeeval.errors import SpecError, VaeevalError

D2, D1, DX, N = 2, 3, 5, 15


def _f32(array) -> np.ndarray:
    return np.asarray(array, dtype=np.float32).astype(np.float64)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    rng = np.random.default_rng(7)
    A = _f32([[1.3, 0.0], [0.0, -0.8], [0.0, 0.0]])
    a, s1 = _f32(rng.normal(size=D1)), _f32([0.7, 1.1, 0.5])
    B = _f32(np.linalg.qr(rng.normal(size=(DX, DX)))[0][:, :D1] * 1.5)
    b, sigma = _f32(rng.normal(size=DX)), float(np.float32(0.4))
    prior1 = A @ A.T + np.diag(s1**2)  # diagonal: A's rows are orthogonal
    cov1 = np.linalg.inv(np.linalg.inv(prior1) + B.T @ B / sigma**2)  # diagonal: B's columns are orthogonal
    cov2 = np.linalg.inv(np.eye(D2) + A.T @ np.diag(s1**-2) @ A)
    gain = cov2 @ A.T @ np.diag(s1**-2)
    encoder = nn.Sequential(linear(np.vstack([cov1 @ B.T / sigma**2, np.zeros((D1, DX))]),
                                    np.concatenate([cov1 @ (np.linalg.inv(prior1) @ a - B.T @ b / sigma**2),
                                                    np.log(np.diag(cov1))])))
    hierarchy = {"latent_dim": D2,
                 "encoder": nn.Sequential(linear(np.vstack([gain, np.zeros((D2, D1))]),
                                                  np.concatenate([-gain @ a, np.log(np.diag(cov2))]))),
                 "prior": nn.Sequential(linear(np.vstack([A, np.zeros((D1, D2))]), np.concatenate([a, 2 * np.log(s1)])))}
    decoder = nn.Sequential(linear(B, b))
    folder = tmp_path_factory.mktemp("two_groups")
    path = folder / "model.safetensors"
    save_model(path, encoder, decoder, likelihood={"family": "gaussian", "sigma": sigma}, input_shape=[DX], latent_dim=D1,
               hierarchy=hierarchy)
    # the closed form, from the weights as stored (float32)
    z2 = rng.normal(size=(N, D2))
    z1 = z2 @ A.T + a + rng.normal(size=(N, D1)) * s1
    x = (z1 @ B.T + b + rng.normal(size=(N, DX)) * sigma).astype(np.float32)
    np.save(folder / "x.npy", x)
    exact = stats.multivariate_normal(B @ a + b, B @ prior1 @ B.T + sigma**2 * np.eye(DX)).logpdf(x.astype(np.float64))
    return path, folder / "x.npy", exact


def test_the_exact_chain_gives_the_closed_form_as_elbo_and_iwae(written):
    path, data_path, exact = written
    model = load_model(path)
    assert model.latent_groups == ("z1", "z2") and model.latent_dim == D1 + D2
    result = evaluate(model, load_data(data_path, model), samples=32)
    np.testing.assert_allclose(result.points.iwae, exact, rtol=2e-6)
    np.testing.assert_allclose(result.points.elbo, exact, rtol=2e-6)  # every log-weight is log p(x)
    assert np.all(result.points.elbo <= result.points.iwae + 1e-9)


def test_every_batch_size_gives_the_same_json(written):
    path, data_path, _ = written
    runs = []
    for batch in (1, 7, 100):
        found = CliRunner().invoke(main, ["elbo", str(path), str(data_path), "-k", "64", "--batch-size", str(batch), "--json"])
        assert found.exit_code == 0, found.stderr
        document = json.loads(found.stdout)
        del document["settings"]["batch_size"], document["settings"]["chunk_size"]
        runs.append(document)
    assert runs[0] == runs[1] == runs[2]


def test_ais_through_the_joint_agrees_and_latents_splits_the_groups(written):
    path, data_path, exact = written
    runner = CliRunner()
    ais = runner.invoke(main, ["ais", str(path), str(data_path), "--limit", "4", "--steps", "50", "--chains", "4",
                               "--leapfrog", "2", "-k", "20", "--init", "prior", "--json"])
    assert ais.exit_code == 0, ais.stderr
    points = json.loads(ais.stdout)["points"]
    found, stderr = (np.array([p[key] for p in points]) for key in ("ais", "ais_stderr"))
    assert np.all(np.abs(found - exact[:4]) < 3 * stderr + 1e-6), (found, exact[:4], stderr)  # annealed from p(z)
    latents = runner.invoke(main, ["latents", str(path), str(data_path), "--json"])
    assert latents.exit_code == 0, latents.stderr
    groups = json.loads(latents.stdout)["latents"]["groups"]
    assert [g["name"] for g in groups] == ["z1", "z2"] and [g["units"] for g in groups] == [[0, D1], [D1, D1 + D2]]


def _document(**changes):
    document = {"format": 1, "input_shape": [DX], "latent_dim": D1, "likelihood": {"family": "gaussian", "sigma": 1.0},
                "encoder": [{"type": "linear", "tensor": "e"}], "decoder": [{"type": "linear", "tensor": "d"}],
                "hierarchy": {"latent_dim": D2, "encoder": [{"type": "linear", "tensor": "q2"}],
                              "prior": [{"type": "linear", "tensor": "p1"}]}}
    tensors = {"e.weight": torch.zeros(2 * D1, DX), "d.weight": torch.zeros(DX, D1), "q2.weight": torch.zeros(2 * D2, D1),
               "p1.weight": torch.zeros(2 * D1, D2)}
    for key, value in changes.items():
        if key == "tensors":
            tensors.update(value)
        elif value is None:
            document.pop(key)
        else:
            document[key] = value if not isinstance(value, dict) or key != "hierarchy" else {**document[key], **value}
    return document, tensors


@pytest.mark.parametrize(
    ("changes", "phrase"),
    [
        ({"tensors": {"q2.weight": torch.zeros(2 * D2 + 1, D1)}},
         "the hierarchy encoder (q(z2|z1)) gives [5] per point; it must give [4] (mean, then log-variance)"),
        ({"tensors": {"p1.weight": torch.zeros(D1, D2)}},
         "the hierarchy prior (p(z1|z2)) gives [3] per point; it must give [6] (mean, then log-variance)"),
        ({"hierarchy": {"latent_dim": 0}}, 'hierarchy: "latent_dim" must be a positive integer, found 0'),
        ({"hierarchy": {"extra": 1}}, "hierarchy takes latent_dim, encoder and prior"),
        ({"posterior": {"family": "categorical"}, "tensors": {"e.weight": torch.zeros(D1, DX)}},
         "hierarchy: a second latent group goes with a Gaussian posterior, without a library size or covariates"),
    ],
)
def test_bad_hierarchy_blocks_are_one_line(changes, phrase):
    from vaeeval.format.reading import build_model

    document, tensors = _document(**changes)
    with pytest.raises(SpecError) as raised:
        build_model(document, tensors, None)
    assert phrase in str(raised.value) and "\n" not in str(raised.value), str(raised.value)


def test_read_raw_it_is_refused_with_the_way_out(written):
    from vaeeval.format.reading import load_model as load_raw

    path, data_path, _ = written
    with pytest.raises(VaeevalError, match="two latent groups .* read it with vaeeval.load_model"):
        evaluate(load_raw(path), np.load(data_path))
