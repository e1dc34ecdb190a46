"""Long runs: stream results to a file, resume them, evaluate one shard, or split across torchrun ranks.

Each point's numbers depend only on the seed and its index, never on batching,
restarts or which process computed them, so every path here ends in the numbers
of one uninterrupted single-process run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaeeval.errors import VaeevalError
from vaeeval.evaluate import Evaluation, Evaluator, Part
from vaeeval.report import point_records, summary_info
from vaeeval.stream import (
    ResultsWriter,
    Shard,
    StoredRun,
    describe_difference,
    evaluation_from_records,
    read_stream,
)


@dataclass(frozen=True)
class Outcome:
    """How a run ended: its evaluation (of the points done, if interrupted)."""

    evaluation: Evaluation
    interrupted: bool
    asked: int  # points this run was to cover


def _records(evaluator: Evaluator, part: Part) -> list[dict[str, Any]]:
    return point_records(part.points, evaluator.settings.samples, evaluator.model.prior.kl_kind == "monte_carlo")


def _resumed(path: Path, header: dict[str, Any]) -> StoredRun:
    stored = read_stream(path, repair=True)
    difference = describe_difference(stored.header, header)
    if difference is None and stored.header.get("shard") != header.get("shard"):
        difference = f"the shard differs ({stored.header.get('shard')} vs {header.get('shard')})"
    if difference:
        raise VaeevalError(f"--resume: {path} holds another run: {difference}")
    return stored


def run(
    evaluator: Evaluator,
    header: dict[str, Any],
    *,
    output: str | Path | None = None,
    resume: bool = False,
    shard: Shard | None = None,
    progress: Callable[[int], None] | None = None,
) -> Outcome:
    """Evaluate the data (or one shard), streaming point lines to ``output`` as they are computed.

    Args:
        evaluator: the prepared evaluation.
        header: the results file's header line (``stream.header_record``).
        output: the results file; without it nothing is written.
        resume: continue ``output`` from the points it already holds.
        shard: evaluate only this slice of the points.
        progress: called with the number of points this call has finished.

    Returns:
        The evaluation: with K-convergence and latents when computed in one go without a
        file, else from the point records (the same numbers). Ctrl-C ends the run early
        with the points done so far (``interrupted``); the file then has no summary line.
    """
    indices = np.arange(evaluator.n) if shard is None else np.arange(shard.start, shard.stop)
    with ExitStack() as stack:
        old: list[dict[str, Any]] = []
        writer = None
        if output is not None:
            path = Path(output)
            if resume and path.exists():
                stored = _resumed(path, header)
                old = stored.points
                if stored.summary is not None:  # finished already: nothing to compute
                    return Outcome(evaluation_from_records(header, old), False, indices.size)
                writer = ResultsWriter(stack.enter_context(path.open("a")))
            else:
                writer = ResultsWriter(stack.enter_context(path.open("w")))
                writer.write([header])
        done = np.array([record["index"] for record in old], dtype=np.int64)
        remaining = indices[~np.isin(indices, done)]
        if progress is not None and done.size:
            progress(done.size)
            progress = (lambda finished, offset=done.size, report=progress: report(offset + finished))
        parts: list[Part] = []
        records = list(old)  # every point line, old and new, when they are needed
        interrupted = False
        try:
            for part in evaluator.parts(remaining, progress):
                parts.append(part)
                if writer is not None:
                    records.extend(_records(evaluator, part))
                    writer.write(records[-part.points.index.size :])
        except KeyboardInterrupt:
            interrupted = True
        if writer is None and not interrupted and shard is None:
            return Outcome(evaluator.finish(parts), False, indices.size)
        if writer is None:
            records = [record for part in parts for record in _records(evaluator, part)]
        if not records:
            raise VaeevalError("interrupted before any point was done")
        evaluation = evaluation_from_records(header, records)
        if writer is not None and not interrupted:
            writer.write([{"kind": "summary", "summary": summary_info(evaluation)}])
    return Outcome(evaluation, interrupted, indices.size)


# ---------------------------------------------------------------- torchrun


def distributed_world() -> tuple[int, int] | None:
    """(rank, world size) when started by torchrun with more than one process, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else None


def run_distributed(
    evaluator: Evaluator, header: dict[str, Any], *, output: str | Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> Outcome | None:
    """Under torchrun: each rank evaluates its shard; rank 0 gathers and returns the whole run.

    gloo on the CPU, nccl on CUDA devices. Other ranks return None. Rank 0 writes
    ``output`` (all points, then the summary) once everything is gathered.
    """
    import torch.distributed as dist

    rank, world = distributed_world()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    backend = "nccl" if evaluator.settings.device.startswith("cuda") else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    try:
        shard = Shard.of(rank, world, evaluator.n)
        mine = list(evaluator.parts(np.arange(shard.start, shard.stop), progress))
        gathered: list[list[Part]] | None = [None] * world if rank == 0 else None  # type: ignore[list-item]
        dist.gather_object(mine, gathered, dst=0)
    finally:
        dist.destroy_process_group()
    if rank != 0:
        return None
    evaluation = evaluator.finish([part for parts in gathered for part in parts])
    if output is not None:
        with Path(output).open("w") as handle:
            writer = ResultsWriter(handle)
            writer.write([header])
            writer.write(point_records(evaluation.points, evaluation.settings.samples, evaluation.kl_kind == "monte_carlo"))
            writer.write([{"kind": "summary", "summary": summary_info(evaluation)}])
    return Outcome(evaluation, False, evaluator.n)
