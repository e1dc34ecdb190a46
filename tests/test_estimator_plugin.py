"""A new estimator is one module plus one registration line.

A toy estimator, written in a temporary module outside the package, declares its
point columns, its results format and its evaluator, and registers them: results
files, resume, shards, merge, a ``--json`` document, a table and their JSON Schemas
then come from those declarations alone, through the same code the shipped
estimators use.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner

from vaeeval import load_data, load_model
from vaeeval.cli import main
from vaeeval.results import formats
from vaeeval.results.schemas import schema, schema_names
from vaeeval.runs.formats import Shard
from vaeeval.runs.run import run
from vaeeval.runs.stream import merge_runs, read_results, read_stream

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"

TOY = '''
"""log p(x|z) at z = the mean of q(z|x): one decoder pass per point (a toy: it bounds nothing)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vaeeval.results.columns import FLAG, NUMBER, Column, PointColumns
from vaeeval.results.formats import ResultsFormat, register
from vaeeval.results.numbers import Columns, mean_and_stderr
from vaeeval.results.records import data_record, model_record, stat_record

COLUMNS = PointColumns((
    Column("at_mean", NUMBER, "log p(x|z) at the mean of q(z|x)"),
    Column("doubled", NUMBER, "twice that"),
    Column("positive", FLAG, "at_mean > 0"),
))


@dataclass(frozen=True)
class ToySettings:
    batch_size: int


@dataclass(frozen=True)
class ToyPoints(Columns):
    index: np.ndarray
    at_mean: np.ndarray
    doubled: np.ndarray
    positive: np.ndarray


@dataclass(frozen=True)
class ToyPart:
    points: ToyPoints


@dataclass(frozen=True)
class ToyEvaluation:
    points: ToyPoints


class ToyEvaluator:
    def __init__(self, model, dataset, batch_size=3):
        self.model, self.dataset, self.settings, self.n = model, dataset, ToySettings(batch_size), dataset.n

    def parts(self, indices, progress=None):
        for start in range(0, len(indices), self.settings.batch_size):
            rows = np.asarray(indices[start : start + self.settings.batch_size])
            x = torch.as_tensor(np.asarray(self.dataset.array[rows]), dtype=torch.float32)
            with torch.inference_mode():
                mean, _ = self.model.encode(x)
                values = self.model.likelihood.log_prob(self.model.decode(mean), x).numpy()
            yield ToyPart(ToyPoints(rows, values, 2 * values, values > 0))
            if progress is not None:
                progress(rows.size)

    def finish(self, parts):
        return ToyEvaluation(ToyPoints.concatenate([part.points for part in parts]).in_index_order())


def _header(evaluator, shard):
    return {"kind": "header", "schema": "toy-stream/1", "model": model_record(evaluator.model),
            "data": data_record(evaluator.dataset), "settings": {"batch_size": evaluator.settings.batch_size},
            "shard": None if shard is None else shard.to_record()}


def _evaluation(header, records):
    return ToyEvaluation(ToyPoints(**COLUMNS.arrays(records)))


TOY_RESULTS = register(ResultsFormat(  # the one registration line
    "toy-stream/1",
    "toy/1",
    _header,
    lambda evaluator, points: COLUMNS.records(points.index, {c.name: getattr(points, c.name) for c in COLUMNS.columns}),
    lambda evaluation: {"n": int(evaluation.points.index.size), "at_mean": stat_record(mean_and_stderr(evaluation.points.at_mean))},
    _evaluation,
    ToySettings,
    COLUMNS,
    ToyEvaluator,
))
'''


@pytest.fixture()
def toy(tmp_path, monkeypatch):
    (tmp_path / "toy_estimator.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    registered = dict(formats.FORMATS)
    module = importlib.import_module("toy_estimator")
    yield module
    formats.FORMATS.clear()
    formats.FORMATS.update(registered)
    sys.modules.pop("toy_estimator", None)


@pytest.fixture()
def evaluator(toy):
    model = load_model(SAMPLES / "digits_bernoulli.safetensors")
    return toy.ToyEvaluator(model, load_data(SAMPLES / "digits_binary_test.npy", model, limit=11))


def test_a_registered_estimator_streams_resumes_shards_and_merges(toy, evaluator, tmp_path):
    whole = run(evaluator, output=tmp_path / "whole.jsonl")
    direct = evaluator.finish(list(evaluator.parts(np.arange(evaluator.n))))
    np.testing.assert_array_equal(whole.evaluation.points.at_mean, direct.points.at_mean)
    stored = read_stream(tmp_path / "whole.jsonl")
    assert [point["index"] for point in stored.points] == list(range(11)) and stored.summary["summary"]["n"] == 11
    assert set(stored.points[0]) == {"index", "at_mean", "doubled", "positive"}

    for index in range(3):  # shards, the last one resumed after losing its tail
        run(evaluator, output=tmp_path / f"part{index}.jsonl", shard=Shard.of(index, 3, evaluator.n))
    lines = (tmp_path / "part2.jsonl").read_text().splitlines()
    (tmp_path / "part2.jsonl").write_text("\n".join(lines[:2]) + "\n")  # the header and one point: a killed run
    resumed = run(evaluator, output=tmp_path / "part2.jsonl", shard=Shard.of(2, 3, evaluator.n), resume=True)
    assert resumed.evaluation.points.index.tolist() == list(range(7, 11))
    merged = merge_runs([read_stream(tmp_path / f"part{index}.jsonl") for index in range(3)])
    assert merged.records == stored.points
    np.testing.assert_array_equal(merged.evaluation.points.doubled, 2 * direct.points.at_mean)


def test_its_schemas_document_and_table_come_from_its_declarations(toy, evaluator, tmp_path):
    assert {"toy/1", "toy-stream/1"} <= set(schema_names())
    for index in range(2):
        run(evaluator, output=tmp_path / f"part{index}.jsonl", shard=Shard.of(index, 2, evaluator.n))
    parts = [str(tmp_path / f"part{index}.jsonl") for index in range(2)]

    done = CliRunner().invoke(main, ["merge", *parts, "--json"], catch_exceptions=False)
    assert done.exit_code == 0, done.output
    document = json.loads(done.output)
    jsonschema.Draft202012Validator(schema("toy/1")).validate(document)
    assert document["schema"] == "toy/1" and len(document["points"]) == 11
    assert document["summary"]["at_mean"]["mean"] == pytest.approx(np.mean([p["at_mean"] for p in document["points"]]))
    line_schema = jsonschema.Draft202012Validator(schema("toy-stream/1"))
    for line in (tmp_path / "part0.jsonl").read_text().splitlines():
        line_schema.validate(json.loads(line))
    point_schema = schema("toy/1")["properties"]["points"]["items"]
    with pytest.raises(jsonschema.ValidationError):  # the point schema is the declared columns'
        jsonschema.validate({"index": 0, "at_mean": "high", "doubled": 1.0, "positive": True}, point_schema)

    table = CliRunner().invoke(main, ["merge", *parts, "--all"], catch_exceptions=False)
    assert table.exit_code == 0, table.output
    assert "at_mean" in table.output and "doubled" in table.output and "toy-stream/1" in table.output
    merged = CliRunner().invoke(main, ["merge", *parts, "--output", str(tmp_path / "merged.jsonl")], catch_exceptions=False)
    assert merged.exit_code == 0 and read_results(tmp_path / "merged.jsonl").summary["count"] == 11


def test_a_results_file_is_checked_against_the_declared_columns(toy, evaluator, tmp_path):
    run(evaluator, output=tmp_path / "run.jsonl")
    lines = (tmp_path / "run.jsonl").read_text().splitlines()
    point = json.loads(lines[1])
    (tmp_path / "bad.jsonl").write_text("\n".join([lines[0], json.dumps({**point, "positive": 1.5})]) + "\n")
    with pytest.raises(Exception, match="positive"):
        read_stream(tmp_path / "bad.jsonl")


def test_an_unregistered_estimator_is_refused_by_name(evaluator, toy):
    formats.FORMATS.pop("toy-stream/1")
    with pytest.raises(TypeError, match="ToyEvaluator"):
        run(evaluator)
