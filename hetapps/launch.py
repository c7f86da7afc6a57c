"""Starting the processes of a torch data-parallel run (`--framework torch --devices N`
without torchrun), and the rules every process of a run over several keeps.

The train command checks everything first (options, data, --out), then starts N copies of
itself as workers, ranks 0 .. N-1, which meet through torch.distributed's environment
variables as torchrun's workers do; rank 0 writes the run, the others only train. The
command waits for them all. When one fails, the others are stopped at once (a worker
blocked in a collective would otherwise wait for its lost peer), and the run ends with
exit status 1 and one line: the first failure's own (a worker leaves its line in a file
of the launcher's instead of on stderr, so that the peers that then lose contact add
nothing), or, for a worker that died without a word (killed, crashed), a line naming it
and how it ended.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from hetcore import outputs
from hetcore.errors import UsageError

FAILURES = "HETAPPS_FAILURES"  # a launched worker's environment: where its failure goes
RECORD = "HETAPPS_RECORD"  # ... and under which name
LAUNCHER = "HETAPPS_LAUNCHER"  # ... and the launcher's pid, whose end ends the worker
SUPERVISED = "HETAPPS_SUPERVISED"  # set in a jax process that supervise() started
POLL_S = 0.05
STOPPED = 128 + signal.SIGTERM  # the exit status of a worker stop() ended
GRACE_S = 5.0  # how long a stopped worker has to clean up (its staging directory) first


def worker_rank() -> int | None:
    """This process's rank when it is one of several torch processes (torchrun's or ours)."""
    return int(os.environ["RANK"]) if "WORLD_SIZE" in os.environ and "RANK" in os.environ \
        else None


def torchrun_world(settings, given: dict):
    """The settings of a process started by torchrun (or by spawn): --devices is the world
    size, and a --devices given must say the same."""
    raw = os.environ.get("WORLD_SIZE")
    if raw is None or settings.framework != "torch":
        return settings
    try:
        world = int(raw)
    except ValueError:
        raise UsageError(f"torchrun environment: WORLD_SIZE={raw!r} is not an integer") from None
    if "devices" in given and given["devices"] != world:
        raise UsageError(f"--devices {given['devices']}: torchrun started WORLD_SIZE={world} "
                         "processes; drop --devices or make them agree")
    return settings if world == settings.devices else settings.replace(devices=world)


def _port() -> int:
    """MASTER_PORT when set and free here, else a free port; a port in use is refused."""
    raw = os.environ.get("MASTER_PORT")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", int(raw) if raw else 0))
        except ValueError:
            raise UsageError(f"MASTER_PORT={raw!r}: not a port number") from None
        except OSError as e:
            raise UsageError(f"MASTER_PORT={raw}: cannot listen on it here ({e.strerror}); "
                             "unset it to take a free port") from None
        return s.getsockname()[1]


def _start(argv: list[str], records: str, record: str, env: dict, **popen
           ) -> subprocess.Popen:
    """`python -m hetapps.train argv` as a worker of this launcher: its failure line goes
    to `records` under `record`, and it ends with this process (_end_with_launcher)."""
    env = dict(os.environ, **env, **{FAILURES: records, RECORD: record,
                                     LAUNCHER: str(os.getpid())})
    return subprocess.Popen([sys.executable, "-m", "hetapps.train", *argv], env=env, **popen)


def _record(records: str, record: str) -> dict | None:
    """The failure a worker left ({code, line, time}), or None."""
    try:
        with open(os.path.join(records, f"{record}.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _ended(code: int) -> str:
    """How a process that left no line ended, said after its name."""
    if code < 0:
        return f"was killed by signal {-code} ({signal.Signals(-code).name})"
    return f"exited with status {code} without a word"


def spawn(argv: list[str], count: int) -> int:
    """Run `python -m hetapps.train argv` as `count` workers over localhost; returns the
    exit status (the run's one failure line printed here)."""
    port = _port()
    records = tempfile.mkdtemp(prefix="hetapps-workers-")
    procs: list[subprocess.Popen] = []
    try:
        for rank in range(count):
            env = dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(count),
                       LOCAL_WORLD_SIZE=str(count), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
            quiet = None if rank == 0 else subprocess.DEVNULL  # rank 0 reports
            procs.append(_start(argv, records, str(rank), env, stdout=quiet, stderr=quiet))
        return _wait(procs, records)
    finally:
        _stop(procs)
        shutil.rmtree(records, ignore_errors=True)


def supervised() -> bool:
    return SUPERVISED in os.environ


def supervise(argv: list[str], process: int | None, count: int | None) -> int:
    """Run one process of a jax run over several (`python -m hetapps.train argv`) and say
    how it ended in one line. jax ends a process that lost contact with another (a missed
    heartbeat) with an abort and a C++ stack trace; here that becomes exit status 1 and a
    line naming this process, its log kept in a file the line names. The process's stdout
    (the summary) comes through; its stderr goes to that log, and its own failure line
    (bad input, divergence) is reported as it is."""
    records = tempfile.mkdtemp(prefix="hetapps-jax-")
    log_path = os.path.join(records, "stderr.log")
    proc = None
    try:
        with open(log_path, "wb") as log:
            proc = _start(argv, records, "0", {SUPERVISED: "1"}, stderr=log)
            code = proc.wait()
        if code == 0:
            return 0
        left = _record(records, "0")
        if left is not None:
            print(left["line"], file=sys.stderr)
            return 2 if left["code"] == 2 else 1
        kept = tempfile.NamedTemporaryFile(prefix="hetapps-jax-process-", suffix=".log",
                                           delete=False)
        with kept, open(log_path, "rb") as f:
            shutil.copyfileobj(f, kept)
        how = _ended(code)
        if code == -signal.SIGABRT:
            how += ", as jax ends a process that lost contact with another"
        who = "" if process is None else f" {process}" + ("" if count is None else
                                                           f" of {count}")
        print(f"error: jax process{who} {how}; the run was stopped (its log: {kept.name})",
              file=sys.stderr)
        return 1
    finally:
        if proc is not None:
            _stop([proc])
        shutil.rmtree(records, ignore_errors=True)


def _end_with_launcher() -> None:
    """In a worker, first thing: SIGTERM it when the launcher dies, even by SIGKILL, which
    runs none of the launcher's own clean-up (Linux's PR_SET_PDEATHSIG; elsewhere a worker
    whose launcher is killed outright finishes on its own). Set here rather than between
    fork and exec (subprocess's preexec_fn), which is unsafe in a process with threads, as
    torch's and JAX's are; a launcher already gone by now ends the worker at once."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.environ.get(LAUNCHER) not in (None, str(os.getppid())):
        os._exit(STOPPED)


def _wait(procs: list[subprocess.Popen], records: str) -> int:
    while True:
        codes = [p.poll() for p in procs]
        if all(c == 0 for c in codes):
            return 0
        failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            break
        time.sleep(POLL_S)
    # A dead worker's peers fail soon after it; give them a moment so that the line
    # reported is the first failure's, then stop the rest.
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(POLL_S)
    killed = _stop(procs)
    code, line = _first_failure(procs, records, failed[0], killed)
    print(line, file=sys.stderr)
    return code


def _first_failure(procs, records: str, first_seen: int, killed: set = frozenset()
                   ) -> tuple[int, str]:
    """(exit status, line) of the failure that came first: a worker that ended without
    leaving a line (a signal, a crash) is it, unless the launcher itself stopped it
    (`killed`: those it had to SIGKILL); else the earliest line left."""
    count = len(procs)
    left = {rank: r for rank in range(count) if (r := _record(records, str(rank)))}
    for rank in [first_seen] + list(range(count)):
        code = procs[rank].returncode
        if (code not in (None, 0, STOPPED, -signal.SIGTERM) and rank not in left
                and rank not in killed):
            return 1, (f"error: torch process {rank} of {count} {_ended(code)}; the run was "
                       "stopped")
    if not left:
        return 1, f"error: torch process {first_seen} of {count} failed; the run was stopped"
    rank = min(left, key=lambda r: left[r]["time"])
    return (2 if left[rank]["code"] == 2 else 1), left[rank]["line"]


def _stop(procs: list[subprocess.Popen]) -> set[int]:
    """SIGTERM every worker still running (a worker turns it into an exit that cleans up),
    SIGKILL after GRACE_S; none is left behind. Returns the indices of those killed."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + GRACE_S
    killed = set()
    for i, p in enumerate(procs):
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            killed.add(i)
    return killed


def _stopped(*_) -> None:
    """A worker stopped by the launcher: its staging directory goes, and it ends at once.
    An orderly exit would tear down torch.distributed and gloo's threads mid-collective,
    and C++ says so on stderr ("terminate called without an active exception")."""
    outputs.discard_staging()
    os._exit(STOPPED)


_joined = False  # this process joined others (joined())


def joined() -> None:
    """Say that this process has joined a run over several processes (finish ends it)."""
    global _joined
    _joined = True


def finish(code: int) -> int:
    """The end of one process of several (launched here, or torchrun's), at once, whatever
    its status: after a failure (its line already reported) for the reason of _stopped;
    after success too (torch.distributed left, the run written), since the interpreter's
    ordinary exit could still abort in C++: about one exit in eight of a 2-process torch
    run on a 2-core CPU ended in `terminate called without an active exception` (SIGABRT)
    after its work was done, a thread of torch.distributed's destroyed while running."""
    if FAILURES in os.environ or _joined:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def reporter():
    """How a worker started by spawn reports its failure: one line into the launcher's file
    (time-stamped, so that the launcher reports the first); None outside such a worker.
    Installs the SIGTERM handler that lets a stopped worker clean up on its way out."""
    records = os.environ.get(FAILURES)
    if records is None:
        return None
    signal.signal(signal.SIGTERM, _stopped)
    _end_with_launcher()

    def report(code: int, line: str) -> None:
        rank = os.environ.get(RECORD, "0")
        part = os.path.join(records, f".{rank}.json")
        with open(part, "w", encoding="utf-8") as f:
            json.dump({"code": code, "line": line, "time": time.time()}, f)
        os.replace(part, os.path.join(records, f"{rank}.json"))

    return report
