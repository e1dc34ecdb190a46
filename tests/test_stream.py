"""vaeeval.runs.stream: results files written as computed, read back, repaired on resume, sharded and merged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import cli, jsonl

from vaeeval import DataError, VaeevalError
from vaeeval.results.schemas import STREAM_SCHEMA
from vaeeval.runs.formats import Shard, StoredRun
from vaeeval.runs.stream import check_complete, read_results, read_stream


def _header(n: int, seed: int = 0) -> dict:
    """A complete header of a run on ``n`` points."""
    return {
        "kind": "header", "schema": STREAM_SCHEMA,
        "model": {"digest": "m", "arch": None, "likelihood": {"family": "bernoulli"}, "dims": 6},
        "data": {"digest": "d", "n": n},
        "settings": {"samples": 16, "seed": seed, "batch_size": 32, "chunk_size": 64, "device": "cpu"},
        "scoring": {"measure": "probability", "levels": None, "data_levels": 2, "note": "log-probabilities"},
        "kl_kind": "analytic",
        "domain": {"domain": "binary"},
        "shard": None,
    }


def _points(*indices: int) -> list[dict]:
    """Complete point lines."""
    numbers = ("elbo", "recon", "kl", "iwae", "elbo_stderr", "iwae_stderr", "ess", "khat", "ess_fraction")
    return [{"index": i, **{name: -float(i) for name in numbers}, "unreliable": False} for i in indices]


# ---------------------------------------------------------------- reading and repair


def test_a_half_written_last_line_is_repaired_on_resume(bernoulli_model, binary_data, tmp_path):
    output = tmp_path / "r.jsonl"
    cli("elbo", bernoulli_model.path, binary_data, "-k", "16", "--output", output)
    complete = output.read_text()
    body = complete.splitlines(keepends=True)
    output.write_text("".join(body[:6]) + body[6][:25])  # a crash mid-line, no summary
    cli("elbo", bernoulli_model.path, binary_data, "-k", "16", "--output", output, "--resume")
    assert output.read_text() == complete


def test_read_stream_reports_a_broken_line_and_repair_cuts_only_the_unfinished_one(tmp_path):
    path = tmp_path / "r.jsonl"
    whole = "".join(json.dumps(record) + "\n" for record in [_header(5), *_points(0, 1)])
    path.write_text(whole + '{"index": 2, "iw')
    with pytest.raises(DataError, match="line 4 is not JSON"):
        read_stream(path)
    stored = read_stream(path, repair=True)
    assert [r["index"] for r in stored.points] == [0, 1] and stored.summary is None
    assert path.read_text() == whole


def test_read_results_refuses_other_files(tmp_path):
    (tmp_path / "other.json").write_text('{"schema": "something/1"}')
    with pytest.raises(DataError, match="neither a vaeeval.elbo/1 document nor a vaeeval results file"):
        read_results(tmp_path / "other.json")
    (tmp_path / "lines.jsonl").write_text('{"index": 0}\n{"index": 1}\n')
    with pytest.raises(DataError, match="its first line is no vaeeval.elbo-stream/1 header"):
        read_results(tmp_path / "lines.jsonl")


def test_a_json_document_reads_as_the_results_file_of_the_same_run(bernoulli_model, binary_data, tmp_path):
    output = tmp_path / "r.jsonl"
    (tmp_path / "r.json").write_text(cli("elbo", bernoulli_model.path, binary_data, "-k", "16", "--json", "--output", output).stdout)
    document, stream = read_results(tmp_path / "r.json"), read_results(output)
    assert document.points == stream.points and document.summary == stream.summary
    assert document.header == stream.header


# ---------------------------------------------------------------- shards and merge


@pytest.mark.parametrize("n", [0, 1, 7, 23])
@pytest.mark.parametrize("count", [1, 3, 8])
def test_shards_are_contiguous_and_cover_every_point_once(n, count):
    shards = [Shard.of(i, count, n) for i in range(count)]
    assert [s.start for s in shards[1:]] == [s.stop for s in shards[:-1]]
    assert (shards[0].start, shards[-1].stop) == (0, n)
    assert Shard.parse(f"{count - 1}/{count}", n) == shards[-1]


@pytest.mark.parametrize(("text", "phrase"), [("3/3", "between 0 and 2"), ("1-3", "write it as i/n")])
def test_bad_shards_name_the_option(text, phrase):
    with pytest.raises(VaeevalError) as caught:
        Shard.parse(text, 10)
    assert str(caught.value).startswith("shard ") and phrase in str(caught.value)
    assert caught.value.render(lambda name: f"--{name}").startswith("--shard ")


def _part(name: str, header: dict, *indices: int) -> StoredRun:
    return StoredRun(Path(name), header, _points(*indices), None)


def test_check_complete_names_what_is_missing_twice_or_of_another_run():
    assert [r["index"] for r in check_complete([_part("b", _header(4), 3, 1), _part("a", _header(4), 0, 2)])] == [0, 1, 2, 3]
    with pytest.raises(VaeevalError, match=r"the files hold 2 of 10 points; missing 0, 1, 2, 4, 5 \.\.\. \(a shard"):
        check_complete([_part("a", _header(10), 3, 6)])
    with pytest.raises(VaeevalError, match="b: point 1 is in more than one file"):
        check_complete([_part("a", _header(2), 0, 1), _part("b", _header(2), 1)])
    with pytest.raises(VaeevalError, match="b is not part of the run of a: the samples or seed differ"):
        check_complete([_part("a", _header(2), 0), _part("b", _header(2, seed=1), 1)])


def test_shards_merge_into_the_single_run(bernoulli_model, binary_data, tmp_path):
    base = ["elbo", bernoulli_model.path, binary_data, "-k", "40"]
    single = tmp_path / "single.jsonl"
    single_doc = json.loads(cli(*base, "--json", "--output", single).stdout)
    parts = [tmp_path / f"part{i}.jsonl" for i in range(3)]
    for i, part in enumerate(parts):
        cli(*base, "--shard", f"{i}/3", "--output", part)
    assert sum(1 for p in parts for r in jsonl(p) if "kind" not in r) == 23
    merged_doc = json.loads(cli("merge", *parts[::-1], "--json").stdout)
    assert merged_doc == single_doc
    cli("merge", *parts, "--output", tmp_path / "merged.jsonl")
    assert (tmp_path / "merged.jsonl").read_text() == single.read_text()
    missing = cli("merge", parts[0], parts[2], code=2)
    assert "missing" in missing.stderr and missing.stderr.count("\n") == 1
    assert "more than one file" in cli("merge", parts[0], parts[0], parts[1], parts[2], code=2).stderr
