"""Hostile input, second round (issue 28): the user's --arch code, and what it returns.

(A) SystemExit is no Exception, so an `except Exception` let it through: sys.exit(0) in decode ended vaeeval
with exit 0 and nothing printed, even with --json; sys.exit(3) with exit 3 and no message.
(B to H, and a third round) what encode, decode and prior() return is checked where it comes back
(`vaeeval/user/checks.py`): each case is the right number, or one line and exit 2.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from vaeeval.cli import main

MODELS = """
import sys
from torch import nn


class Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Linear(4, 4), nn.Linear(2, 4)

    def encode(self, x):
        return self.enc(x).chunk(2, -1)

    def decode(self, z):
        return self.dec(z)


class DecodeExits(Base):
    def decode(self, z):
        if z.shape[0] > 2:  # after the probe: in the middle of the evaluation
            sys.exit(0)
        return self.dec(z)


class EncodeExits(Base):
    def encode(self, x):
        sys.exit(3)


class InitExits(Base):
    def __init__(self):
        super().__init__()
        sys.exit(0)


class PriorExits(Base):
    def prior(self):
        sys.exit(0)
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("exits")
    (folder / "models.py").write_text(MODELS)
    torch.manual_seed(0)
    weights = {"enc.weight": torch.randn(4, 4), "enc.bias": torch.zeros(4), "dec.weight": torch.randn(4, 2),
               "dec.bias": torch.zeros(4)}
    save_file(weights, folder / "w.safetensors")
    np.save(folder / "x.npy", (np.random.default_rng(0).random((5, 4)) < 0.5).astype(np.float32))
    return folder


@pytest.mark.parametrize(
    ("command", "name", "phrase"),
    [
        ("elbo", "DecodeExits", "decode(z) raised SystemExit: 0 at "),
        ("ais", "DecodeExits", "raised SystemExit: 0 at "),
        ("elbo", "EncodeExits", "encode(x) raised SystemExit: 3 at "),
        ("elbo", "InitExits", "InitExits() raised SystemExit: 0"),
        ("elbo", "PriorExits", "prior() raised SystemExit: 0 at "),
    ],
)
def test_sys_exit_in_the_users_code_is_one_line_and_exit_2(folder, command, name, phrase):
    args = [command, str(folder / "w.safetensors"), str(folder / "x.npy"), "--arch", f"{folder / 'models.py'}:{name}",
            "--likelihood", "bernoulli", "--json"]
    if command == "ais":
        args += ["--steps", "3", "--chains", "2", "-k", "4"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    assert result.stdout == "" and result.stderr.count("\n") == 1 and phrase in result.stderr, result.stderr


@pytest.mark.parametrize("target", ["pkg/vaemod.py", "pkg/__init__.py"])
def test_convert_never_writes_over_the_module_arch_names(folder, tmp_path, monkeypatch, target):
    """(I) `convert -o pkg/vaemod.py --arch pkg.vaemod:M` wrote safetensors bytes over the user's module: the check
    that an output is never an input compared against 'pkg.vaemod' as a path. Now the module's file and its
    packages' __init__.py are inputs."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("# the user's package\n")
    (package / "vaemod.py").write_text(MODELS)
    before = {name: (package / name).read_bytes() for name in ("__init__.py", "vaemod.py")}
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["convert", str(folder / "w.safetensors"), "--arch", "pkg.vaemod:Base",
                                       "--likelihood", "bernoulli", "--input-shape", "4", "-o", target])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"--output {target} is the input" in result.stderr and "never writes over its inputs" in result.stderr
    assert {name: (package / name).read_bytes() for name in before} == before
    for name in ("pkg", "pkg.vaemod"):
        import sys

        sys.modules.pop(name, None)


@pytest.mark.parametrize("value", ["0", "-1", "abc", "", "2,x"])
def test_a_bad_omp_num_threads_is_one_line_before_torch_loads(value):
    """(M) libgomp printed its own warning for these and went on, so any refusal was three lines."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": value}
    found = subprocess.run([sys.executable, "-m", "vaeeval", "inspect", "sample_models/digits_bernoulli.safetensors"],
                           capture_output=True, text=True, env=env, timeout=120)
    assert found.returncode == 2 and found.stdout == "", found.stderr
    assert found.stderr == (f"vaeeval: error: OMP_NUM_THREADS={value!r} is not a positive whole number of threads; "
                            "unset it, or set it to one (OMP_NUM_THREADS=2)\n")


@pytest.mark.parametrize(("name", "value", "refused"), [
    ("OMP_PROC_BIND", "abc", True), ("OMP_WAIT_POLICY", "abc", True), ("OMP_DYNAMIC", "abc", True),
    ("OMP_STACKSIZE", "abc", True), ("OMP_SCHEDULE", "abc", True), ("GOMP_SPINCOUNT", "abc", True),
    ("OMP_WAIT_POLICY", "passive", False), ("OMP_PROC_BIND", "false", False),
])
def test_any_openmp_setting_libgomp_cannot_read_is_one_line(name, value, refused):
    """(M, round 3) libgomp reads about twenty OMP_* / GOMP_* variables as torch loads and, for a value it
    cannot read, prints its own warning and goes on: refused in one line by libgomp's own judgement; a value
    it reads goes through silently."""
    import os
    import subprocess
    import sys

    env = {**os.environ, name: value}
    found = subprocess.run([sys.executable, "-m", "vaeeval", "inspect", "sample_models/digits_bernoulli.safetensors"],
                           capture_output=True, text=True, env=env, timeout=120)
    if refused:
        assert found.returncode == 2 and found.stdout == "", found.stderr
        assert found.stderr == (f"vaeeval: error: {name}={value!r} is a setting torch's OpenMP runtime (libgomp) cannot "
                                "read; unset it, or give it a value libgomp documents\n")
    else:
        assert found.returncode == 0 and found.stderr == "" and found.stdout


@pytest.mark.parametrize(
    ("environment", "phrase"),
    [
        ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not a whole number from 1 to 65536"),
        ({"WORLD_SIZE": str(10**30)}, f"WORLD_SIZE='{10**30}' is not a whole number from 1 to 65536"),
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 asks for 2 processes, but MASTER_ADDR is not set"),
        ({"WORLD_SIZE": "2", "RANK": "5", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
         "RANK='5' is not a whole number from 0 to 1"),
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_WORLD_SIZE": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
         "LOCAL_WORLD_SIZE='0' is not a whole number from 1 to 2"),
        ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "99999"},
         "MASTER_PORT='99999' is not a whole number from 1 to 65535"),
    ],
)
def test_torchrun_environments_that_cannot_be_are_one_line(monkeypatch, environment, phrase):
    """(J, K, L) these gave tracebacks, or (a rank past the world size) waited forever."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(main, ["inspect", "sample_models/digits_bernoulli.safetensors"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and phrase in result.stderr, result.stderr


def test_a_log_prob_of_the_wrong_shape_is_refused_not_summed():
    """(C) a decode distribution whose log_prob gave [N, 2] for 6 values was summed anyway (recon -2.04 for a
    true -5.82); an unsummed custom q's log_prob gave a traceback. Both are now one refusal naming the shapes."""
    from torch.distributions import Normal

    from vaeeval.user.distributions import log_prob64, log_prob_of

    class Halved(Normal):
        def log_prob(self, value):
            return super().log_prob(value)[..., :2]  # two numbers where there are six

    with pytest.raises(ValueError, match=r"Halved.log_prob gives \[3, 2\] for values of shape \[3, 6\]"):
        log_prob_of(Halved(torch.zeros(3, 6), 1.0), torch.zeros(3, 6))

    class Unsummed(Normal):  # a custom q over [4] whose log_prob forgets to sum its event
        @property
        def event_shape(self):
            return torch.Size([4])

        @property
        def batch_shape(self):
            return torch.Size([3])

    with pytest.raises(ValueError, match=r"Unsummed.log_prob gives \[5, 3, 4\] for values of shape \[5, 3, 4\]"):
        log_prob64(Unsummed(torch.zeros(3, 4), 1.0), torch.zeros(5, 3, 4))


# ---------------------------------------------------------------- issue 28, B to H: what the user's code returns

DISTRIBUTIONS = """
import torch
from torch import nn
from torch.distributions import (Bernoulli, Dirichlet, Distribution, Independent, MultivariateNormal, Normal,
                                 constraints)


class Plain(nn.Module):
    def __init__(self, view=False, layout="rows", dtype="float32", grad=False, batch="rows"):
        super().__init__()
        self.enc, self.dec = nn.Linear(4, 4), nn.Linear(2, 4)
        self.view, self.layout, self.dtype, self.grad, self.batch = view, layout, dtype, grad, batch

    def encode(self, x):
        mean, log_var = self.enc(x).chunk(2, -1)
        return Independent(Normal(mean, (0.5 * log_var).exp()), 1)

    def decode(self, z):
        logits = self.dec(z)
        if self.view:
            logits = logits.view(-1, 2, 2).view(-1, 4)
        if self.layout == "transposed":  # non-contiguous
            logits = logits.t().contiguous().t()
        elif self.layout == "expanded":  # a stride-0 view
            logits = logits[:, :1].expand(-1, 4) + (logits - logits[:, :1])
        if self.grad:
            logits = logits + torch.zeros(4, requires_grad=True)
        logits = logits.to(getattr(torch, self.dtype))
        if self.batch == "first":  # [1, D] for N latent vectors
            logits = logits[:1]
        elif self.batch == "column":  # [N, 1]
            logits = logits.mean(-1, keepdim=True)
        return Independent(Bernoulli(logits=logits), 1)

    def prior(self):
        return Independent(Normal(torch.zeros(2), torch.ones(2)), 1)


class Same(Normal):  # a subclass with its own log_prob, which gives what Normal's gives
    def log_prob(self, value):
        return super().log_prob(value)


class Plus(Normal):  # the same, plus 50 per value: 100 over a latent vector of 2
    def log_prob(self, value):
        return super().log_prob(value) + 50.0


class SameMVN(MultivariateNormal):
    def log_prob(self, value):
        return super().log_prob(value)


class PlusMVN(MultivariateNormal):
    def log_prob(self, value):
        return super().log_prob(value) + 100.0


class IndependentSame(Independent):
    def log_prob(self, value):
        return super().log_prob(value)


class IndependentPlus(Independent):
    def log_prob(self, value):
        return super().log_prob(value) + 100.0


class PriorIndependentSame(Plain):
    def prior(self):
        return IndependentSame(Normal(torch.zeros(2), torch.ones(2)), 1)


class PriorIndependentPlus(Plain):
    def prior(self):
        return IndependentPlus(Normal(torch.zeros(2), torch.ones(2)), 1)


class Unconstrained(Distribution):  # says no arg_constraints (Distribution's own raises NotImplementedError)
    support = constraints.real_vector

    def __init__(self, mean):
        self.mean_ = mean
        super().__init__(mean.shape[:1], mean.shape[1:], validate_args=False)

    def log_prob(self, z):
        return -0.5 * ((z - self.mean_) ** 2).sum(-1)

    def rsample(self, sample_shape=torch.Size()):
        return self.mean_ + torch.randn(*sample_shape, *self.mean_.shape)


class NoArgConstraints(Plain):
    def encode(self, x):
        return Unconstrained(self.enc(x).chunk(2, -1)[0])


class Bits(Distribution):  # a discrete q of its own, whose sample gives integers
    arg_constraints = {}
    support = constraints.independent(constraints.boolean, 1)

    def __init__(self, probs):
        self.probs_ = probs
        super().__init__(probs.shape[:1], probs.shape[1:], validate_args=False)

    def log_prob(self, z):
        z = z.to(self.probs_.dtype)
        return (z * self.probs_.log() + (1 - z) * (1 - self.probs_).log()).sum(-1)

    def sample(self, sample_shape=torch.Size()):
        return (torch.rand(*sample_shape, *self.probs_.shape) < self.probs_).long()


class IntegerDraws(Plain):
    def encode(self, x):
        return Bits(torch.sigmoid(self.enc(x)[:, :2]))

    def prior(self):
        return Independent(Bernoulli(probs=torch.full((2,), 0.5)), 1)


class PriorSame(Plain):
    def prior(self):
        return Independent(Same(torch.zeros(2), torch.ones(2)), 1)


class PriorPlus(Plain):
    def prior(self):
        return Independent(Plus(torch.zeros(2), torch.ones(2)), 1)


class PriorSameMVN(Plain):
    def prior(self):
        return SameMVN(torch.zeros(2), torch.eye(2))


class PriorPlusMVN(Plain):
    def prior(self):
        return PlusMVN(torch.zeros(2), torch.eye(2))


class EncodeSame(Plain):
    def encode(self, x):
        mean, log_var = self.enc(x).chunk(2, -1)
        return Independent(Same(mean, (0.5 * log_var).exp()), 1)


class EncodePlus(Plain):
    def encode(self, x):
        mean, log_var = self.enc(x).chunk(2, -1)
        return Independent(Plus(mean, (0.5 * log_var).exp()), 1)


class WidthChanges(Plain):
    calls = 0

    def encode(self, x):
        type(self).calls += 1
        mean, log_var = self.enc(x).chunk(2, -1)
        if type(self).calls > 1:
            mean, log_var = torch.cat([mean, mean[:, :1]], 1), torch.cat([log_var, log_var[:, :1]], 1)
        return Independent(Normal(mean, (0.5 * log_var).exp()), 1)


class WidthChangesTuple(Plain):
    calls = 0

    def encode(self, x):
        type(self).calls += 1
        mean, log_var = self.enc(x).chunk(2, -1)
        return (mean, log_var) if type(self).calls == 1 else (mean[:, :1], log_var[:, :1])

    def decode(self, z):
        return self.dec(torch.cat([z, z], -1)[:, :2])

    prior = None


class ComplexMean(Plain):
    def encode(self, x):
        mean, log_var = self.enc(x).chunk(2, -1)
        return mean + 1j, log_var


class ComplexLoc(Plain):
    def encode(self, x):
        mean, log_var = self.enc(x).chunk(2, -1)
        return Independent(Normal(mean + 0j, (0.5 * log_var).exp(), validate_args=False), 1)


class IntegerLoc(Plain):
    def decode(self, z):
        return Independent(Normal(self.dec(z).round().long(), torch.ones(4, dtype=torch.long)), 1)


class BooleanProbs(Plain):
    def decode(self, z):
        return Independent(Bernoulli(probs=self.dec(z) > 0), 1)


class MetaLogits(Plain):
    def decode(self, z):
        return Independent(Bernoulli(logits=self.dec(z).to("meta"), validate_args=False), 1)


class MetaPrior(Plain):
    def prior(self):
        return Independent(Normal(torch.zeros(2, device="meta"), torch.ones(2, device="meta"), validate_args=False), 1)


class ComplexParameters(Plain):
    def decode(self, z):
        return self.dec(z) + 0j

    prior = None


class IntegerParameters(Plain):
    def decode(self, z):
        return self.dec(z).round().long()

    prior = None


class Undrawable(Distribution):
    arg_constraints = {}
    support = constraints.real_vector

    def __init__(self, mean):
        self.mean_ = mean
        super().__init__(mean.shape[:1], mean.shape[1:], validate_args=False)

    def log_prob(self, z):
        return -0.5 * ((z - self.mean_) ** 2).sum(-1)


class NoSample(Plain):
    def encode(self, x):
        return Undrawable(self.enc(x).chunk(2, -1)[0])


class Unscored(Bernoulli):
    log_prob = Distribution.log_prob


class NoLogProb(Plain):
    def decode(self, z):
        return Independent(Unscored(logits=self.dec(z)), 1)


class Simplex(Plain):  # p(x|z) does not depend on z: recon is the Dirichlet's own log-density of the data
    def decode(self, z):
        return Dirichlet((nn.functional.softplus(self.dec.bias) + 0.5).expand(z.shape[0], 4))


class Above(Bernoulli):  # log_prob + 30 over a data point of 4
    def log_prob(self, value):
        return super().log_prob(value) + 7.5


class AboveOne(Plain):
    def decode(self, z):
        return Independent(Above(logits=self.dec(z)), 1)


class Rounded(Bernoulli):  # log_prob above 0 by rounding only: not refused
    def log_prob(self, value):
        return super().log_prob(value) + 1e-9


class RoundedUp(Plain):
    def decode(self, z):
        return Independent(Rounded(logits=self.dec(z).double()), 1)


class IntegerLogProb(Bernoulli):
    def log_prob(self, value):
        return super().log_prob(value).round().long()


class IntegerScores(Plain):
    def decode(self, z):
        return Independent(IntegerLogProb(logits=self.dec(z)), 1)


class BrokenMean(Normal):
    @property
    def mean(self):
        raise RuntimeError("no mean")


class MeanRaises(Plain):
    def encode(self, x):
        mean, log_var = self.enc(x).chunk(2, -1)
        return Independent(BrokenMean(mean, (0.5 * log_var).exp()), 1)
"""


@pytest.fixture(scope="module")
def returns(tmp_path_factory):
    folder = tmp_path_factory.mktemp("returns")
    (folder / "models.py").write_text(DISTRIBUTIONS)
    torch.manual_seed(0)
    weights = {"enc.weight": torch.randn(4, 4), "enc.bias": torch.zeros(4), "dec.weight": torch.randn(4, 2),
               "dec.bias": torch.linspace(-1, 1, 4)}
    save_file(weights, folder / "w.safetensors")
    generator = np.random.default_rng(0)
    np.save(folder / "x.npy", (generator.random((5, 4)) < 0.5).astype(np.float32))
    np.save(folder / "simplex.npy", generator.dirichlet(np.ones(4), 5).astype(np.float32))
    np.save(folder / "one_hot.npy", np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 1]])
    return folder


def _run(folder, name, command="elbo", data="x.npy", *extra):
    args = [command, str(folder / "w.safetensors"), str(folder / data), "--arch", f"{folder / 'models.py'}:{name}", "--json",
            *extra]
    if command == "ais":  # from q(z|x): from the prior, a constant added to log p(z) cancels
        args += ["--steps", "3", "--chains", "2", "-k", "4", "--init", "encoder"]
    return CliRunner().invoke(main, args)


def _summary(result):
    import json

    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)["summary"]


def _refused(result, phrase):
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    assert result.stdout == "" and result.stderr.count("\n") == 1 and phrase in result.stderr, result.stderr


@pytest.mark.parametrize(("same", "plus", "change"), [("PriorSame", "PriorPlus", 100.0), ("PriorSameMVN", "PriorPlusMVN", 100.0),
                                                     ("PriorIndependentSame", "PriorIndependentPlus", 100.0),
                                                     ("EncodeSame", "EncodePlus", -100.0)])
@pytest.mark.parametrize("command", ["elbo", "ais"])
def test_a_subclass_of_normal_is_scored_by_its_own_log_prob(returns, command, same, plus, change):
    """(B) a Normal or MultivariateNormal subclass from prior() or encode() was rebuilt as the plain class, so its
    log_prob override was dropped: a prior adding 100 scored the same as without it. Now log p(z) (or log q(z|x))
    is 100 more, so every bound moves by +100 (-100 for q, whose log is subtracted): the ELBO and IWAE by
    E_q[log p(z) + 100 - log q] and log mean exp of the same, AIS by its log-weights' sum over beta of
    (beta_t - beta_t-1) 100 (the chains' moves, which see 100 only as a constant factor of each target, are
    unchanged)."""
    first, second = _summary(_run(returns, same, command)), _summary(_run(returns, plus, command))
    for name in (("elbo", "iwae") if command == "elbo" else ("ais", "iwae")):
        assert second[name]["mean"] - first[name]["mean"] == pytest.approx(change, abs=1e-6), name


@pytest.mark.parametrize("name", ["WidthChanges", "WidthChangesTuple"])
def test_a_latent_width_that_changes_is_one_line(returns, name):
    """(D) a reshape traceback, on either path (a distribution from encode, or (mean, log_var) on the fast path)."""
    _refused(_run(returns, name, "elbo", "x.npy", *(("--likelihood", "bernoulli") if "Tuple" in name else ())),
             "encode(x) returned latent vectors of width ")


@pytest.mark.parametrize(
    ("name", "phrase"),
    [
        ("ComplexMean", "encode(x) returned a tuple whose item 0 is complex (torch.complex64)"),
        ("ComplexLoc", "encode(x) returned Independent(Normal) whose loc is complex (torch.complex64)"),
        ("IntegerLoc", "decode(z) returned Independent(Normal) whose loc is torch.int64; vaeeval needs real floating"),
        ("BooleanProbs", "decode(z) returned Independent(Bernoulli) whose probs is torch.bool"),
        ("MetaLogits", "decode(z) returned Independent(Bernoulli) whose logits is on the meta device"),
        ("MetaPrior", "prior() returned Independent(Normal) whose loc is on the meta device"),
        ("ComplexParameters", "decode(z) returned a tensor that is complex"),
        ("IntegerParameters", "decode(z) returned a tensor that is torch.int64"),
        ("IntegerScores", "decode(z)'s Independent(IntegerLogProb): its result is torch.int64"),
    ],
)
def test_tensors_vaeeval_cannot_read_are_one_line(returns, name, phrase):
    """(E) a complex mean lost its imaginary part silently; meta, integer and boolean tensors gave tracebacks or
    numbers from something else (an integer log_prob, rounded, was summed as it was)."""
    extra = ("--likelihood", "bernoulli") if name.endswith("Parameters") else ()
    _refused(_run(returns, name, "elbo", "x.npy", *extra), phrase)


@pytest.mark.parametrize(
    ("name", "phrase"),
    [
        ("NoSample", "encode(x) returned Undrawable, which defines neither rsample nor sample; vaeeval needs one of them"),
        ("NoLogProb", "decode(z) returned Independent(Unscored), which defines no log_prob"),
    ],
)
def test_a_distribution_without_the_methods_vaeeval_calls_is_one_line(returns, name, phrase):
    """(F) a q(z|x) with no sample or rsample gave NotImplementedError's traceback from inside vaeeval."""
    _refused(_run(returns, name), phrase)


def test_a_dirichlet_decoder_is_scored_as_the_density_it_is(returns):
    """(G) a Dirichlet p(x|z) (a density on the probability simplex): data on the simplex get its log_prob; data off
    it are refused naming the point (a traceback before: the simplex is checked per vector, not per value); discrete
    data, which vaeeval would score on per-value bins, are refused naming --density."""
    from torch.distributions import Dirichlet

    x = torch.from_numpy(np.load(returns / "simplex.npy")).double()
    concentration = torch.nn.functional.softplus(torch.linspace(-1, 1, 4)).double() + 0.5
    expected = Dirichlet(concentration).log_prob(x).mean().item()
    summary = _summary(_run(returns, "Simplex", "elbo", "simplex.npy"))
    assert summary["recon"]["mean"] == pytest.approx(expected, abs=1e-5)
    assert summary["measure"] == "density"
    _refused(_run(returns, "Simplex"), "point 0, element [0] is 0; the decode() likelihood needs points of the probability simplex")
    _refused(_run(returns, "Simplex", "elbo", "one_hot.npy"), "has no bin per value to score the discrete data on: pass --density")


@pytest.mark.parametrize("command", ["elbo", "ais"])
def test_a_discrete_log_prob_above_zero_is_refused(returns, command):
    """(H) a Bernoulli subclass whose log_prob gave +30 over a point was reported as a log-probability (ELBO +23)."""
    _refused(_run(returns, "AboveOne", command), "log p(x|z) of a discrete distribution must be at most 0 (the log of a "
             "probability), found +")


def test_a_discrete_log_prob_above_zero_by_rounding_is_taken(returns):
    """(H) the refusal leaves rounding alone: 1e-9 above 0 is a log-probability of 0."""
    assert _summary(_run(returns, "RoundedUp"))["elbo"]["mean"] < 0


@pytest.mark.parametrize("name", ["NoArgConstraints", "IntegerDraws"])
def test_distributions_of_the_users_own_are_taken_as_they_are(returns, name):
    """(round 3) what the checks must leave alone: a q declaring no ``arg_constraints`` (Distribution's own raises
    NotImplementedError), a discrete q whose own ``sample`` gives integers; both evaluated by their own draws."""
    assert _summary(_run(returns, name))["elbo"]["mean"] < 0


def test_a_subclass_whose_mean_raises_is_drawn_instead(returns):
    """(round 3) now that a subclass is used as it is, a ``mean`` property that raises makes vaeeval take q's moments
    from the draws (it gave RuntimeError's traceback); the bounds are those of the plain Normal."""
    plain = _summary(_run(returns, "Plain"))["elbo"]["mean"]
    assert _summary(_run(returns, "MeanRaises"))["elbo"]["mean"] == pytest.approx(plain, abs=1e-5)


def test_views_strides_gradients_and_broadcasts_from_decode_are_read_or_refused(returns):
    """(round 3) a property over what decode returns: a view, a non-contiguous or stride-0 tensor, one that requires
    grad, float64 instead of float32 give the plain model's number; a batch of [1, D] or [N, 1] for N latent vectors
    (which would broadcast against the data) is one line, exit 2."""
    import json

    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    reference = _summary(_run(returns, "Plain"))["elbo"]["mean"]

    @hypothesis.settings(max_examples=10, deadline=None, derandomize=True, database=None)
    @hypothesis.given(view=st.booleans(), layout=st.sampled_from(["rows", "transposed", "expanded"]),
                      dtype=st.sampled_from(["float32", "float64"]), grad=st.booleans(),
                      batch=st.sampled_from(["rows", "rows", "first", "column"]))
    def check(view, layout, dtype, grad, batch):
        knobs = json.dumps({"view": view, "layout": layout, "dtype": dtype, "grad": grad, "batch": batch})
        result = _run(returns, "Plain", "elbo", "x.npy", "--arch-args", knobs)
        if batch == "rows":
            assert _summary(result)["elbo"]["mean"] == pytest.approx(reference, abs=1e-5), knobs
        else:
            _refused(result, "vaeeval needs one data point (4 values) per latent vector")

    check()
