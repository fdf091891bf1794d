"""Zero-log: the broker and the nodes write no payload or result anywhere.

A workload whose arguments, keyword arguments, partial results, exceptions,
tracebacks and results all carry a unique canary runs through a real broker
and real node processes (``zlink broker`` / ``zlink node`` with
``--log-level debug``). Then:

* everything they printed (stdout and stderr, captured to files outside the
  searched folders) holds no canary;
* every file under the broker home and under each process's working
  directory, ``$HOME`` and ``$TMPDIR`` (all fresh, empty folders) holds no
  canary, nor does any file a process holds open mid-run (deleted ones too,
  read through ``/proc/PID/fd``), nor any new file in the system temp folders;
* with sealing on, a ``/proc/PID/mem`` snapshot of the broker taken while
  canary-bearing tasks are queued and running there, and another after the
  run, holds no canary either.

The search covers the canary as UTF-8, UTF-16, UTF-32, hex and base64 (every
alignment). The same workload without a seal key keeps logs and files clean
too; there the broker holds plaintext in transit, which the memory scanner
must find: the positive control that proves the scanner works. Other controls
prove that the client does see the canary and that the file search finds it
in any of its encodings.
"""

from __future__ import annotations

import base64
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import zlink
from zlink.security import BrokerHome

from .conftest import REPO

SKILLS = Path(__file__).resolve().with_name("skills_canary.py")
CHUNK = 8 * 1024 * 1024


# --------------------------------------------------------------------------- needles and searching


def needles(token: str) -> dict[str, bytes]:
    """The canary token in every encoding a leak could plausibly take."""
    raw = token.encode()
    out = {
        "utf-8": raw,
        "utf-16-le": token.encode("utf-16-le"),
        "utf-16-be": token.encode("utf-16-be"),
        "utf-32-le": token.encode("utf-32-le"),
        "hex": raw.hex().encode(),
        "HEX": raw.hex().upper().encode(),
    }
    for k in range(3):  # base64 of the token at each of the three alignments in a longer stream
        for name, enc in (("base64", base64.b64encode), ("base64url", base64.urlsafe_b64encode)):
            full = enc(b"\0" * k + raw)
            start = 4 if k else 0  # the first group mixes in bytes before the token
            end = 4 * ((k + len(raw)) // 3)  # the last full group
            out[f"{name}@{k}"] = full[start:end]
    return out


def find_in(data: bytes, wanted: dict[str, bytes]) -> list[str]:
    return [name for name, needle in wanted.items() if needle in data]


def scan_file(path: Path, wanted: dict[str, bytes], limit: int = 256 * 1024 * 1024) -> list[str]:
    """Names of the encodings of the canary found in a file (read in binary, in chunks)."""
    longest = max(len(n) for n in wanted.values())
    hits: set[str] = set()
    try:
        with open(path, "rb") as f:
            tail = b""
            read = 0
            while read < limit:
                chunk = f.read(CHUNK)
                if not chunk:
                    break
                read += len(chunk)
                buf = tail + chunk
                hits.update(find_in(buf, wanted))
                tail = buf[-(longest - 1) :]
    except OSError:
        return []
    return sorted(hits)


def files_under(*roots: Path) -> set[Path]:
    out: set[Path] = set()
    for root in roots:
        if root.is_file():
            out.add(root)
            continue
        for dirpath, _dirs, names in os.walk(root):
            for name in names:
                p = Path(dirpath, name)
                if p.is_file() and not p.is_symlink():
                    out.add(p)
    return out


def new_temp_files(since: float, skip: tuple[Path, ...]) -> set[Path]:
    """Regular files in the system temp folders changed since ``since`` (other tests' too: they hold no canary)."""
    out: set[Path] = set()
    roots = {Path(tempfile.gettempdir()), Path("/tmp"), Path("/dev/shm"), Path("/var/tmp")}
    for root in roots:
        if not root.is_dir():
            continue
        for dirpath, dirs, names in os.walk(root, onerror=lambda _e: None):
            here = Path(dirpath)
            dirs[:] = [d for d in dirs if not any(here / d == s for s in skip)]
            for name in names:
                p = here / name
                try:
                    st = p.lstat()
                except OSError:
                    continue
                if st.st_mtime >= since and os.path.isfile(p) and not os.path.islink(p) and st.st_size < 64 << 20:
                    out.add(p)
                if len(out) > 20_000:
                    return out
    return out


@dataclass
class MemScan:
    hits: list[str]
    scanned: int  # bytes read
    regions: int


def scan_memory(pid: int, wanted: dict[str, bytes]) -> MemScan | None:
    """Search the readable memory of a live process; None when the kernel does not let us read it."""
    longest = max(len(n) for n in wanted.values())
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    except (PermissionError, FileNotFoundError):
        return None
    hits: set[str] = set()
    scanned = regions = 0
    try:
        for line in maps.splitlines():
            parts = line.split(maxsplit=5)
            perms = parts[1]
            path = parts[5] if len(parts) > 5 else ""
            if perms[0] != "r" or path in ("[vvar]", "[vvar_vclock]", "[vsyscall]"):
                continue
            if path and not path.startswith("[") and "w" not in perms:
                continue  # read-only mapping of a file (code, constants): no data of this run
            start, end = (int(x, 16) for x in parts[0].split("-"))
            regions += 1
            pos, tail = start, b""
            while pos < end:
                n = min(CHUNK, end - pos)
                try:
                    chunk = os.pread(fd, n, pos)
                except OSError:
                    break  # unmapped meanwhile, or a guard page
                if not chunk:
                    break
                scanned += len(chunk)
                buf = tail + chunk
                hits.update(find_in(buf, wanted))
                tail = buf[-(longest - 1) :]
                pos += len(chunk)
    except PermissionError:
        return None
    finally:
        os.close(fd)
    return MemScan(sorted(hits), scanned, regions)


def open_files(pid: int) -> list[Path]:
    """Regular files a process holds open right now (deleted ones included), as /proc/PID/fd links."""
    out = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        link = Path(f"/proc/{pid}/fd/{fd}")
        try:
            target = os.readlink(link)
            if target.startswith("/") and link.stat().st_size >= 0 and os.path.isfile(link):
                out.append(link)
        except OSError:
            continue
    return out


# --------------------------------------------------------------------------- the swarm, with every output captured


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    out: Path
    err: Path
    dirs: list[Path]


@dataclass
class CapturedSwarm:
    """A CLI broker and CLI nodes at DEBUG level, each in fresh folders, every output captured to a file."""

    root: Path
    seal: bool
    home: Path = field(init=False)
    logs: Path = field(init=False)
    procs: list[Proc] = field(default_factory=list)
    endpoint: str = ""
    #: every file in the searched folders when their process started (they start empty)
    before: set[Path] = field(default_factory=set)
    seal_key: zlink.SealKey | None = None

    def __post_init__(self) -> None:
        self.home = self.root / "broker-home"
        self.logs = self.root / "logs"  # outside every searched folder
        self.logs.mkdir(parents=True)
        self.seal_key = zlink.SealKey.generate() if self.seal else None

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> Proc:
        base = self.root / "work" / name
        cwd, home, tmp = base / "cwd", base / "home", base / "tmp"
        for d in (cwd, home, tmp):
            d.mkdir(parents=True)
        self.before |= files_under(base)
        full = {k: v for k, v in os.environ.items() if not k.startswith("ZLINK_")}
        full.update(env)
        full.update(HOME=str(home), TMPDIR=str(tmp), TEMP=str(tmp), TMP=str(tmp), PYTHONDONTWRITEBYTECODE="1")
        full["PYTHONPATH"] = str(REPO) + os.pathsep + full.get("PYTHONPATH", "")
        out, err = self.logs / f"{name}.stdout", self.logs / f"{name}.stderr"
        with open(out, "wb") as fo, open(err, "wb") as fe:
            popen = subprocess.Popen(
                [sys.executable, "-m", "zlink", *args],
                cwd=cwd,
                env=full,
                stdin=subprocess.DEVNULL,
                stdout=fo,
                stderr=fe,
            )
        proc = Proc(name, popen, out, err, [base])
        self.procs.append(proc)
        return proc

    @property
    def broker(self) -> Proc:
        return self.procs[0]

    def start(self, nodes: int = 2, slots: int = 2) -> None:
        args = ["broker", "--home", str(self.home), "--bind", "tcp://127.0.0.1:*", "--log-level", "debug"]
        self.before |= files_under(self.home) if self.home.exists() else set()
        self._spawn("broker", args, {})
        bh = BrokerHome(self.home)
        deadline = time.monotonic() + 20
        while not (eps := bh.bound_endpoints()):
            assert self.broker.popen.poll() is None, self.broker.err.read_text()
            assert time.monotonic() < deadline, "the broker did not start"
            time.sleep(0.05)
        self.endpoint = eps[0]
        for i in range(nodes):
            join = self.invite("node", f"leak-node-{i}")
            args = ["node", "--skills", str(SKILLS), "--slots", str(slots), "--log-level", "debug"]
            self._spawn(f"node{i}", args, {"ZLINK_JOIN": join})

    def invite(self, role: str, name: str) -> str:
        join = BrokerHome(self.home).invite(name=name, role=role, endpoints=[self.endpoint])
        return join.with_seal_key(self.seal_key).dump()

    def stop(self) -> None:
        for p in reversed(self.procs):  # nodes first: they drain
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for p in reversed(self.procs):
            try:
                p.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait()

    def kill(self) -> None:
        for p in self.procs:
            if p.popen.poll() is None:
                p.popen.kill()
                p.popen.wait()


@pytest.fixture
def make_swarm(tmp_path: Path) -> Iterator[Any]:
    made: list[CapturedSwarm] = []

    def make(seal: bool) -> CapturedSwarm:
        sw = CapturedSwarm(tmp_path / ("sealed" if seal else "plain"), seal)
        made.append(sw)
        sw.start()
        return sw

    try:
        yield make
    finally:
        for sw in made:
            sw.kill()


# --------------------------------------------------------------------------- the workload


def run_workload(
    client: zlink.Client, canary: str, token: str, mid_run: Any, peer_join: Callable[[str], str]
) -> dict[str, Any]:
    """Every kind of task, all carrying the canary. ``mid_run()`` runs while canary tasks sit at the broker."""
    seen: dict[str, Any] = {}

    def remote_error(fut: Future[Any]) -> zlink.RemoteError:
        with pytest.raises(zlink.RemoteError) as info:
            fut.result(timeout=30)
        return info.value

    # tasks parked at the broker for the whole run: nobody offers this skill
    parked = [client.submit("leak_nobody", canary, i, timeout=60) for i in range(20)]
    # a message held at the broker for the whole run: its recipient connects only at the end
    held = client.send("leak-late", {"held": canary}, ttl=120)
    # slow tasks: queued at the broker and running on the nodes while mid_run() looks
    slow = [client.submit("leak_slow", f"{canary}:{i}", 2.0, timeout=60) for i in range(12)]

    echo = client.submit("leak_echo", canary, extra={"k": canary, canary: canary.encode(), "n": [canary] * 3})
    seen["echo"] = echo.result(timeout=30)
    seen["raise"] = remote_error(client.submit("leak_raise", canary))
    seen["chain"] = remote_error(client.submit("leak_chain", canary))
    stream = client.stream("leak_stream", canary, n=5)
    seen["partials"] = list(stream)
    seen["stream_result"] = stream.result(timeout=30)
    broken = client.stream("leak_stream_raise", canary)
    with pytest.raises(zlink.RemoteError) as info:
        seen["broken_partials"] = list(broken)
    seen["stream_raise"] = info.value
    seen["async"] = client.submit("leak_async", canary).result(timeout=30)
    seen["async_raise"] = remote_error(client.submit("leak_async_raise", canary))
    astream = client.stream("leak_async_stream", canary)
    seen["async_partials"] = list(astream)
    seen["map"] = list(client.map("leak_echo", [f"{canary}:{i}" for i in range(300)], timeout=30))
    seen["big"] = client.submit("leak_big", canary, 3000).result(timeout=30)
    seen["bad_result"] = remote_error(client.submit("leak_bad_result", canary))
    seen["exit"] = remote_error(client.submit("leak_exit", canary))
    seen["interrupt"] = remote_error(client.submit("leak_interrupt", canary))
    # a multi-turn task: the skill asks, the client answers, both carry the canary
    seen["ask"] = client.submit("leak_ask", canary, on_question=lambda q: f"answer to {q}").result(timeout=30)
    # agent messages: direct, and through a topic
    client.subscribe("leak-topic")
    with zlink.Client(peer_join("leak-peer"), connect_timeout=15) as peer:
        peer.subscribe("leak-topic")
        time.sleep(0.3)  # the subscriptions reach the broker
        client.send("leak-peer", {"direct": canary}).result(timeout=30)
        seen["direct"] = peer.receive(timeout=30)
        peer.send("leak-client", [canary, "reply"]).result(timeout=30)
        seen["reply"] = client.receive(timeout=30)
        peer.publish("leak-topic", f"event {canary}").result(timeout=30)
        seen["event"] = client.receive(timeout=30)

    seen["mid_run"] = mid_run()  # the parked tasks are at the broker, the slow ones queued or running

    # cancelled while running, and a timeout while running
    doomed = client.submit("leak_slow", canary, 30.0)
    late = client.submit("leak_slow", canary, 30.0, timeout=1.0)
    for f in slow:
        assert f.result(timeout=60).startswith(canary)
    time.sleep(0.5)  # let both start
    doomed.cancel()
    with pytest.raises(zlink.TaskTimeout):
        late.result(timeout=30)
    for f in parked:
        f.cancel()
    time.sleep(1.0)  # the cancelled skills notice and answer; their answers pass the broker
    seen["after_cancel"] = client.submit("leak_echo", token).result(timeout=30)
    with zlink.Client(peer_join("leak-late"), connect_timeout=15) as late_peer:
        seen["held"] = late_peer.receive(timeout=30)
        held.result(timeout=30)
    return seen


def assert_client_saw_canary(seen: dict[str, Any], canary: str) -> None:
    """Positive control: the canary really travelled, in every form, to the client."""
    assert seen["echo"]["value"] == canary and seen["echo"]["extra"]["k"] == canary
    assert canary in seen["raise"].remote_message
    assert canary in seen["chain"].remote_message and canary in seen["chain"].remote_traceback
    assert seen["partials"] == [f"{canary}/{i}" for i in range(5)]
    assert seen["stream_result"] == f"{canary}/done"
    assert canary in seen["stream_raise"].remote_message
    assert seen["async"] == [canary]
    assert canary in seen["async_raise"].remote_message
    assert seen["async_partials"] == [f"{canary}#{i}" for i in range(3)]
    assert [r["value"] for r in seen["map"]] == [f"{canary}:{i}" for i in range(300)]
    assert seen["big"] == canary * 3000
    assert seen["bad_result"].remote_type == "TypeError"
    assert seen["exit"].remote_type == "RuntimeError" and seen["interrupt"].remote_type == "RuntimeError"
    assert seen["ask"] == [canary, f"answer to question about {canary}"]
    assert seen["direct"].body == {"direct": canary} and seen["direct"].sender == "leak-client"
    assert seen["reply"].body == [canary, "reply"] and seen["reply"].sender == "leak-peer"
    assert seen["event"].body == f"event {canary}" and seen["event"].topic == "leak-topic"
    assert seen["held"].body == {"held": canary}


def search_everything(sw: CapturedSwarm, wanted: dict[str, bytes], since: float, extra: list[Path]) -> dict[str, Any]:
    """Search what the processes printed and every file they could have written."""
    report: dict[str, Any] = {"leaks": {}, "files": 0, "bytes": 0}
    printed = [p for proc in sw.procs for p in (proc.out, proc.err)]
    written = files_under(sw.home, *(d for proc in sw.procs for d in proc.dirs))
    temp = new_temp_files(since, skip=(sw.root,))
    for path in sorted(set(printed) | written | temp | set(extra)):
        hits = scan_file(path, wanted)
        report["files"] += 1
        try:
            report["bytes"] += path.stat().st_size
        except OSError:
            pass
        if hits:
            report["leaks"][str(path)] = hits
    report["written"] = sorted(str(p.relative_to(sw.root)) for p in written - sw.before)
    report["temp"] = len(temp)
    return report


def leak_lines(sw: CapturedSwarm, wanted: dict[str, bytes]) -> list[str]:
    """The printed lines that hold the canary (for the failure message)."""
    out = []
    for proc in sw.procs:
        for path in (proc.out, proc.err):
            for line in path.read_bytes().splitlines():
                if find_in(line, wanted):
                    out.append(f"{path.name}: {line[:300]!r}")
    return out[:20]


# --------------------------------------------------------------------------- controls of the search itself


def test_needles_and_scanners_find_the_canary(tmp_path: Path) -> None:
    """Positive control: each encoding is found in a file, and the memory scanner finds a live process's canary."""
    token = secrets.token_hex(12)
    wanted = needles(token)
    text = f"prefix {token} suffix"
    samples = {
        "utf-8": text.encode(),
        "utf-16-le": text.encode("utf-16-le"),
        "utf-32-le": text.encode("utf-32-le"),
        "hex": text.encode().hex().encode(),
        "base64@0": base64.b64encode(text.encode()),
        "base64@1": base64.b64encode(b"x" + text.encode()),
        "base64@2": base64.b64encode(b"xy" + text.encode()),
    }
    for name, data in samples.items():
        p = tmp_path / f"sample-{name}"
        p.write_bytes(os.urandom(CHUNK - 5) + data)  # across a chunk boundary
        assert scan_file(p, wanted), name
    assert scan_file(tmp_path / "sample-utf-8", {"x": os.urandom(16)}) == []

    # a helper process holds the canary on its heap (read from stdin: it is not in its argv or environment)
    code = "import sys, time; s = sys.stdin.readline().strip() * 2; print('ready', flush=True); time.sleep(60)"
    helper = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert helper.stdin is not None and helper.stdout is not None
        helper.stdin.write(token.encode() + b"\n")
        helper.stdin.flush()
        assert helper.stdout.readline() == b"ready\n"
        scan = scan_memory(helper.pid, wanted)
        if scan is None:
            pytest.skip("this kernel does not let us read /proc/PID/mem")
        assert "utf-8" in scan.hits, scan
        assert scan_memory(helper.pid, {"x": os.urandom(16)}).hits == []  # type: ignore[union-attr]
    finally:
        helper.kill()
        helper.wait()


# --------------------------------------------------------------------------- the zero-log runs


def _zero_log_run(make_swarm: Any, seal: bool) -> tuple[CapturedSwarm, dict[str, Any], dict[str, Any]]:
    token = secrets.token_hex(12)
    canary = f"CANARY<{token}>"
    wanted = needles(token)
    since = time.time() - 1
    sw: CapturedSwarm = make_swarm(seal)
    broker_pid = sw.broker.popen.pid
    mem: dict[str, Any] = {}
    open_seen: list[Path] = []

    def mid_run() -> None:
        # the 20 parked tasks and most slow ones are at the broker right now
        mem["mid"] = scan_memory(broker_pid, wanted)
        for proc in sw.procs:  # files held open, deleted ones too: copy what they hold now
            for link in open_files(proc.popen.pid):
                copy = sw.logs.parent / "open-files" / f"{proc.name}-{link.name}"
                copy.parent.mkdir(exist_ok=True)
                try:
                    copy.write_bytes(link.read_bytes()[: 64 << 20])
                except OSError:
                    continue
                open_seen.append(copy)

    try:
        with zlink.Client(sw.invite("client", "leak-client"), connect_timeout=15) as client:
            assert (client.seal_key is not None) == seal
            deadline = time.monotonic() + 30
            while len(client.status()["nodes"]) < 2:
                assert time.monotonic() < deadline, "the nodes did not join"
                assert all(p.popen.poll() is None for p in sw.procs), [p.err.read_text()[-2000:] for p in sw.procs]
                time.sleep(0.1)
            seen = run_workload(client, canary, token, mid_run, lambda name: sw.invite("client", name))
            mem["after"] = scan_memory(broker_pid, wanted)
            status = client.status()
        assert_client_saw_canary(seen, canary)
        assert seen["after_cancel"] == {"value": token, "extra": None}
        assert all(p.popen.poll() is None for p in sw.procs), "a process died during the workload"
    finally:
        sw.stop()
    report = search_everything(sw, wanted, since, open_seen)
    report["mem"] = mem
    report["status"] = status
    report["leak_lines"] = leak_lines(sw, wanted)
    return sw, report, seen


@pytest.mark.timeout(90)
def test_sealed_swarm_writes_and_holds_no_canary(make_swarm: Any) -> None:
    sw, report, _ = _zero_log_run(make_swarm, seal=True)
    assert report["leaks"] == {}, (report["leaks"], report["leak_lines"])
    # the search had something to search: debug logs were written, folders were created
    broker_err = sw.broker.err.read_text()
    assert "broker listening on" in broker_err
    node_err = "".join(p.err.read_text() for p in sw.procs[1:])
    assert "leak_echo" in node_err and "sealed end to end" in node_err  # the node's own INFO lines
    assert any(w.startswith("broker-home/") for w in report["written"]), report["written"]
    assert report["status"]["counters"]["done"] > 0
    mid, after = report["mem"]["mid"], report["mem"]["after"]
    if mid is None or after is None:
        pytest.skip("logs and files are clean; this kernel does not let us read the broker's memory")
    assert mid.scanned > 10 << 20 and after.scanned > 10 << 20, (mid, after)
    print(
        f"\nsealed broker memory: mid-run {mid.scanned >> 20} MiB in {mid.regions} regions, after "
        f"{after.scanned >> 20} MiB; files searched {report['files']} ({report['bytes']} bytes), "
        f"new temp files {report['temp']}; created by the run: {report['written']}"
    )
    assert mid.hits == [], f"the canary is in the sealed broker's memory mid-run: {mid.hits}"
    assert after.hits == [], f"the canary is in the sealed broker's memory after the run: {after.hits}"


@pytest.mark.timeout(90)
def test_unsealed_swarm_writes_no_canary(make_swarm: Any) -> None:
    sw, report, _ = _zero_log_run(make_swarm, seal=False)
    assert report["leaks"] == {}, (report["leaks"], report["leak_lines"])
    assert "payloads are NOT sealed" in "".join(p.err.read_text() for p in sw.procs[1:])
    # positive control of the memory scanner: an unsealed broker holds the queued payloads in plaintext
    mid = report["mem"]["mid"]
    if mid is None:
        pytest.skip("logs and files are clean; this kernel does not let us read the broker's memory")
    print(
        f"\nunsealed broker memory mid-run: {mid.scanned >> 20} MiB, canary found as {mid.hits}; "
        f"files searched {report['files']}"
    )
    assert "utf-8" in mid.hits, f"the memory scanner missed plaintext payloads queued at the broker: {mid}"


@pytest.mark.timeout(60)
def test_cancelled_async_skill_leaves_no_canary_in_the_node_log(make_swarm: Any) -> None:
    token = secrets.token_hex(12)
    canary = f"CANARY<{token}>"
    sw: CapturedSwarm = make_swarm(True)
    try:
        with zlink.Client(sw.invite("client", "leak-client"), connect_timeout=15) as client:
            deadline = time.monotonic() + 30
            while len(client.status()["nodes"]) < 2:
                assert time.monotonic() < deadline, "the nodes did not join"
                time.sleep(0.1)
            fut = client.submit("leak_async_slow", canary, 30.0)
            while client.status()["running"] < 1:
                assert time.monotonic() < deadline, "the task never started"
                time.sleep(0.05)
            fut.cancel()
            time.sleep(1.0)
            assert client.submit("leak_echo", "ok").result(timeout=20) == {"value": "ok", "extra": None}
    finally:
        sw.stop()
    assert leak_lines(sw, needles(token)) == []
