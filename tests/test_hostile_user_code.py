"""Hostile input, second round (issue 28, A): sys.exit() in the user's --arch code is one line and exit 2.

SystemExit is no Exception, so an `except Exception` let it through: sys.exit(0) in decode ended vaeeval
with exit 0 and nothing printed, even with --json; sys.exit(3) with exit 3 and no message.
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
