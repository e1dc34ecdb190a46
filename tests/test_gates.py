"""vaeeval.analysis.gates: --fail-under thresholds and the paired, statistical baseline check."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import cli

from vaeeval import VaeevalError
from vaeeval.analysis.gates import Threshold, check_baseline
from vaeeval.results.numbers import mean_and_stderr
from vaeeval.runs.formats import StoredRun

# ---------------------------------------------------------------- thresholds


def test_fail_under_exits_1_below_the_threshold_and_0_at_or_above(bernoulli_model, binary_data):
    document = json.loads(cli("elbo", bernoulli_model.path, binary_data, "-k", "32", "--json").stdout)
    iwae, elbo = document["summary"]["iwae"]["mean"], document["summary"]["elbo"]["mean"]
    base = ["elbo", bernoulli_model.path, binary_data, "-k", "32", "--json"]
    cli(*base, "--fail-under", f"iwae={iwae - 1e-9}", "--fail-under", f"elbo={elbo - 1e-9}")
    failed = cli(*base, "--fail-under", f"iwae={iwae - 1e-9}", "--fail-under", f"elbo={elbo + 1e-6}", code=1)
    assert json.loads(failed.stdout)["summary"]["iwae"]["mean"] == iwae  # the results are still printed
    assert failed.stderr.count("\n") == 1 and failed.stderr.startswith("vaeeval: check failed: elbo mean")
    assert "iwae" not in failed.stderr
    assert cli(*base, "--fail-under", "kl=3", code=2).stderr.startswith("vaeeval: error: --fail-under 'kl=3'")


@pytest.mark.parametrize(
    ("text", "phrase"),
    [("kl=3", "gate one of elbo, recon, iwae"), ("iwae=lots", "'lots' is not a number"), ("iwae=inf", "must be finite")],
)
def test_threshold_parse_refuses_what_it_cannot_gate(text, phrase):
    with pytest.raises(VaeevalError) as caught:
        Threshold.parse(text)
    assert str(caught.value).startswith(f"fail_under {text!r}: ") and phrase in str(caught.value)
    assert Threshold.parse("iwae = -85.5") == Threshold("iwae", -85.5)


# ---------------------------------------------------------------- baseline check


def _json_run(tmp_path, name, *args):
    path = tmp_path / name
    path.write_text(cli("elbo", *args, "--json").stdout)
    return path


def test_baseline_check_is_paired_and_statistical(bernoulli_model, second_model, binary_data, tmp_path):
    model, data = bernoulli_model.path, binary_data
    old = _json_run(tmp_path, "old.json", model, data, "-k", "64", "--seed", "0")
    noise = _json_run(tmp_path, "noise.json", model, data, "-k", "64", "--seed", "1")
    other = _json_run(tmp_path, "other.json", second_model.path, data, "-k", "64")
    documents = {p: json.loads(p.read_text()) for p in (old, noise, other)}
    # the same model with other noise: never fails on noise alone
    ok = cli("check", noise, "--baseline", old, "--metric", "iwae", "--tolerance", "0.05")
    assert ok.stdout.startswith("iwae: ") and "paired over 23 points" in ok.stdout
    # the other model is worse or better; the check says which, beyond its paired standard error
    change = np.mean([b["iwae"] - a["iwae"] for a, b in zip(documents[old]["points"], documents[other]["points"], strict=False)])
    worse, better = (other, old) if change < 0 else (old, other)
    gap = abs(change)
    failed = cli("check", worse, "--baseline", better, "--tolerance", f"{gap / 4}", code=1)
    assert failed.stderr.startswith("vaeeval: check failed: iwae:") and failed.stderr.count("\n") == 1
    cli("check", worse, "--baseline", better, "--tolerance", f"{gap * 4}")
    verdict = json.loads(cli("check", worse, "--baseline", better, "--tolerance", f"{gap * 4}", "--json").stdout)
    paired = np.array([a["iwae"] - b["iwae"] for a, b in zip(documents[worse]["points"], documents[better]["points"], strict=False)])
    assert verdict["difference"]["mean"] == pytest.approx(paired.mean())
    assert verdict["difference"]["stderr"] == pytest.approx(paired.std(ddof=1) / np.sqrt(paired.size))


def test_baseline_check_refuses_different_data(bernoulli_model, binary_data, tmp_path):
    old = _json_run(tmp_path, "old.json", bernoulli_model.path, binary_data, "-k", "16")
    fewer = _json_run(tmp_path, "fewer.json", bernoulli_model.path, binary_data, "-k", "16", "--limit", "10")
    refused = cli("check", fewer, "--baseline", old, code=2)
    assert "cover different data" in refused.stderr and refused.stderr.count("\n") == 1


def _stored(name: str, values: np.ndarray, order: np.ndarray) -> StoredRun:
    """A run whose points (listed in ``order``) have these iwae values, on data with digest "d"."""
    header = {"kind": "header", "data": {"digest": "d", "n": values.size}}
    points = [{"index": int(i), "iwae": float(values[i])} for i in order]
    return StoredRun(Path(name), header, points, None)


def test_baseline_check_pairs_points_by_index_and_takes_the_stderr_of_their_differences():
    rng = np.random.default_rng(0)
    shared = rng.normal(-80, 10, 50)  # point-to-point spread, common to both runs: paired away
    new, old = shared + rng.normal(-0.3, 0.1, 50), shared
    result = check_baseline(_stored("new", new, rng.permutation(50)), _stored("old", old, np.arange(50)), tolerance=0.1)
    assert result.difference == mean_and_stderr(new - old)
    assert result.difference.stderr < 0.02 < np.std(shared) / np.sqrt(50)
    assert (result.new, result.baseline, result.points) == (pytest.approx(new.mean()), pytest.approx(old.mean()), 50)
    assert not result.passed  # 0.3 nats worse, 15 standard errors beyond the 0.1 tolerated
    assert check_baseline(_stored("new", new, np.arange(50)), _stored("old", old, np.arange(50)), tolerance=0.5).passed


@pytest.mark.parametrize(
    ("options", "phrase"),
    [({"metric": "kl"}, "metric 'kl': check one of"), ({"confidence": 1.0}, "confidence 1.0: choose a level in [0.5, 1)"),
     ({"tolerance": -1.0}, "tolerance -1.0: must be >= 0")],
)
def test_baseline_check_names_the_bad_parameter(options, phrase):
    run = _stored("a", np.zeros(3), np.arange(3))
    with pytest.raises(VaeevalError, match="^" + re.escape(phrase)):
        check_baseline(run, run, **options)
