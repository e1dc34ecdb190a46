"""Long runs: stream results to a file, resume them, evaluate one shard, or split across torchrun ranks.

Each point's numbers depend only on the seed and its index, never on batching,
restarts or which process computed them, so every path here ends in the numbers
of one uninterrupted single-process run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from vaeeval.errors import VaeevalError, option
from vaeeval.estimators.annealing.ais import AISEvaluator, AISPart
from vaeeval.estimators.importance.evaluate import Evaluator
from vaeeval.io.files import locked, writing
from vaeeval.results.formats import format_of
from vaeeval.results.numbers import AISPointResults, Part, PointResults
from vaeeval.runs.formats import Shard, StoredRun, describe_difference
from vaeeval.runs.stream import ResultsWriter, read_stream, write_results

Estimator = Evaluator | AISEvaluator  # has n, parts(indices, progress), finish(parts)


@dataclass(frozen=True)
class Outcome:
    """How a run ended: its evaluation (of the points done, if interrupted)."""

    evaluation: Any  # results.Evaluation or results.AISEvaluation
    interrupted: bool
    asked: int  # points this run was to cover
    header: dict[str, Any]  # the results file's header: the model, data and settings records


def _resumed(path: Path, header: dict[str, Any]) -> StoredRun:
    stored = read_stream(path, repair=True)
    difference = describe_difference(stored.header, header)
    if difference is None and stored.header.get("shard") != header.get("shard"):
        difference = f"the shard differs ({stored.header.get('shard')} vs {header.get('shard')})"
    if difference:
        raise VaeevalError(f"{option('resume')}: {path} holds another run: {difference}")
    return stored


def run(
    evaluator: Estimator,
    *,
    output: str | Path | None = None,
    resume: bool = False,
    shard: Shard | None = None,
    wait: bool = False,
    progress: Callable[[int], None] | None = None,
    dist_timeout: float | None = None,
) -> Outcome | None:
    """Evaluate the data (or one shard), streaming point lines to ``output`` as they are computed.

    Under torchrun (``distributed_world``) the points are split across the processes
    and rank 0 gathers them (``run_distributed``); the other ranks return None.

    Args:
        evaluator: the prepared evaluation (``Evaluator``) or AIS run (``AISEvaluator``).
        output: the results file; without it nothing is written.
        resume: continue ``output`` from the points it already holds.
        shard: evaluate only this slice of the points.
        wait: when another run holds ``output``, wait for it instead of refusing.
        progress: called with the number of points this call has finished.
        dist_timeout: under torchrun, the seconds the processes wait for each other to start
            (``run_distributed``); default ``DEFAULT_DIST_TIMEOUT``.

    Returns:
        The evaluation: with K-convergence and latents when computed in one go without a
        file, else from the point records (the same numbers). Ctrl-C ends the run early
        with the points done so far (``interrupted``); the file then has no summary line
        and ``--resume`` continues it. The evaluation is None when no point was done (an
        interruption before the first, or a shard beyond the last point, whose file is a
        valid empty part).

    Raises:
        VaeevalError: a results file of another run, or one another process is writing.
    """
    if distributed_world() is not None:
        if resume or shard is not None:
            raise VaeevalError(f"{option('resume')} and {option('shard')} are for single-process runs, not torchrun")
        return run_distributed(evaluator, output=output, progress=progress, dist_timeout=dist_timeout)
    results = format_of(evaluator)
    header = results.header(evaluator, shard)
    indices = np.arange(evaluator.n) if shard is None else np.arange(shard.start, shard.stop)
    with ExitStack() as stack:
        old: list[dict[str, Any]] = []
        writer = None
        if output is not None:
            path = Path(output)
            stack.enter_context(locked(path, wait=wait))
            if resume and path.exists():
                stored = _resumed(path, header)
                old = stored.points
                if stored.summary is not None:  # finished already: nothing to compute
                    evaluation = results.evaluation(header, old) if old else None
                    return Outcome(evaluation, False, indices.size, header)
                writer = ResultsWriter(stack.enter_context(_opened(path, "a")), path, stored.digest)
            else:
                writer = ResultsWriter(stack.enter_context(_opened(path, "w")), path)
                writer.write([header])
        done = np.array([record["index"] for record in old], dtype=np.int64)
        remaining = indices[~np.isin(indices, done)]
        if progress is not None and done.size:
            progress(done.size)
            progress = (lambda finished, offset=done.size, report=progress: report(offset + finished))
        parts: list[Any] = []
        records = list(old)  # every point line, old and new, when they are needed
        interrupted = False
        try:
            for part in evaluator.parts(remaining, progress):
                parts.append(part)
                if writer is not None:
                    records.extend(results.points(evaluator, part.points))
                    writer.write(records[-part.points.index.size :])
        except KeyboardInterrupt:
            interrupted = True
        if writer is None and not interrupted and shard is None:
            return Outcome(evaluator.finish(parts), False, indices.size, header)
        if writer is None:
            records = [record for part in parts for record in results.points(evaluator, part.points)]
        evaluation = results.evaluation(header, records) if records else None
        if writer is not None and not interrupted:
            writer.finish(results.summary_line(evaluation, records) if records else results.empty_summary_line())
    return Outcome(evaluation, interrupted, indices.size, header)


@contextlib.contextmanager
def _opened(path: Path, mode: str) -> Iterator[TextIO]:
    """The results file, open; every line is flushed as written, so closing it (on a full disk too) loses nothing."""
    with writing(path, "results file"):
        handle = path.open(mode)
    try:
        yield handle
    finally:
        with contextlib.suppress(OSError):
            handle.close()


# ---------------------------------------------------------------- torchrun


MAX_WORLD = 1 << 16  # processes in one run
DEFAULT_DIST_TIMEOUT = 300.0  # seconds the processes wait for each other to start (--dist-timeout)
MAX_DIST_TIMEOUT = 7 * 86400.0
# The gather waits for the slowest rank to finish its share, which may take hours more than the fastest one's:
# it has its own group with this bound, not --dist-timeout's (a rank that dies ends it sooner: gloo sees the
# socket close, and torchrun stops the other processes when one fails).
GATHER_TIMEOUT = datetime.timedelta(days=7)


def _setting(name: str, default: int, low: int, high: int) -> int:
    """The whole number torchrun put in the environment variable ``name``, checked to lie in [low, high]."""
    value = os.environ.get(name)
    if value is None:
        return default
    if not value.strip().isdigit() or not low <= int(value) <= high:
        raise VaeevalError(f"{name}={value!r} is not a whole number from {low} to {high}: start the processes with torchrun, "
                           "which sets it, or unset it")
    return int(value)


def distributed_world() -> tuple[int, int] | None:
    """(rank, world size) when started by torchrun with more than one process, else None.

    Raises:
        VaeevalError: a WORLD_SIZE or RANK that is no whole number in range (a rank at or past the world
            size would wait forever for peers that cannot exist), or a world without MASTER_ADDR and MASTER_PORT
            (or a MASTER_PORT that is no port).
    """
    world = _setting("WORLD_SIZE", 1, 1, MAX_WORLD)
    if world == 1:
        return None
    rank = _setting("RANK", 0, 0, world - 1)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise VaeevalError(f"WORLD_SIZE={world} asks for {world} processes, but {name} is not set: start them with "
                               "torchrun (which sets it), or unset WORLD_SIZE")
    _setting("MASTER_PORT", 0, 1, 65535)
    return rank, world


def local_processes() -> int:
    """How many processes torchrun started on this machine (1 outside torchrun)."""
    world = distributed_world()
    return _setting("LOCAL_WORLD_SIZE", world[1], 1, world[1]) if world else 1


def run_distributed(
    evaluator: Estimator,
    *,
    output: str | Path | None = None,
    progress: Callable[[int], None] | None = None,
    dist_timeout: float | None = None,
) -> Outcome | None:
    """Under torchrun: each rank evaluates its shard; rank 0 gathers and returns the whole run.

    gloo on the CPU, nccl on CUDA devices. Other ranks return None. Rank 0 writes
    ``output`` (all points, then the summary) once everything is gathered. Each
    process uses the threads torch gives it; ``tuning.share_cores(local_processes())``
    divides the machine's cores among them (the command line does). The ranks send
    their results as JSON bytes (``exchange``), never as pickles: a peer cannot make
    rank 0 run code.

    ``dist_timeout`` (seconds, default ``DEFAULT_DIST_TIMEOUT``) bounds the start only: every
    process must have joined the rendezvous within it. The gather of the results then waits
    for the slowest rank's share (up to ``GATHER_TIMEOUT``).

    Raises:
        VaeevalError: a process that did not join within ``dist_timeout``, or one that left
            before the results were gathered.
    """
    import torch.distributed as dist

    rank, world = distributed_world()
    backend = "nccl" if evaluator.settings.device.startswith("cuda") else "gloo"
    owned = not dist.is_initialized()
    group = _rendezvous(backend, rank, world, DEFAULT_DIST_TIMEOUT if dist_timeout is None else dist_timeout, owned)
    try:
        shard = Shard.of(rank, world, evaluator.n)
        mine = list(evaluator.parts(np.arange(shard.start, shard.stop), progress))
        payload = json.dumps([encode(part) for part in mine]).encode()
        try:
            gathered = _gather_bytes(payload, rank, world, evaluator.settings.device, group)
        except RuntimeError as error:  # gloo's "Connection closed by peer" is a bare RuntimeError; DistError is one too
            raise VaeevalError(f"torchrun: a process left before the results were gathered ({_first_line(error)})") from None
    finally:
        dist.destroy_process_group(None if owned else group)  # a default group the caller started stays theirs
    if rank != 0:
        return None
    evaluation = evaluator.finish([decode(part) for payload in gathered for part in json.loads(payload)])
    results = format_of(evaluator)
    header = results.header(evaluator, None)
    if output is not None:
        write_results(output, header, results.points(evaluator, evaluation.points), evaluation)
    return Outcome(evaluation, False, evaluator.n, header)


def _rendezvous(backend: str, rank: int, world: int, timeout: float, initialize: bool) -> Any:
    """Join the torchrun world within ``timeout`` seconds (``initialize``: start torch.distributed's
    default group, else the caller has); return a group of every rank for the gather, bounded by
    ``GATHER_TIMEOUT`` instead.

    Raises:
        VaeevalError: a peer that did not come in time, one line saying how many did and where.
    """
    import torch.distributed as dist

    if not 0 < timeout <= MAX_DIST_TIMEOUT:  # NaN too
        raise VaeevalError(f"{option('dist_timeout')} {timeout!r} is not a number of seconds from 0 to {MAX_DIST_TIMEOUT:g}")
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    place = f"{host}:{port}"
    deadline = time.monotonic() + timeout
    if initialize:
        if rank != 0:  # rank 0 hosts the rendezvous; torch would log a C++ stack for each failed try to reach it
            _reach(host, port, deadline, f"torchrun: rank {rank} found no rendezvous at {place} within {timeout:g} s "
                                         f"(rank 0 hosts it); start rank 0, or give it longer with {option('dist_timeout')}")
        remaining = datetime.timedelta(seconds=max(deadline - time.monotonic(), 1.0))
        try:
            dist.init_process_group(backend, timeout=remaining)
        except dist.DistError as error:
            raise VaeevalError(_not_joined(error, world, timeout, place)) from None
    try:
        return dist.new_group(timeout=GATHER_TIMEOUT)
    except dist.DistError as error:
        raise VaeevalError(_not_joined(error, world, timeout, place)) from None


def _reach(host: str, port: int, deadline: float, message: str) -> None:
    """Wait until something listens at ``host:port``, trying again until ``deadline`` (``time.monotonic``)."""
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(min(deadline - time.monotonic(), 1.0), 0.01)):
                return
        except OSError as error:
            if time.monotonic() >= deadline:
                raise VaeevalError(f"{message} ({error})") from None
        time.sleep(0.2)


_JOINED = re.compile(r"(\d+)/(\d+) clients joined")


def _not_joined(error: Exception, world: int, timeout: float, place: str) -> str:
    """One line for a rendezvous that failed: how many of the ``world`` processes came, if torch says."""
    joined = _JOINED.search(str(error))
    head = (f"torchrun: {joined.group(1)} of {world} processes joined within {timeout:g} s ({place})" if joined
            else f"torchrun: the {world} processes did not all meet at {place} within {timeout:g} s ({_first_line(error)})")
    return (f"{head}; start every rank (RANK 0 to {world - 1}) with the same MASTER_ADDR and MASTER_PORT, "
            f"or give them longer with {option('dist_timeout')}")


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# ---------------------------------------------------------------- what the ranks send each other


def encode(value: Any) -> Any:
    """A part (dataclasses of NumPy arrays) as plain JSON values: floats keep every bit (``repr``)."""
    if dataclasses.is_dataclass(value):
        return {"class": type(value).__name__, "fields": {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if value is None:  # a column the run has not (tokens without --lengths)
        return None
    array = np.asarray(value)
    return {"dtype": array.dtype.str, "shape": list(array.shape), "data": array.ravel().tolist()}


def decode(value: Any) -> Any:
    """``encode``'s inverse, building only the result classes vaeeval exchanges and numeric arrays.

    Raises:
        VaeevalError: anything else (a peer that is not vaeeval).
    """
    try:
        if value is None:
            return None
        if "class" in value:
            cls = _EXCHANGED[value["class"]]
            return cls(**{name: decode(field) for name, field in value["fields"].items()})
        dtype = np.dtype(value["dtype"])
        if dtype.kind not in "biuf":
            raise TypeError(f"dtype {dtype}")
        return np.array(value["data"], dtype=dtype).reshape(value["shape"])
    except (KeyError, TypeError, ValueError) as error:
        raise VaeevalError(f"a torchrun peer sent something that is not a vaeeval result ({error})") from None


_EXCHANGED = {cls.__name__: cls for cls in (Part, PointResults, AISPart, AISPointResults)}


def _gather_bytes(payload: bytes, rank: int, world: int, device: str, group: Any = None) -> list[bytes]:
    """Every rank's ``payload`` on rank 0 (others get []) through ``group``, as uint8 tensors padded to the longest."""
    import torch
    import torch.distributed as dist

    place = torch.device(device)
    length = torch.tensor([len(payload)], dtype=torch.int64, device=place)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length, group=group)
    longest = int(max(int(size) for size in lengths))
    buffer = torch.zeros(longest, dtype=torch.uint8, device=place)
    buffer[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(place)
    gathered = [torch.zeros_like(buffer) for _ in range(world)] if rank == 0 else None
    dist.gather(buffer, gathered, dst=0, group=group)
    if rank != 0:
        return []
    return [bytes(part[: int(size)].cpu().numpy()) for part, size in zip(gathered, lengths, strict=True)]
