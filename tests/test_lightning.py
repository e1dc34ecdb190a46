"""``vaeeval convert --from lightning``: a Lightning checkpoint's state_dict read by torch's weights-only loader.

A tiny LightningModule holding the VAE as ``self.vae`` is trained for a few steps by
``lightning.Trainer`` and saved with ``trainer.save_checkpoint``; its weights come out with
the ``vae.`` prefix stripped, as a state dict for ``--arch`` and as a verified format-1 file,
and give the numbers of the module's own state dict.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from vaeeval.analysis.lightning import torch_is_safe
from vaeeval.cli import main

lightning = pytest.importorskip("lightning")

DIMS = 12
VAE_PY = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from torch import nn


    class VAE(nn.Module):
        def __init__(self, dims=12, hidden=8, latent_dim=2):
            super().__init__()
            self.fc1 = nn.Linear(dims, hidden)
            self.fc21 = nn.Linear(hidden, latent_dim)
            self.fc22 = nn.Linear(hidden, latent_dim)
            self.fc3 = nn.Linear(latent_dim, hidden)
            self.fc4 = nn.Linear(hidden, dims)

        def encode(self, x):
            h = F.relu(self.fc1(x))
            return self.fc21(h), self.fc22(h)

        def decode(self, z):
            return torch.sigmoid(self.fc4(F.relu(self.fc3(z))))


    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(12, 4)
''')
BERNOULLI = ["--likelihood", "bernoulli", "--decoder-output", "probs"]


class Marker:
    """An object whose unpickling would write a file: it must never be unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "ran"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """vae.py, data.npy, vae.ckpt (a Lightning checkpoint) and the trained VAE's own state dict (own.safetensors)."""
    folder = tmp_path_factory.mktemp("lightning")
    (folder / "vae.py").write_text(VAE_PY)
    sys.path.insert(0, str(folder))
    sys.modules.pop("vae", None)  # another test's vae.py may have been imported under that name
    try:
        import vae as vae_module

        class LitVAE(lightning.LightningModule):
            def __init__(self, lr=1e-2):
                super().__init__()
                self.save_hyperparameters()  # as most modules do: the checkpoint then holds hyper_parameters
                self.vae = vae_module.VAE(DIMS)
                self.register_buffer("loss_scale", torch.ones(1))  # a tensor outside the VAE

            def training_step(self, batch, _):
                (x,) = batch
                mean, log_var = self.vae.encode(x)
                z = mean + torch.randn_like(mean) * (0.5 * log_var).exp()
                recon = torch.nn.functional.binary_cross_entropy(self.vae.decode(z), x, reduction="sum")
                return recon - 0.5 * (1 + log_var - mean**2 - log_var.exp()).sum()

            def configure_optimizers(self):
                return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

        torch.manual_seed(0)
        x = (torch.rand(64, DIMS) < 0.3).float()
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=16)
        trainer = lightning.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                                    enable_progress_bar=False, enable_model_summary=False)
        module = LitVAE()
        trainer.fit(module, loader)
        trainer.save_checkpoint(folder / "vae.ckpt")
        assert torch.load(folder / "vae.ckpt", weights_only=True)["hyper_parameters"] == {"lr": 1e-2}
        save_file({k: v.contiguous() for k, v in module.vae.state_dict().items()}, folder / "own.safetensors")
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("vae", None)
    np.save(folder / "data.npy", x[:20].numpy())
    return folder


def run(*args, code=0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, (result.output, result.exception)
    return result


def refused(*args) -> str:
    result = run(*args, code=2)
    assert result.stdout == "" and result.stderr.count("\n") == 1, result.output
    return result.stderr.removeprefix("vaeeval: error: ").rstrip("\n")


def test_the_state_dict_comes_out_with_the_prefix_stripped_and_gives_the_modules_own_numbers(trained, tmp_path):
    out = tmp_path / "weights.safetensors"
    result = run("convert", "--from", "lightning", trained / "vae.ckpt", "--arch", f"{trained / 'vae.py'}:VAE", "--state-dict",
                 "-o", out)
    assert result.stdout.splitlines() == [
        "read vae.ckpt's state_dict with torch's weights-only loader: 10 tensors, prefix 'vae.' stripped; "
        "left out 1 outside it (loss_scale)",
        f"wrote {out}: the state dict of {trained / 'vae.py'}:VAE; evaluate it with --arch {trained / 'vae.py'}:VAE",
    ]
    own = load_file(trained / "own.safetensors")
    written = load_file(out)
    assert sorted(written) == sorted(own)
    assert all(torch.equal(written[k], own[k]) for k in own)
    arch = ["--arch", f"{trained / 'vae.py'}:VAE", *BERNOULLI, "-k", "8", "--json"]
    ours = json.loads(run("elbo", out, trained / "data.npy", *arch).stdout)
    theirs = json.loads(run("elbo", trained / "own.safetensors", trained / "data.npy", *arch).stdout)
    assert [p["iwae"] for p in ours["points"]] == [p["iwae"] for p in theirs["points"]]


def test_format_1_from_the_checkpoint_is_verified_and_gives_the_same_numbers(trained, tmp_path):
    out = tmp_path / "model.safetensors"
    result = run("convert", "--from", "lightning", trained / "vae.ckpt", "--arch", f"{trained / 'vae.py'}:VAE", *BERNOULLI,
                 "--data", trained / "data.npy", "-o", out)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("read vae.ckpt's state_dict with torch's weights-only loader: 10 tensors, prefix 'vae.' stripped")
    assert lines[1].startswith(f"wrote {out}: format 1, 3 encoder and 3 decoder layers, bernoulli likelihood")
    converted = json.loads(run("elbo", out, trained / "data.npy", "-k", "8", "--json").stdout)
    assert "converted from vae.ckpt" in converted["model"]["description"]
    own = json.loads(run("elbo", trained / "own.safetensors", trained / "data.npy", "-k", "8", "--json",
                         "--arch", f"{trained / 'vae.py'}:VAE", *BERNOULLI).stdout)
    np.testing.assert_allclose([p["iwae"] for p in converted["points"]], [p["iwae"] for p in own["points"]], rtol=1e-5)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]  # the staged weights are gone


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy pickle"])
def test_a_plain_torch_saved_state_dict_needs_no_prefix(trained, tmp_path, legacy):
    out, plain = tmp_path / "w.safetensors", tmp_path / "plain.pt"
    torch.save(load_file(trained / "own.safetensors"), plain, _use_new_zipfile_serialization=not legacy)
    result = run("convert", "--from", "lightning", plain, "--arch", f"{trained / 'vae.py'}:VAE", "--state-dict", "-o", out)
    assert result.stdout.splitlines()[0] == "read plain.pt with torch's weights-only loader: 10 tensors"
    assert all(torch.equal(load_file(out)[k], v) for k, v in load_file(trained / "own.safetensors").items())


def test_a_checkpoint_holding_objects_is_refused_and_nothing_in_it_runs(trained, tmp_path):
    marker = tmp_path / "ran.txt"
    torch.save({"state_dict": load_file(trained / "own.safetensors"), "callback": Marker(str(marker))}, tmp_path / "bad.ckpt")
    before = (tmp_path / "bad.ckpt").read_bytes()
    message = refused("convert", "--from", "lightning", tmp_path / "bad.ckpt", "--arch", f"{trained / 'vae.py'}:VAE",
                      "--state-dict", "-o", tmp_path / "w.safetensors")
    assert message.startswith(f"{tmp_path / 'bad.ckpt'}: holds a Python object (")
    assert not marker.exists() and not (tmp_path / "w.safetensors").exists()
    assert (tmp_path / "bad.ckpt").read_bytes() == before


def test_hyperparameters_saved_as_an_object_are_refused_naming_it(trained, tmp_path):
    torch.save({"state_dict": load_file(trained / "own.safetensors"), "hyper_parameters": argparse.Namespace(lr=0.1)},
               tmp_path / "hp.ckpt")
    message = refused("convert", "--from", "lightning", tmp_path / "hp.ckpt", "--arch", f"{trained / 'vae.py'}:VAE",
                      "--state-dict", "-o", tmp_path / "w.safetensors")
    assert message == (
        f"{tmp_path / 'hp.ckpt'}: holds a Python object (argparse.Namespace) that torch's weights-only loader refuses (vaeeval "
        "never unpickles objects); save the weights from your code: safetensors.torch.save_file(module.vae.state_dict(), "
        "'weights.safetensors')"
    )


def test_a_torch_too_old_for_a_safe_weights_only_load_is_refused(trained, tmp_path, monkeypatch):
    assert torch_is_safe("2.6.0") and torch_is_safe("2.13.0+cpu") and not torch_is_safe("2.5.1") and not torch_is_safe("1.13.1")
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    message = refused("convert", "--from", "lightning", trained / "vae.ckpt", "--arch", f"{trained / 'vae.py'}:VAE",
                      "--state-dict", "-o", tmp_path / "w.safetensors")
    assert message == (f"{trained / 'vae.ckpt'}: torch 2.5.1 cannot read a checkpoint safely (its weights-only loader could run "
                       "code before 2.6, CVE-2025-32434); pip install 'torch>=2.6'")


def test_keys_that_do_not_fit_are_refused_in_one_line(trained, tmp_path):
    spec = f"{trained / 'vae.py'}"
    message = refused("convert", "--from", "lightning", trained / "vae.ckpt", "--arch", f"{spec}:Other", "--state-dict",
                      "-o", tmp_path / "w.safetensors")
    assert message == (f"{trained / 'vae.ckpt'}: does not fit --arch {spec}:Other: its keys (encoder.weight, encoder.bias) are "
                       "not the checkpoint's, nor under one prefix of them; the checkpoint holds loss_scale, vae.fc1.weight, "
                       "vae.fc1.bias, vae.fc21.weight and 7 more")
    message = refused("convert", "--from", "lightning", trained / "vae.ckpt", "--arch", f"{spec}:VAE", "--arch-args",
                      '{"hidden": 5}', "--state-dict", "-o", tmp_path / "w.safetensors")
    assert message.startswith(f"{trained / 'vae.ckpt'}: does not fit --arch {spec}:VAE: fc1.weight is [8, 12] in the file, "
                              "[5, 12] in the module")


def test_the_same_class_under_two_prefixes_is_refused(trained, tmp_path):
    own = load_file(trained / "own.safetensors")
    torch.save({"state_dict": {**{f"vae.{k}": v for k, v in own.items()}, **{f"ema.{k}": v for k, v in own.items()}}},
               tmp_path / "two.ckpt")
    message = refused("convert", "--from", "lightning", tmp_path / "two.ckpt", "--arch", f"{trained / 'vae.py'}:VAE",
                      "--state-dict", "-o", tmp_path / "w.safetensors")
    assert message == (f"{tmp_path / 'two.ckpt'}: every key of --arch {trained / 'vae.py'}:VAE is there under several prefixes "
                       "(ema., vae.); save the one you mean: safetensors.torch.save_file(module.<name>.state_dict(), "
                       "'weights.safetensors')")


def test_not_a_state_dict_and_not_torch_are_refused(trained, tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    assert refused("convert", "--from", "lightning", tmp_path / "list.pt", "--arch", f"{trained / 'vae.py'}:VAE",
                   "--state-dict", "-o", tmp_path / "w.safetensors") == (
        f"{tmp_path / 'list.pt'}: holds a list, not a state dict (nor a Lightning checkpoint's 'state_dict')")
    content = (trained / "vae.ckpt").read_bytes()
    (tmp_path / "text.ckpt").write_text("hello")
    (tmp_path / "half.ckpt").write_bytes(content[: len(content) // 2])
    (tmp_path / "tail.ckpt").write_bytes(content[len(content) // 2 :])
    for name in ("text.ckpt", "half.ckpt", "tail.ckpt"):
        message = refused("convert", "--from", "lightning", tmp_path / name, "--arch", f"{trained / 'vae.py'}:VAE",
                          "--state-dict", "-o", tmp_path / "w.safetensors")
        assert message.startswith(f"{tmp_path / name}: "), message
        assert not (tmp_path / "w.safetensors").exists()


def test_the_checkpoint_is_never_written_over(trained):
    before = (trained / "vae.ckpt").read_bytes()
    message = refused("convert", "--from", "lightning", trained / "vae.ckpt", "--arch", f"{trained / 'vae.py'}:VAE",
                      "--state-dict", "-o", trained / "vae.ckpt")
    assert "vaeeval never writes over its inputs" in message
    assert (trained / "vae.ckpt").read_bytes() == before


def test_state_dict_needs_from_lightning(trained, tmp_path):
    result = run("convert", trained / "own.safetensors", "--arch", f"{trained / 'vae.py'}:VAE", "--state-dict",
                 "-o", tmp_path / "w.safetensors", code=2)
    assert "--state-dict writes the weights of a checkpoint read with --from lightning" in result.stderr


@pytest.mark.parametrize("arch", [False, True])
def test_a_checkpoint_given_as_model_names_the_convert_command(trained, arch):
    extra = ["--arch", f"{trained / 'vae.py'}:VAE", *BERNOULLI] if arch else []
    message = refused("elbo", trained / "vae.ckpt", trained / "data.npy", *extra)
    assert message == (f"{trained / 'vae.ckpt'}: a zip archive (a PyTorch .pt/.pth/.ckpt checkpoint?), not a safetensors file; "
                       "vaeeval never unpickles files; get the weights out with torch's weights-only loader: vaeeval convert "
                       f"--from lightning {trained / 'vae.ckpt'} --arch FILE.py:CLASS --state-dict -o weights.safetensors")
