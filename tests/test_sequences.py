"""Sequences through --arch: a teacher-forced GRU sentence VAE on padded token sequences (--lengths).

The model is the README's, trained here for a few seconds on sentences with structure; its
log p(x) is checked against an importance-sampling reference computed in this file with torch
in float64 (log-softmax and a gather over the positions that count, not vaeeval's code).
"""

from __future__ import annotations

import copy
import json
import math
import re
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from conftest import cli, jsonl
from safetensors.torch import save_file

from vaeeval.results.schemas import schema

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- tests/test_sequences.py runs this block and the command after it -->"
N, T, VOCAB = 48, 9, 8


def _readme_example() -> tuple[str, list[str]]:
    after = README.read_text().split(MARKER, 1)[1]
    match = re.match(r"\n```python\n(.*?)```\s*\n```sh\n(.*?)```", after, re.S)
    assert match, "the marked example is a ```python block, then a ```sh block"
    commands = [line.split() for line in match.group(2).splitlines() if line.strip() and not line.startswith("#")]
    return match.group(1), commands


def _sentences(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """[N, T] token ids with structure (a sentence counts up or down from a random start), padded with 0."""
    generator = np.random.default_rng(seed)
    lengths = generator.integers(2, T + 1, N)
    start, step = generator.integers(0, VOCAB, N), generator.choice([1, -1], N)
    x = (start[:, None] + step[:, None] * np.arange(T)) % VOCAB
    noisy = generator.random((N, T)) < 0.1
    x[noisy] = generator.integers(0, VOCAB, int(noisy.sum()))
    x[np.arange(T) >= lengths[:, None]] = 0
    return x.astype(np.int64), lengths.astype(np.int64)


def _reference_terms(module, x: torch.Tensor, lengths: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """log p(x|z) [S, B] in float64, by a log-softmax and a gather over the positions before each length."""
    samples, rows, _ = z.shape
    repeated = x.repeat(samples, 1)
    inputs = torch.cat([torch.full_like(repeated[:, :1], module.vocab), repeated[:, :-1]], 1)
    states, _ = module.decoder(module.embed(inputs), module.to_h(z.reshape(samples * rows, -1)).tanh()[None])
    logits = torch.log_softmax(module.out(states), -1)
    each = logits.gather(-1, repeated[..., None]).squeeze(-1)
    inside = torch.arange(T) < lengths.repeat(samples)[:, None]
    return (each * inside).sum(-1).reshape(samples, rows)


def _train(module, x: np.ndarray, lengths: np.ndarray, steps: int = 150) -> None:
    """A few ELBO steps on the masked likelihood: enough for a posterior that is not the prior."""
    optimizer = torch.optim.Adam(module.parameters(), lr=0.02)
    data, size = torch.from_numpy(x).float(), torch.from_numpy(lengths)
    for _ in range(steps):
        mean, log_var = module.encode(data, size)
        z = mean + (0.5 * log_var).exp() * torch.randn_like(mean)
        inside = torch.arange(T) < size[:, None]
        terms = module.decode(z, data).base_dist.log_prob(data.long())
        kl = 0.5 * (mean.square() + log_var.exp() - 1 - log_var).sum(-1)
        loss = -((terms * inside).sum(-1) - kl).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The README's model, trained, its weights and data written; (directory, module, x, lengths)."""
    directory = tmp_path_factory.mktemp("sequences")
    code, _ = _readme_example()
    (directory / "sentence.py").write_text(code)
    namespace: dict = {}
    exec(compile(code, "README.md (sentence VAE)", "exec"), namespace)
    x, lengths = _sentences(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = namespace["SentenceVAE"]()
        _train(module, x, lengths)
    module.eval()
    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, directory / "sentence.safetensors")
    mask = (np.arange(T) < lengths[:, None]).astype(np.uint8)
    np.savez(directory / "sentences.npz", x=x, lengths=lengths, mask=mask)
    np.save(directory / "lengths.npy", lengths)
    return directory, module, x, lengths


def _elbo(directory: Path, *extra, data: str = "sentences.npz", code: int = 0, samples: int = 200):
    return cli("elbo", directory / "sentence.safetensors", directory / data, "--key", "x",
               "--arch", f"{directory / 'sentence.py'}:SentenceVAE", "-k", samples, *extra, code=code)


def _document(directory: Path, *extra, **options) -> dict:
    return json.loads(_elbo(directory, "--json", *extra, **options).stdout)


def test_readme_example_runs(trained):
    """The README's command, as written, prints the per-token rows in place of bits/dim."""
    directory = trained[0]
    code, commands = _readme_example()
    assert len([line for line in code.splitlines() if line.strip()]) <= 24
    (command,) = commands
    assert command[:2] == ["vaeeval", "elbo"]
    args = [str(directory / a) if a.endswith((".npz", ".safetensors")) or ".py:" in a else a for a in command[2:]]
    output = cli("elbo", *args, "-k", "50").stdout
    for row in ("NLL/token", "perplexity", "bits/token"):
        assert row in output
    assert "bits/dim" not in output
    assert "teacher forcing" in output


def test_log_px_agrees_with_a_float64_reference(trained):
    """vaeeval's iwae per sentence is the model's log p(x) over the real tokens: a direct float64
    importance-sampling reference at K = 20000 agrees within 3 standard errors; the same reference
    counting the padding does not."""
    directory, module, x, lengths = trained
    document = _document(directory, "--lengths", "lengths", samples=2000)
    points = document["points"][:6]
    reference = copy.deepcopy(module).double()
    rows = torch.arange(6)
    data, size = torch.from_numpy(x[rows.numpy()]), torch.from_numpy(lengths[rows.numpy()])
    samples = 20000
    with torch.no_grad():
        mean, log_var = reference.encode(data.double(), size)
        std = (0.5 * log_var).exp()
        generator = torch.Generator().manual_seed(1)
        log_w, padded = [], []
        for _ in range(samples // 1000):
            z = mean + std * torch.randn(1000, *mean.shape, dtype=torch.float64, generator=generator)
            log_q = torch.distributions.Normal(mean, std).log_prob(z).sum(-1)
            log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
            log_w.append(_reference_terms(reference, data, size, z) + log_p - log_q)
            padded.append(_reference_terms(reference, data, torch.full_like(size, T), z) + log_p - log_q)
        log_w, padded = torch.cat(log_w), torch.cat(padded)
    log_px = (torch.logsumexp(log_w, 0) - math.log(samples)).numpy()
    log_px_padded = (torch.logsumexp(padded, 0) - math.log(samples)).numpy()
    weights = torch.softmax(log_w, 0)
    ess = 1 / weights.square().sum(0)
    reference_stderr = torch.sqrt((1 / ess - 1 / samples).clamp_min(0)).numpy()
    for point, truth, error in zip(points, log_px, reference_stderr, strict=True):
        tolerance = 3 * math.hypot(point["iwae_stderr"], error)
        assert abs(point["iwae"] - truth) < tolerance, (point["index"], point["iwae"], truth, tolerance)
    assert [p["tokens"] for p in points] == lengths[:6].tolist()
    short = np.flatnonzero(lengths[:6] < T)
    iwae = np.array([p["iwae"] for p in points])
    assert np.all(np.abs(iwae[short] - log_px_padded[short]) > 1.0)  # the padding's terms are not small


def test_per_token_numbers_follow_from_the_points(trained):
    directory, _, _, lengths = trained
    document = _document(directory, "--lengths", "lengths")
    jsonschema.Draft202012Validator(schema("vaeeval.elbo/1")).validate(document)
    iwae = np.array([p["iwae"] for p in document["points"]])
    elbo = np.array([p["elbo"] for p in document["points"]])
    tokens = np.array([p["tokens"] for p in document["points"]])
    np.testing.assert_array_equal(tokens, lengths)
    sequences = document["summary"]["sequences"]
    assert sequences["tokens"] == int(lengths.sum())
    nll = -math.fsum(iwae) / lengths.sum()
    assert sequences["nll_per_token"]["mean"] == pytest.approx(nll, rel=1e-12)
    assert sequences["perplexity"]["mean"] == pytest.approx(math.exp(nll), rel=1e-12)
    assert sequences["bits_per_token"]["mean"] == pytest.approx(nll / math.log(2), rel=1e-12)
    assert sequences["elbo_nll_per_token"]["mean"] == pytest.approx(-math.fsum(elbo) / lengths.sum(), rel=1e-12)
    assert sequences["elbo_nll_per_token"]["mean"] >= sequences["nll_per_token"]["mean"]
    ratio = -iwae / tokens  # a ratio estimator's delta-method error, against a direct formula
    residual = -iwae - nll * tokens
    expected = math.sqrt((residual**2).sum() / (N * (N - 1))) / tokens.mean()
    assert sequences["nll_per_token"]["stderr"] == pytest.approx(expected, rel=1e-9)
    assert sequences["nll_per_token"]["mean"] != pytest.approx(ratio.mean(), rel=1e-3)  # not a mean of per-sentence ratios


def _numbers(document: dict) -> tuple:
    return document["summary"] | {"scoring": None}, document["points"]


def test_padding_changes_nothing_and_a_mask_or_a_npy_is_the_same(trained, tmp_path):
    directory, _, x, lengths = trained
    base = _document(directory, "--lengths", "lengths")
    other = x.copy()
    padding = np.arange(T) >= lengths[:, None]
    other[padding] = np.random.default_rng(5).integers(0, VOCAB, int(padding.sum()))
    np.savez(directory / "repadded.npz", x=other, lengths=lengths)
    repadded = _document(directory, "--lengths", "lengths", data="repadded.npz")
    assert _numbers(repadded) == _numbers(base)
    assert repadded["data"]["digest"] != base["data"]["digest"]
    assert _numbers(_document(directory, "--lengths", "mask")) == _numbers(base)
    assert _numbers(_document(directory, "--lengths", str(directory / "lengths.npy"))) == _numbers(base)


def test_bit_identical_for_any_batch_size(trained):
    """Every byte of the document is the same but the settings that record the batch (and the chunk the memory
    budget picks for it)."""
    directory = trained[0]
    documents = [_document(directory, "--lengths", "lengths", "--batch-size", size, samples=100) for size in (1, 7, 100)]
    assert [d["settings"]["batch_size"] for d in documents] == [1, 7, 100]
    for document in documents:
        document["settings"].pop("batch_size")
        document["settings"].pop("chunk_size")
    texts = [json.dumps(document, sort_keys=True) for document in documents]
    assert texts[0] == texts[1] == texts[2]


def test_results_file_shards_and_merge_keep_the_tokens(trained, tmp_path):
    directory = trained[0]
    whole = _document(directory, "--lengths", "lengths", samples=50)
    parts = []
    for shard in ("0/2", "1/2"):
        part = tmp_path / f"part{shard[0]}.jsonl"
        _elbo(directory, "--lengths", "lengths", "--output", part, "--shard", shard, samples=50)
        parts.append(part)
    lines = [record for record in jsonl(parts[0]) if "index" in record]
    assert lines and all(isinstance(record["tokens"], int) for record in lines)
    merged = json.loads(cli("merge", *parts, "--json").stdout)
    assert merged["summary"]["sequences"] == whole["summary"]["sequences"]
    assert merged["points"] == whole["points"]


@pytest.mark.parametrize(
    ("make", "option", "message"),
    [
        (lambda x, n: {"lengths": n[:-1]}, "lengths",
         "--lengths lengths: holds 47 sequences; the data holds 48"),
        (lambda x, n: {"lengths": np.where(np.arange(N) == 3, T + 1, n)}, "lengths",
         "--lengths lengths: sequence 3 has length 10; each must be from 1 to 9, the positions of a data point"),
        (lambda x, n: {"lengths": np.where(np.arange(N) == 2, 0, n)}, "lengths",
         "--lengths lengths: sequence 2 has length 0; each must be from 1 to 9, the positions of a data point"),
        (lambda x, n: {"lengths": np.where(np.arange(N) == 4, 2.5, n)}, "lengths",
         "--lengths lengths: sequence 4 has 2.5; lengths are whole numbers"),
        (lambda x, n: {"lengths": np.zeros((N, T + 1), np.int64)}, "lengths",
         "--lengths lengths: is [48, 10]; it needs [N] lengths or an [N, 9] mask"),
        (lambda x, n: {"mask": np.where(np.arange(N)[:, None] == 1, 2, np.arange(T) < n[:, None])}, "mask",
         "--lengths mask: the mask of sequence 1 holds values other than 0 and 1"),
        (lambda x, n: {"mask": (np.arange(T) >= T - n[:, None]).astype(np.uint8)}, "mask",
         "--lengths mask: the mask of sequence 0 is not ones then zeros; vaeeval counts the positions before a sequence's length"),
        (lambda x, n: {}, "lengths", "has no array 'lengths'; it holds x"),
    ],
)
def test_bad_lengths_are_one_line_and_exit_2(trained, tmp_path, make, option, message):
    directory, _, x, lengths = trained
    np.savez(directory / "bad.npz", x=x, **make(x, lengths))
    output = tmp_path / "never.jsonl"
    result = _elbo(directory, "--lengths", option, "--output", output, data="bad.npz", code=2)
    assert result.stderr.strip().endswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not output.exists()


def test_lengths_need_arch_and_a_maskable_decoder(trained, tmp_path):
    directory = trained[0]
    result = cli("elbo", directory / "sentence.safetensors", directory / "sentences.npz", "--key", "x",
                 "--lengths", "lengths", code=2)
    assert "--lengths goes with --arch" in result.stderr
    result = _elbo(directory, code=2)
    assert result.stderr.strip() == ("vaeeval: error: encode takes lengths: the data are padded sequences, so give their "
                                     "lengths with --lengths")
    (tmp_path / "whole.py").write_text(
        "import torch\n"
        f"sys_path = {str(directory)!r}\n"
        "import sys; sys.path.insert(0, sys_path)\n"
        "from sentence import SentenceVAE\n"
        "from torch.distributions import Distribution\n\n"
        "class Whole(Distribution):\n"
        "    arg_constraints = {}\n"
        "    def __init__(self, inner):\n"
        "        self.inner = inner\n"
        "        super().__init__(inner.batch_shape, inner.event_shape, validate_args=False)\n"
        "    @property\n"
        "    def support(self):\n"
        "        return self.inner.support\n"
        "    def log_prob(self, x):\n"
        "        return self.inner.log_prob(x)\n\n"
        "class WholeVAE(SentenceVAE):\n"
        "    def decode(self, z, x):\n"
        "        return Whole(super().decode(z, x))\n"
    )
    result = cli("elbo", directory / "sentence.safetensors", directory / "sentences.npz", "--key", "x", "--arch",
                 f"{tmp_path / 'whole.py'}:WholeVAE", "--lengths", "lengths", code=2)
    assert result.stderr.strip().endswith(
        "--lengths: decode(z) returned Whole with batch shape [2] for 2 sequences of 9 positions, whose log_prob cannot be "
        "split by position; return one with batch shape [N, 9, ...] (Independent(Categorical(logits=[N, 9, V]), 1)), or take "
        "lengths or mask in decode and leave padding out of log_prob yourself"
    ), result.stderr
    sys.modules.pop("sentence", None)


def test_a_decode_named_x_is_not_teacher_forced():
    """``decode(self, x)`` whose latent is called x (as some code names it) gets z, not the data."""
    from torch import nn

    from vaeeval.user.arch import _teacher_forced

    class Named(nn.Module):
        def decode(self, x):
            return x

        def forced(self, z, x):
            return z

    assert not _teacher_forced(Named().decode)
    assert _teacher_forced(Named().forced)


def test_bdmc_refuses_a_teacher_forced_decoder(trained, tmp_path):
    """bdmc would have to draw x from p(x|z) one position at a time; it says so instead of failing in decode."""
    directory = trained[0]
    (tmp_path / "unpadded.py").write_text(
        f"import sys; sys.path.insert(0, {str(directory)!r})\n"
        "import torch\n"
        "from sentence import SentenceVAE\n\n"
        "class Unpadded(SentenceVAE):  # every sentence full length\n"
        "    def encode(self, x):\n"
        "        return super().encode(x, torch.full((len(x),), x.shape[1]))\n"
    )
    result = cli("bdmc", directory / "sentence.safetensors", "--arch", f"{tmp_path / 'unpadded.py'}:Unpadded",
                 "--input-shape", T, "--n", 2, "--steps", 2, code=2)
    assert result.stderr.strip() == (
        "vaeeval: error: bdmc simulates points from p(z) p(x|z), and decode(z, x) is teacher-forced: a draw of x from it "
        "is ancestral, one position at a time, which vaeeval does not do; run vaeeval ais on data instead"
    )
    result = cli("bdmc", directory / "sentence.safetensors", "--arch", f"{directory / 'sentence.py'}:SentenceVAE",
                 "--input-shape", T, "--lengths", "lengths", code=2)
    assert "bdmc simulates its points, and has no data to read --lengths from" in result.stderr
    sys.modules.pop("sentence", None)


def test_a_decoder_that_masks_itself_gets_the_mask(trained, tmp_path):
    """A distribution whose log_prob is one number per sentence is used as it is when decode takes ``mask``
    (``[rows, T]`` bool, true before each length): the same log p(x) as vaeeval's own masking."""
    directory = trained[0]
    (tmp_path / "own.py").write_text(
        f"import sys; sys.path.insert(0, {str(directory)!r})\n"
        "from sentence import SentenceVAE\n"
        "from torch.distributions import Distribution\n\n"
        "class Masked(Distribution):\n"
        "    arg_constraints = {}\n"
        "    def __init__(self, inner, mask):\n"
        "        self.inner, self.mask = inner, mask\n"
        "        super().__init__(inner.batch_shape, inner.event_shape, validate_args=False)\n"
        "    @property\n"
        "    def support(self):\n"
        "        return self.inner.support\n"
        "    def log_prob(self, x):\n"
        "        return (self.inner.base_dist.log_prob(x).double() * self.mask).sum(-1)\n\n"
        "class OwnMask(SentenceVAE):\n"
        "    def decode(self, z, x, mask):\n"
        "        assert mask.dtype.is_floating_point is False and mask.shape == x.shape\n"
        "        return Masked(super().decode(z, x), mask)\n"
    )
    own = json.loads(cli("elbo", directory / "sentence.safetensors", directory / "sentences.npz", "--key", "x", "--arch",
                         f"{tmp_path / 'own.py'}:OwnMask", "--lengths", "lengths", "-k", 50, "--json").stdout)
    base = _document(directory, "--lengths", "lengths", samples=50)
    assert "decode takes lengths or mask, and its log_prob is taken as already masked" in own["model"]["description"]
    np.testing.assert_allclose([p["iwae"] for p in own["points"]], [p["iwae"] for p in base["points"]], rtol=1e-5)
    assert own["summary"]["sequences"]["tokens"] == base["summary"]["sequences"]["tokens"]
    sys.modules.pop("sentence", None)


def test_masked_log_prob_of_features_per_position():
    """Positions with several features (Independent(Normal [N, T, F], 2)): each position's features summed,
    then the positions before each length; on bins too. Against torch's own numbers."""
    from torch.distributions import Independent, Normal

    from vaeeval.format.domains import Grid
    from vaeeval.user.sequences import masked_log_prob

    generator = torch.Generator().manual_seed(0)
    loc = torch.rand(3, 5, 2, generator=generator, dtype=torch.float64)
    distribution = Independent(Normal(loc, 0.3), 2)
    x = torch.rand(3, 5, 2, generator=generator, dtype=torch.float64)
    lengths = torch.tensor([5, 1, 3])
    inside = (torch.arange(5) < lengths[:, None])[..., None]
    expected = (Normal(loc, 0.3).log_prob(x) * inside).sum((1, 2))
    torch.testing.assert_close(masked_log_prob(distribution, x, lengths, None), expected, rtol=1e-12, atol=0)
    grid = Grid(11, 0.0, 1.0)
    values = torch.round(x * 10) / 10
    normal = Normal(loc, 0.3)
    low = torch.where(values <= 0, -math.inf, values - 0.05)  # the outermost bins open, as vaeeval scores them
    high = torch.where(values >= 1, math.inf, values + 0.05)
    binned = torch.log(normal.cdf(high) - normal.cdf(low))
    torch.testing.assert_close(masked_log_prob(distribution, values, lengths, grid), (binned * inside).sum((1, 2)),
                               rtol=1e-9, atol=0)
    assert masked_log_prob(Normal(loc.sum((1, 2)), 1.0), x, lengths, None) is None  # one number per row: cannot split


def test_ais_reports_per_token_from_ais(trained, tmp_path):
    """vaeeval ais on padded sentences: the per-token numbers come from ais, and survive its results file."""
    directory, _, _, lengths = trained
    args = ["ais", directory / "sentence.safetensors", directory / "sentences.npz", "--key", "x", "--arch",
            f"{directory / 'sentence.py'}:SentenceVAE", "--lengths", "lengths", "--limit", 6, "--steps", 10, "--chains", 2,
            "--pilot-chains", 2, "-k", 20]
    document = json.loads(cli(*args, "--json").stdout)
    jsonschema.Draft202012Validator(schema("vaeeval.ais/1")).validate(document)
    ais = np.array([p["ais"] for p in document["points"]])
    assert [p["tokens"] for p in document["points"]] == lengths[:6].tolist()
    sequences = document["summary"]["sequences"]
    assert sequences["nll_per_token"]["mean"] == pytest.approx(-math.fsum(ais) / lengths[:6].sum(), rel=1e-12)
    assert "-sum(ais)" in sequences["note"]
    cli(*args, "--output", tmp_path / "ais.jsonl")
    merged = json.loads(cli("merge", tmp_path / "ais.jsonl", "--json").stdout)
    assert merged["summary"]["sequences"] == sequences
