"""The network-namespace test's two programs (see test_netns.py).

* As a skills module (``zlink node --skills skills_netns.py``): ``work``, a task
  of about ``seconds`` that reports which node ran it (``$ZLINK_NETNS_NODE``).
* As a script (``python skills_netns.py RESULTS_FILE``, join in ``$ZLINK_JOIN``):
  the client driver that runs inside the client's namespace. It reads one JSON
  command per line on stdin, answers with one JSON line on stdout, and appends
  one JSON line per resolved task to RESULTS_FILE. It also counts every final
  RESULT item the broker sends per task id (before the client's own duplicate
  filter), so the test can tell whether a result was delivered twice.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import Counter
from typing import Any

import zlink
from zlink import protocol as P


@zlink.skill()
def work(i: int, seconds: float) -> dict[str, Any]:
    """Sleep ``seconds`` (stopping early when cancelled), then say who did it."""
    task = zlink.current_task()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if task.cancelled:
            break
        time.sleep(0.01)
    return {"i": i, "square": i * i, "node": os.environ.get("ZLINK_NETNS_NODE", "?"), "attempt": task.attempt}


# --------------------------------------------------------------------------- the client driver


class CountingClient(zlink.Client):
    """A client that counts every final RESULT item per task id as it arrives."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.deliveries: Counter[str] = Counter()
        super().__init__(*args, **kwargs)

    def on_message(self, msg: P.Message, frames: list[Any]) -> None:
        if type(msg) is P.Result:
            for item in msg.results:  # type: ignore[attr-defined]
                if item.status != P.Outcome.PARTIAL:
                    self.deliveries[item.tid.hex()] += 1
        super().on_message(msg, frames)


def _node_names(st: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["name"]: n for n in st["nodes"]}


class Driver:
    def __init__(self, client: CountingClient, results_path: str) -> None:
        self.client = client
        self.results = open(results_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.lock = threading.Lock()
        self.resolved = 0

    def close(self) -> None:
        self.results.close()

    def _record(self, i: int, tid: str, fut: Any) -> None:
        line: dict[str, Any] = {"i": i, "tid": tid, "t": time.monotonic()}
        exc = fut.exception()
        if exc is None:
            line["ok"] = True
            line["value"] = fut.result()
        else:
            line["ok"] = False
            line["error"] = f"{type(exc).__name__}: {exc}"
        with self.lock:
            self.results.write(json.dumps(line) + "\n")
            self.results.flush()
            self.resolved += 1

    def submit(self, items: list[list[Any]], timeout: float) -> dict[str, Any]:
        tids: dict[str, str] = {}
        for i, seconds in items:
            fut = self.client.submit("work", i, seconds, timeout=timeout)
            tid = fut.task_id
            tids[str(i)] = tid
            fut.add_done_callback(lambda f, i=i, tid=tid: self._record(i, tid, f))
        return {"tids": tids}

    def wait_nodes(
        self, present: list[str], absent: list[str], busy: list[str], timeout: float
    ) -> dict[str, Any]:  # fmt: skip
        start = time.monotonic()
        st: dict[str, Any] = {}
        while True:
            try:
                st = self.client.status(timeout=2.0)
            except zlink.ZlinkError as exc:
                st = {"error": str(exc), "nodes": []}
            nodes = _node_names(st)
            if (
                all(n in nodes for n in present)
                and not any(n in nodes for n in absent)
                and all(n in nodes and nodes[n]["busy"] > 0 for n in busy)
            ):
                return {"ok": True, "elapsed": time.monotonic() - start, "status": st}
            if time.monotonic() - start > timeout:
                return {"ok": False, "elapsed": time.monotonic() - start, "status": st}
            time.sleep(0.05)

    def wait_results(self, count: int, timeout: float) -> dict[str, Any]:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            with self.lock:
                if self.resolved >= count:
                    break
            time.sleep(0.02)
        with self.lock:
            return {"ok": self.resolved >= count, "resolved": self.resolved, "elapsed": time.monotonic() - start}

    def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd["op"]
        if op == "status":
            return {"status": self.client.status(timeout=cmd.get("timeout", 5.0))}
        if op == "submit":
            return self.submit(cmd["items"], cmd.get("timeout", 30.0))
        if op == "wait_nodes":
            return self.wait_nodes(cmd.get("present", []), cmd.get("absent", []), cmd.get("busy", []), cmd["timeout"])
        if op == "wait_results":
            return self.wait_results(cmd["count"], cmd["timeout"])
        if op == "report":
            with self.lock:
                return {"deliveries": dict(self.client.deliveries), "resolved": self.resolved}
        raise ValueError(f"unknown op {op!r}")


def serve(client: Any, driver: Any) -> int:
    """Answer the test's JSON commands on stdin, one per line, until ``quit``; then close both."""
    try:
        print(json.dumps({"ready": True}), flush=True)
        for raw in sys.stdin:
            if not raw.strip():
                continue
            cmd = json.loads(raw)
            if cmd["op"] == "quit":
                break
            try:
                reply = driver.handle(cmd)
            except Exception as exc:  # report it to the test rather than die silently
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(reply), flush=True)
    finally:
        client.close()
        driver.close()
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: skills_netns.py RESULTS_FILE  (join string in $ZLINK_JOIN)", file=sys.stderr)
        return 2
    client = CountingClient(None, connect_timeout=15.0)
    return serve(client, Driver(client, argv[0]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
