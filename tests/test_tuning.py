"""vaeeval.core.tuning: process-wide settings, made by the command line and left to a library caller."""

from __future__ import annotations

import sys

import torch
from conftest import cli

import vaeeval
from vaeeval.core import tuning
from vaeeval.estimators.importance.evaluate import EvaluationOptions, Evaluator
from vaeeval.runs.run import run


def test_the_library_makes_no_process_wide_setting(monkeypatch, bernoulli_model, binary_data, tmp_path):
    settings = {name: getattr(tuning, name) for name in ("keep_freed_memory", "share_cores")}
    for module in [m for name, m in sys.modules.items() if name.startswith("vaeeval") and m is not tuning]:
        held = [name for name, value in vars(module).items() if any(value is f for f in settings.values())]
        assert not held, f"{module.__name__} holds {held}: patching vaeeval.core.tuning would not reach it"

    def refuse(*args):
        raise AssertionError("the library made a process-wide setting")

    for name in settings:
        monkeypatch.setattr(tuning, name, refuse)
    threads = torch.get_num_threads()
    data = vaeeval.load_data(binary_data, bernoulli_model)
    assert vaeeval.evaluate(bernoulli_model, data, samples=8).summary.n == 23
    assert vaeeval.compare([bernoulli_model, bernoulli_model], [data, data], EvaluationOptions(samples=8)).groups
    assert run(Evaluator(bernoulli_model, data, EvaluationOptions(samples=8)), output=tmp_path / "r.jsonl").evaluation
    assert torch.get_num_threads() == threads


def test_the_command_line_makes_them(monkeypatch, bernoulli_model):
    calls = []
    monkeypatch.setattr(tuning, "keep_freed_memory", lambda: calls.append("keep_freed_memory"))
    monkeypatch.setattr(tuning, "share_cores", lambda processes: calls.append(("share_cores", processes)))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    cli("inspect", bernoulli_model.path)
    assert calls == ["keep_freed_memory"]
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # as torchrun sets them (passed alone only after a test left them set)
    monkeypatch.setenv("MASTER_PORT", "29500")
    cli("inspect", bernoulli_model.path)  # under torchrun: the cores are shared among this machine's processes
    assert calls == ["keep_freed_memory", "keep_freed_memory", ("share_cores", 2)]
