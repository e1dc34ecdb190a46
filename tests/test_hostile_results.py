"""Hostile results files, round 2 and 3: the disk, the lock, a swapped header, a shard's bounds, missing columns,
huge lines, and every way a finished file can be cut, joined, reordered or resumed twice at once.

The contract is test_hostile.py's: bad input is one line ``vaeeval: error: ...`` and exit 2, never a traceback or
a wrong number; valid input gives the right result; no file of the user's changes; nothing is left behind.
A case's ``found`` records the bug it found (fixed since).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import tiny_bernoulli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hostile import ERROR, ROOT, SUBPROCESS_SECONDS, Case, _check_contract, _hashes, _in_process, _in_subprocess

from vaeeval import VaeevalError
from vaeeval.results.formats import seal
from vaeeval.runs import stream
from vaeeval.runs.stream import read_stream

D, N = 6, 23


def _elbo(w: Path, *extra: Any) -> list[Any]:
    return ["elbo", w / "model.safetensors", w / "data.npy", "-k", "8", *extra]


def _ais(w: Path, *extra: Any) -> list[Any]:
    return ["ais", w / "model.safetensors", w / "data.npy", "-k", "8", "--steps", "3", "--chains", "2", "--leapfrog", "1",
            "--limit", "4", *extra]


def _ok(*args: Any) -> str:
    outcome = _in_process(list(args))
    assert outcome.code == 0 and outcome.escaped is None, (outcome.stderr, outcome.escaped)
    return outcome.stdout


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model, its data; finished results files of seeds 0 and 5, two shards, an AIS run, and a small run of 3 points."""
    folder = tmp_path_factory.mktemp("base")
    tiny_bernoulli(folder / "model.safetensors", dims=D)
    np.save(folder / "data.npy", (np.random.default_rng(1).random((N, D)) < 0.4).astype(np.float32))
    _ok(*_elbo(folder, "--output", folder / "run.jsonl"))
    _ok(*_elbo(folder, "--seed", "5", "--output", folder / "seed5.jsonl"))
    for index in range(2):
        _ok(*_elbo(folder, "--shard", f"{index}/2", "--output", folder / f"part{index}.jsonl"))
    _ok(*_ais(folder, "--output", folder / "ais.jsonl"))
    _ok(*_elbo(folder, "--limit", "3", "--output", folder / "small.jsonl"))
    return folder


@pytest.fixture
def work(base: Path, tmp_path: Path) -> Path:
    for path in base.iterdir():
        shutil.copy2(path, tmp_path / path.name)
    return tmp_path


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


# ---------------------------------------------------------------- N, P, Q, R, S: files that break the contract


def _swapped_header(w: Path) -> Path:
    """run.jsonl (seed 0's numbers) under seed5.jsonl's header: each line valid, the settings another run's."""
    return _write_lines(w / "bad.jsonl", [_lines(w / "seed5.jsonl")[0], *_lines(w / "run.jsonl")[1:]])


def _stray_point(w: Path) -> Path:
    """Shard 0 of 2 (points 0 to 10) holding point 11, unfinished: a --resume seals it, merge counts it twice."""
    return _write_lines(w / "part0.jsonl", [*_lines(w / "part0.jsonl")[:-1], _lines(w / "run.jsonl")[12]])


def _without(w: Path, source: str, key: str) -> Path:
    """``source`` unfinished, its first point line without ``key``."""
    lines = _lines(w / source)[:-1]
    lines[1] = json.dumps({name: value for name, value in json.loads(lines[1]).items() if name != key})
    return _write_lines(w / "bad.jsonl", lines)


def _summary_inside(w: Path) -> Path:
    lines = _lines(w / "run.jsonl")
    return _write_lines(w / "bad.jsonl", [*lines[:4], lines[-1], *lines[4:]])


def _older(w: Path) -> Path:
    """run.jsonl as vaeeval wrote it before summaries bound the header: no lines_digest."""
    return _summary_edited(w, "run.jsonl", lambda record: record.pop("lines_digest"))


def _summary_edited(w: Path, source: str, change: Any) -> Path:
    """``source`` with its summary line's record changed by ``change`` (its lines_digest, of the lines before, kept)."""
    lines = _lines(w / source)
    record = json.loads(lines[-1])
    change(record)
    return _write_lines(w / "bad.jsonl", [*lines[:-1], json.dumps(record)])


def _odd_shard(w: Path) -> Path:
    lines = _lines(w / "part0.jsonl")[:-1]
    header = json.loads(lines[0])
    lines[0] = json.dumps(seal({**header, "shard": {**header["shard"], "stop": 12}}))
    return _write_lines(w / "bad.jsonl", lines)


def _long_line(w: Path, size: int) -> Path:
    """run.jsonl unfinished, with a line of ``size`` bytes (a sparse run of zero bytes) after its third point."""
    path = _write_lines(w / "long.jsonl", _lines(w / "run.jsonl")[:4])
    with path.open("r+b") as handle:
        handle.truncate(path.stat().st_size + size)
    return path


_SWAP = "a header swapped for another run's merges with exit 0 (the summary's digest bound only the points)"
_STRAY = "--resume of shard 0 seals a file holding point 11, outside the shard"
_MISSING = "a point line without a required column merges into a null summary"
_SECOND_SUMMARY = "a summary line in the middle of a file is accepted"
_SUMMARY_NUMBERS = "a finished file whose summary line's numbers were edited is accepted (what tail -1 | jq would cite)"

CASES = [
    Case("merge: a header swapped for another run's", lambda w: ["merge", _swapped_header(w)], "was edited after the run",
         found=_SWAP),
    Case("check: a header swapped for another run's", lambda w: ["check", _swapped_header(w), "--baseline", w / "run.jsonl"],
         "was edited after the run", found=_SWAP),
    Case("elbo --resume --seed 5: a header swapped for another run's",
         lambda w: _elbo(w, "--seed", "5", "--output", _swapped_header(w), "--resume"), "was edited after the run",
         found=_SWAP),
    Case("merge: a finished file of an older vaeeval", lambda w: ["merge", _older(w)], "older vaeeval"),
    Case("elbo --resume: a finished file of an older vaeeval", lambda w: _elbo(w, "--output", _older(w), "--resume"),
         "older vaeeval"),
    Case("merge: a finished file with two point lines swapped",
         lambda w: ["merge", _write_lines(w / "bad.jsonl", [_lines(w / "run.jsonl")[i] for i in (0, 2, 1, *range(3, 25))])],
         "was edited after the run"),
    Case("elbo --resume --shard 0/2: a file holding point 11",
         lambda w: _elbo(w, "--shard", "0/2", "--output", _stray_point(w), "--resume"), "outside the file's shard 0/2",
         found=_STRAY),
    Case("merge: a shard holding point 11", lambda w: ["merge", _stray_point(w), w / "part1.jsonl"],
         "outside the file's shard 0/2", found=_STRAY),
    Case("merge: a shard record that is no slice of the points", lambda w: ["merge", _odd_shard(w), w / "part1.jsonl"],
         "is not one of count equal contiguous slices"),
    Case("merge: an ais point without acceptance", lambda w: ["merge", _without(w, "ais.jsonl", "acceptance")],
         "has no acceptance", found=_MISSING),
    Case("ais --resume: a point without acceptance",
         lambda w: _ais(w, "--output", _without(w, "ais.jsonl", "acceptance"), "--resume"), "has no acceptance",
         found=_MISSING),
    Case("merge: an elbo point without khat", lambda w: ["merge", _without(w, "run.jsonl", "khat")], "has no khat",
         found=_MISSING),
    Case("merge: a summary line in the middle", lambda w: ["merge", _summary_inside(w)], "line 5 is a summary line",
         found=_SECOND_SUMMARY),
    Case("elbo --resume: a summary line in the middle", lambda w: _elbo(w, "--output", _summary_inside(w), "--resume"),
         "line 5 is a summary line", found=_SECOND_SUMMARY),
    Case("merge: a summary whose iwae mean was edited",
         lambda w: ["merge", _summary_edited(w, "run.jsonl", lambda r: r["summary"]["iwae"].update(mean=-1.0))],
         "the summary's numbers are not those its 23 point lines give", found=_SUMMARY_NUMBERS),
    Case("check: a summary whose iwae mean was edited",
         lambda w: ["check", _summary_edited(w, "run.jsonl", lambda r: r["summary"]["iwae"].update(mean=-1.0)),
                    "--baseline", w / "run.jsonl"], "the summary's numbers are not", found=_SUMMARY_NUMBERS),
    Case("ais --resume: a summary whose ais mean was edited",
         lambda w: _ais(w, "--output", _summary_edited(w, "ais.jsonl", lambda r: r["summary"]["ais"].update(mean=-1.0)),
                        "--resume"), "the summary's numbers are not", found=_SUMMARY_NUMBERS),
    Case("merge: a summary without its count", lambda w: ["merge", _summary_edited(w, "run.jsonl", lambda r: r.pop("count"))],
         "counts None point lines"),
    Case("merge: a summary whose summary is null",
         lambda w: ["merge", _summary_edited(w, "run.jsonl", lambda r: r.update(summary=None))], "the summary's numbers"),
    Case("merge: two shards joined in one file",
         lambda w: ["merge", _write_lines(w / "bad.jsonl", _lines(w / "part0.jsonl") + _lines(w / "part1.jsonl"))],
         "is a summary line, but line", found=_SECOND_SUMMARY),
]


@pytest.mark.parametrize("case", [case.param() for case in CASES])
def test_hostile_results_file(case: Case, work: Path) -> None:
    args = [str(arg) for arg in case.build(work)]
    before = _hashes(work)
    _check_contract(case, _in_process(args), before, _hashes(work), work)


def test_an_older_finished_file_can_be_vouched_for_by_deleting_its_summary_and_resuming(work: Path) -> None:
    """The escape the older-vaeeval message names: without its summary the file is a run to continue, and
    --resume seals it (computing nothing: every point is there)."""
    old = _older(work)
    _write_lines(old, _lines(old)[:-1])
    assert json.loads(_ok(*_elbo(work, "--output", old, "--resume", "--json")))["points"] == \
        json.loads(_ok("merge", work / "run.jsonl", "--json"))["points"]
    assert old.read_bytes() == (work / "run.jsonl").read_bytes()


def test_the_summary_records_the_digest_of_every_byte_before_it(base: Path) -> None:
    """What the README says a user can check by hand: ``head -n -1 run.jsonl | sha256sum``."""
    for name in ("run.jsonl", "part0.jsonl", "ais.jsonl"):
        raw = (base / name).read_bytes()
        before, _, last = raw[:-1].rpartition(b"\n")
        assert json.loads(last)["lines_digest"] == "sha256:" + hashlib.sha256(before + b"\n").hexdigest()


@pytest.fixture
def as_a_user(monkeypatch: pytest.MonkeyPatch) -> None:
    """Root writes read-only files: as root, opening a file without write permission for writing is refused here."""
    if os.geteuid() != 0:
        return

    def refused(path: Any) -> None:
        if not os.stat(path).st_mode & stat.S_IWUSR:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    real_open, real_truncate, real_os_open = io.open, os.truncate, os.open

    def user_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, str | Path) and any(c in mode for c in "wa+") and os.path.exists(file):
            refused(file)
        return real_open(file, mode, *args, **kwargs)

    def user_truncate(path: Any, length: int) -> None:
        refused(path)
        real_truncate(path, length)

    def user_os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR) and os.path.exists(path):
            refused(path)
        return real_os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(io, "open", user_open)
    monkeypatch.setattr(os, "truncate", user_truncate)
    monkeypatch.setattr(os, "open", user_os_open)


def test_resume_of_a_read_only_file_with_a_half_written_line_is_one_line(work: Path, as_a_user: None) -> None:
    """N: found 'a PermissionError traceback when --resume cuts the half-written last line of a read-only file'."""
    output = work / "run.jsonl"
    lines = _lines(output)
    output.write_text("".join(line + "\n" for line in lines[:6]) + lines[6][:25])
    output.chmod(0o444)
    before = _hashes(work)
    case = Case("N", lambda w: [], "cannot write the results file (Permission denied)")
    _check_contract(case, _in_process(_elbo(work, "--output", output, "--resume")), before, _hashes(work), work)


def test_a_lock_file_on_a_full_disk_is_one_line_and_removed(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """O: found 'an ENOSPC traceback when writing the pid to the lock file, and an empty .lock left behind'."""
    real_write = os.write

    def full_disk(descriptor: int, data: bytes) -> int:
        if os.readlink(f"/proc/self/fd/{descriptor}").endswith(".lock"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(descriptor, data)

    monkeypatch.setattr(os, "write", full_disk)
    before = _hashes(work)
    case = Case("O", lambda w: [], "cannot write the lock file (No space left on device)")
    _check_contract(case, _in_process(_elbo(work, "--output", work / "run.jsonl", "--resume")), before, _hashes(work), work)


def test_a_lock_file_past_the_file_size_limit_is_one_line_and_removed(work: Path) -> None:
    """O, with the kernel refusing the write (RLIMIT_FSIZE of 1 byte: EFBIG past it, as ENOSPC on a full disk)."""
    before = _hashes(work)
    case = Case("O (EFBIG)", lambda w: [], "cannot write the lock file (File too large)", hangs=True)
    outcome = _in_subprocess([str(arg) for arg in _elbo(work, "--output", work / "out.jsonl")], work,
                             ((resource.RLIMIT_FSIZE, 1),))
    _check_contract(case, outcome, before, _hashes(work), work)


def test_a_file_system_without_locks_is_one_line(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """found: 'flock failing with ENOLCK (an NFS mount with nolock, some FUSE file systems) escapes as OSError'."""
    def no_locks(descriptor: Any, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    before = _hashes(work)
    case = Case("ENOLCK", lambda w: [], "run.jsonl.lock: cannot be locked (No locks available)")
    _check_contract(case, _in_process(_elbo(work, "--output", work / "run.jsonl", "--resume")), before, _hashes(work), work)


def test_a_lock_held_by_another_program_holding_no_pid_is_one_line(work: Path) -> None:
    """found: 'a lock file held by another program, holding bytes that are no UTF-8, escapes as UnicodeDecodeError'
    (and a newline in it would have split the message)."""
    before = _hashes(work)
    lock = work / "run.jsonl.lock"
    lock.write_bytes(b"12\n34\xff")
    with lock.open("rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        outcome = _in_process(_elbo(work, "--output", work / "run.jsonl", "--resume"))
    assert lock.read_bytes() == b"12\n34\xff"
    lock.unlink()
    case = Case("held", lambda w: [], "in use by another vaeeval run (pid unknown)")
    _check_contract(case, outcome, before, _hashes(work), work)


@pytest.mark.parametrize("command", ["merge", "check", "elbo --resume"])
def test_a_line_of_a_gigabyte_is_refused_without_being_read(work: Path, command: str) -> None:
    """S: found 'a results file with a 2 GB line is read whole and depth-scanned (GBs of memory, minutes)'.
    A sparse file: the line costs no disk, and reading it whole would take seconds and a gigabyte."""
    path = _long_line(work, 1 << 30)
    size, mtime = path.stat().st_size, path.stat().st_mtime_ns
    args = {"merge": ["merge", path], "check": ["check", path, "--baseline", work / "run.jsonl"],
            "elbo --resume": _elbo(work, "--output", path, "--resume")}[command]
    started = time.monotonic()
    outcome = _in_process(args)
    assert outcome.code == 2 and outcome.escaped is None and outcome.stderr.count("\n") == 1, outcome.stderr
    assert f"line 5 is longer than {stream.MAX_LINE_BYTES} bytes" in outcome.stderr
    assert time.monotonic() - started < 10
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (size, mtime)


def test_the_line_limit_counts_bytes_before_the_newline(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = _lines(work / "run.jsonl")
    longest = max(len(line) for line in lines)
    monkeypatch.setattr(stream, "MAX_LINE_BYTES", longest)
    assert len(read_stream(work / "run.jsonl").points) == N
    monkeypatch.setattr(stream, "MAX_LINE_BYTES", longest - 1)
    number = next(number for number, line in enumerate(lines, 1) if len(line) == longest)
    with pytest.raises(VaeevalError, match=f"line {number} is longer than {longest - 1} bytes"):
        read_stream(work / "run.jsonl")


# ---------------------------------------------------------------- round 3: cut, joined, reordered, resumed twice


def _tried(outcome: Any, path: Path | None, unchanged: bytes | None) -> str:
    """'ok' or 'refused', after checking the outcome keeps the contract."""
    assert outcome.escaped is None and "Traceback" not in outcome.stderr, (outcome.stderr, outcome.escaped)
    if outcome.code == 0:
        return "ok"
    assert outcome.code == 2 and outcome.stderr.startswith(ERROR) and outcome.stderr.count("\n") == 1, outcome.stderr
    assert outcome.stdout == ""
    if path is not None:
        assert path.read_bytes() == unchanged, "a refused command changed the file"
        assert not path.with_name(path.name + ".lock").exists()
    return "refused"


def _offsets(raw: bytes) -> list[int]:
    """Every offset within 3 bytes of a line's end, and every 7th byte besides."""
    ends = [index + 1 for index, byte in enumerate(raw) if byte == 0x0A]
    near = {offset + delta for offset in [0, *ends] for delta in range(-3, 4)}
    return sorted(offset for offset in near | set(range(0, len(raw), 7)) if 0 <= offset <= len(raw))


def test_a_finished_file_cut_at_any_byte_reads_merges_or_refuses(base: Path, tmp_path: Path) -> None:
    """Round 3 (a): each cut of small.jsonl (3 points, 3.4 kB) read at every byte, and merged at a dense sample of
    them with exit 0 only when the numbers are the whole run's (all three points there)."""
    raw = (base / "small.jsonl").read_bytes()
    whole = read_stream(base / "small.jsonl")
    merged = _ok("merge", base / "small.jsonl", "--json")
    path = tmp_path / "cut.jsonl"
    for offset in range(len(raw) + 1):
        path.write_bytes(raw[:offset])
        try:
            stored = read_stream(path)
        except VaeevalError as error:
            assert "\n" not in str(error)
        else:
            assert stored.header == whole.header and stored.points == whole.points[: len(stored.points)]
            assert stored.summary in (None, whole.summary)
    seen = {"ok": 0, "refused": 0}
    for offset in _offsets(raw):
        path.write_bytes(raw[:offset])
        outcome = _in_process(["merge", path, "--json"])
        seen[_tried(outcome, path, raw[:offset])] += 1
        if outcome.code == 0:
            assert outcome.stdout == merged
    assert seen["ok"] >= 2 and seen["refused"] > 100, seen


def test_a_finished_file_with_any_byte_changed_reads_the_same_or_is_refused(base: Path, tmp_path: Path) -> None:
    """Round 3 (a'): every byte of small.jsonl in turn made a space, a 9, a newline or its low bit flipped: read
    back, it is refused in one line, or holds exactly what it held (a byte changed to itself, a space in the summary
    line)."""
    raw = (base / "small.jsonl").read_bytes()
    whole = read_stream(base / "small.jsonl")
    path = tmp_path / "changed.jsonl"
    seen = {"same": 0, "refused": 0}
    for offset in range(len(raw)):
        byte = [0x20, 0x39, 0x0A, raw[offset] ^ 1][offset % 4]
        path.write_bytes(raw[:offset] + bytes([byte]) + raw[offset + 1:])
        try:
            stored = read_stream(path)
        except VaeevalError as error:
            assert "\n" not in str(error)
            seen["refused"] += 1
        else:
            assert (stored.header, stored.points, stored.summary) == (whole.header, whole.points, whole.summary), offset
            seen["same"] += 1
    assert seen["refused"] > 0.9 * len(raw), seen


def test_a_finished_file_cut_at_a_sample_of_bytes_resumes_to_the_whole_file_or_refuses(base: Path, tmp_path: Path) -> None:
    """Round 3 (a), --resume: cut inside the header, inside each point line and the summary, and at each line's end;
    a resume that succeeds leaves exactly the bytes of the uninterrupted run."""
    raw = (base / "small.jsonl").read_bytes()
    ends = [index + 1 for index, byte in enumerate(raw) if byte == 0x0A]
    offsets = sorted({0, 1, ends[0] // 2, *ends, *(end - 1 for end in ends), *(end + 20 for end in ends[:-1])})
    path = tmp_path / "cut.jsonl"
    seen = {"ok": 0, "refused": 0}
    for offset in offsets:
        path.write_bytes(raw[:offset])
        outcome = _in_process(_elbo(base, "--limit", "3", "--output", path, "--resume"))
        seen[_tried(outcome, path, raw[:offset])] += 1
        if outcome.code == 0:
            assert path.read_bytes() == raw, f"cut at {offset}: resumed to other bytes"
    assert seen["refused"] == sum(offset < ends[0] for offset in offsets), seen  # refused: no whole header line


_PARTS = ["run.jsonl", "part0.jsonl", "part1.jsonl", "small.jsonl", "ais.jsonl"]


@pytest.mark.parametrize(("first", "second"), [(a, b) for a in _PARTS for b in _PARTS])
@pytest.mark.parametrize("finished", [True, False])
def test_two_files_joined_are_refused(base: Path, tmp_path: Path, first: str, second: str, finished: bool) -> None:
    """Round 3 (b): file A (finished, or without its summary) followed by file B: a header or summary inside."""
    lines = _lines(base / first)
    path = _write_lines(tmp_path / "joined.jsonl", (lines if finished else lines[:-1]) + _lines(base / second))
    raw = path.read_bytes()
    assert _tried(_in_process(["merge", path]), path, raw) == "refused"
    with pytest.raises(VaeevalError):
        read_stream(path, repair=True)
    assert path.read_bytes() == raw


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_reordered_lines_merge_to_the_same_numbers_or_are_refused(base: Path, tmp_path: Path, data: st.DataObject) -> None:
    """Round 3 (c): any order of part0's lines, its summary kept or not, merged with part1: the whole run's numbers
    (point lines reordered in a file not yet finished) or one line."""
    lines = _lines(base / "part0.jsonl")
    finished = data.draw(st.booleans())
    order = data.draw(st.permutations(range(1, len(lines) if finished else len(lines) - 1)))
    order.insert(data.draw(st.just(0) | st.integers(0, len(order))), 0)  # the header: first, mostly
    path = _write_lines(tmp_path / "shuffled.jsonl", [lines[i] for i in order])
    raw = path.read_bytes()
    outcome = _in_process(["merge", path, base / "part1.jsonl", "--json"])
    result = _tried(outcome, path, raw)
    if result == "ok":
        assert outcome.stdout == _ok("merge", base / "part0.jsonl", base / "part1.jsonl", "--json")
        assert order[0] == 0 and (not finished or list(order) == sorted(order))


def test_a_second_resume_of_the_same_file_is_refused_while_the_first_runs(work: Path) -> None:
    """Round 3 (d): two processes resuming one file. The first is stopped (SIGSTOP) while it holds the lock, so the
    second meets it for certain; the second refuses in one line, naming the first's pid, and leaves the file be."""
    output = work / "slow.jsonl"
    args = ["elbo", str(ROOT / "sample_models/digits_categorical.safetensors"), str(ROOT / "sample_models/digits_grey_test.npy"),
            "-k", "20000", "--batch-size", "1", "--limit", "1", "--output", str(output)]
    first = subprocess.Popen([sys.executable, "-m", "vaeeval", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=work)
    lock = work / "slow.jsonl.lock"
    deadline = time.monotonic() + SUBPROCESS_SECONDS
    try:
        while not (lock.exists() and lock.read_text() == str(first.pid)):
            assert first.poll() is None and time.monotonic() < deadline, "the first run ended or stalled before its lock"
            time.sleep(0.002)
        first.send_signal(signal.SIGSTOP)
        held = output.read_bytes()
        second = _in_process([*args, "--resume"])
        assert second.code == 2 and second.stderr.count("\n") == 1, second.stderr
        assert f"in use by another vaeeval run (pid {first.pid})" in second.stderr
        assert output.read_bytes() == held and lock.read_text() == str(first.pid)
    finally:
        first.send_signal(signal.SIGCONT)
    _, stderr = first.communicate(timeout=SUBPROCESS_SECONDS)
    assert first.returncode == 0, stderr
    assert not lock.exists()
    _ok(*args[:-1], work / "fresh.jsonl")
    assert read_stream(output).points == read_stream(work / "fresh.jsonl").points
