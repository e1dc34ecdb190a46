"""numerics: exp, log and ndtri against 50-digit references, the stable forms against torch, and fixed bits."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import mpmath
import numpy as np
import pytest
import torch
from scipy import special

from vaeeval.core import numerics

mpmath.mp.dps = 50


def _ulps(found: np.ndarray, exact: list) -> np.ndarray:
    exact = np.array([float(v) for v in exact])
    return np.abs(found - exact) / np.spacing(np.abs(exact))


def test_exp_within_one_ulp_over_its_whole_range_and_its_special_values():
    x = np.concatenate([np.linspace(-708, 709.7, 2001), np.random.default_rng(0).standard_normal(500) * 1e-9, [0.5, -0.5]])
    found = numerics.exp(torch.from_numpy(x)).numpy()
    assert _ulps(found, [mpmath.exp(mpmath.mpf(float(v))) for v in x]).max() <= 1
    specials = numerics.exp(torch.tensor([0.0, -math.inf, math.inf, 710.0, -746.0, math.nan], dtype=torch.float64))
    assert specials[:5].tolist() == [1.0, 0.0, math.inf, math.inf, 0.0] and math.isnan(specials[5])
    subnormal = numerics.exp(torch.tensor([-740.0], dtype=torch.float64)).item()
    assert subnormal == pytest.approx(float(mpmath.exp(-740)), rel=1e-4)  # 4 significant bits left there


def test_log_within_three_ulps_including_subnormals_and_near_one():
    rng = np.random.default_rng(1)
    x = np.concatenate([np.exp(rng.uniform(-700, 700, 2000)), 1 + rng.standard_normal(300) * 1e-7, [5e-324, 1e-310, 2.0, 0.5]])
    found = numerics.log(torch.from_numpy(x)).numpy()
    assert _ulps(found, [mpmath.log(mpmath.mpf(float(v))) for v in x]).max() <= 3
    specials = numerics.log(torch.tensor([1.0, 0.0, math.inf, -1.0, math.nan], dtype=torch.float64)).tolist()
    assert specials[:3] == [0.0, -math.inf, math.inf] and math.isnan(specials[3]) and math.isnan(specials[4])


def test_ndtri_is_the_normal_quantile_in_both_tails():
    rng = np.random.default_rng(2)
    tails = 10 ** rng.uniform(-300, -1, 400)
    p = np.concatenate([rng.random(2000), tails, 1 - tails[tails > 1e-16], [2**-54, 0.5, 0.075, 0.925, 1 - 2**-53]])
    found = numerics.ndtri(p)
    assert np.max(np.abs(found - special.ndtri(p)) / np.maximum(np.abs(special.ndtri(p)), 1e-300)) < 2e-15
    extreme = np.array([1e-300, 1e-20, 2**-54])
    reference = [float(mpmath.findroot(lambda z, p=float(v): mpmath.ncdf(z) - p, float(z0)))
                 for v, z0 in zip(extreme, special.ndtri(extreme), strict=True)]
    assert np.allclose(numerics.ndtri(extreme), reference, rtol=1e-14, atol=0)
    assert found[-4] == 0.0 and numerics.ndtri(np.array([0.0, 1.0])).tolist() == [-math.inf, math.inf]
    assert numerics.ndtri(p[:70].reshape(10, 7)).shape == (10, 7)


def test_logsumexp_logaddexp_and_tree_sum_against_float128_free_references():
    rng = np.random.default_rng(3)
    values = torch.from_numpy(rng.standard_normal((9, 301)) * 40)
    reference = [float(mpmath.log(mpmath.fsum(mpmath.exp(mpmath.mpf(float(v))) for v in row))) for row in values.numpy()]
    assert np.allclose(numerics.logsumexp(values).numpy(), reference, rtol=4e-16, atol=0)
    inf = math.inf
    assert numerics.logsumexp(torch.tensor([[-inf, -inf], [1.0, inf]])).tolist() == [-inf, inf]
    assert numerics.logsumexp(torch.zeros(3, 0)).tolist() == [-inf] * 3
    a, b = torch.from_numpy(rng.standard_normal(500) * 30), torch.from_numpy(rng.standard_normal(500) * 30)
    assert torch.allclose(numerics.logaddexp(a, b), torch.logaddexp(a, b), rtol=4e-16, atol=0)
    assert numerics.logaddexp(torch.tensor([-inf, inf, -inf]), torch.tensor([-inf, inf, 2.0])).tolist() == [-inf, inf, 2.0]
    ints = torch.arange(1.0, 1001.0).reshape(1, -1)
    assert numerics.tree_sum(ints).item() == 500500.0 and numerics.tree_sum(ints[:, :7], dim=1).item() == 28.0
    assert numerics.tree_sum(torch.zeros(2, 0)).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stable_forms_match_torch_and_keep_finite_gradients(dtype):
    x = torch.tensor([-1e4, -800.0, -100.0, -40.0, -1.0, -1e-3, -1e-30, 0.0, 1e-30, 1e-3, 1.0, 40.0, 100.0, 800.0],
                     dtype=dtype, requires_grad=True)
    tolerance = {torch.float32: 3e-7, torch.float64: 1e-15}[dtype]
    for mine, theirs in ((numerics.expm1, torch.expm1), (numerics.softplus, torch.nn.functional.softplus),
                         (lambda t: numerics.log1p(t.abs()), lambda t: torch.log1p(t.abs()))):
        (grad,) = torch.autograd.grad(mine(x).sum(), x)
        plain = x.detach().clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(theirs(plain).sum(), plain)
        assert torch.allclose(mine(x.detach()), theirs(x.detach()), rtol=tolerance, atol=0)
        assert not grad.isnan().any() and torch.allclose(grad, expected, rtol=tolerance * 4, atol=1e-300)
    logits = torch.randn(5, 50, dtype=dtype) * 10
    assert torch.allclose(numerics.log_softmax(logits), torch.log_softmax(logits, -1), rtol=tolerance * 4, atol=tolerance)


def test_each_function_gives_an_element_the_same_bits_at_any_position():
    x = torch.from_numpy(np.random.default_rng(4).standard_normal(3000) * 20)
    for function in (numerics.exp, lambda t: numerics.log(t.abs()), numerics.expm1, numerics.softplus,
                     lambda t: torch.from_numpy(numerics.ndtri(t.abs().numpy() / 100))):
        whole = function(x)
        for start, count in ((0, 1), (1, 5), (3, 17), (7, 33), (100, 1000)):
            assert torch.equal(function(x[start : start + count].clone()), whole[start : start + count])
    rows = torch.from_numpy(np.random.default_rng(5).standard_normal((40, 64)))
    assert torch.equal(numerics.logsumexp(rows[7:9]), numerics.logsumexp(rows)[7:9])


def _capabilities() -> list[str]:
    from test_determinism import _capabilities as capabilities

    return capabilities()


def test_the_torch_functions_vaeeval_relies_on_are_the_same_bits_everywhere(tmp_path):
    """``numerics``' premise: torch's exp and log (and tanh, erf) round each element alike at any
    position and under every ATen ISA of this CPU; its own functions do too."""
    script = tmp_path / "hashes.py"
    script.write_text(
        "import hashlib, sys, numpy as np, torch\n"
        "from vaeeval.core import numerics\n"
        "x = torch.from_numpy(np.random.default_rng(0).standard_normal(4099) * 30)\n"
        "u = torch.from_numpy(np.random.default_rng(1).random(4099))\n"
        "functions = {'exp': torch.exp, 'log': lambda t: torch.log(t.abs()), 'tanh': torch.tanh, 'erf': torch.erf,\n"
        "             'numerics.exp': numerics.exp, 'numerics.log': lambda t: numerics.log(t.abs()),\n"
        "             'log1p': lambda t: numerics.log1p(t.abs()), 'expm1': numerics.expm1, 'softplus': numerics.softplus,\n"
        "             'ndtri': lambda t: torch.from_numpy(numerics.ndtri(u.numpy()))}\n"
        "out = {}\n"
        "for name, f in functions.items():\n"
        "    for dtype in (torch.float32, torch.float64):\n"
        "        if name.startswith('numerics') and dtype == torch.float32: continue\n"
        "        full = f(x.to(dtype))\n"
        "        for offset, n in ((0, 1), (1, 5), (3, 17), (7, 33), (100, 1000)):\n"
        "            part = f(x.to(dtype)[offset:offset + n].clone())\n"
        "            if name != 'ndtri': assert torch.equal(part, full[offset:offset + n]), (name, dtype, offset, n)\n"
        "        out[f'{name} {dtype}'] = hashlib.sha256(full.numpy().tobytes()).hexdigest()\n"
        "print(out)\n"
    )
    hashes = set()
    for isa in _capabilities():
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                              env={**os.environ, "ATEN_CPU_CAPABILITY": isa}, timeout=120)
        assert done.returncode == 0, done.stderr
        hashes.add(done.stdout)
    assert len(hashes) == 1
