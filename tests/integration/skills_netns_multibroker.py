"""The client driver of the multi-broker network-namespace test (see test_netns_multibroker.py).

Run as a script inside the client's namespace::

    python skills_netns_multibroker.py RESULTS_FILE

with ``$ZLINK_JOIN`` naming every broker of the swarm (the client picks one and
fails over) and ``$ZLINK_PROBE_JOINS`` a JSON object ``{broker name: join
string naming that broker only}``. It is skills_netns.py's driver (one JSON
command per line on stdin, one JSON answer per line on stdout, one line per
resolved task in RESULTS_FILE, every final RESULT counted on the wire before
the client's duplicate filter) with a few more commands:

* ``where``: the broker the task client uses now, and every WELCOME it got;
* ``wait_moved``: wait until the task client is registered with another broker;
* ``probe_nodes``: ``wait_nodes`` as seen by one chosen broker (a probe client
  whose join string names that broker only, so it never fails over);
* ``probe_submit``: run tasks through one chosen broker and return their values.

The nodes serve skills_netns.py's ``work`` skill.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import zlink
from zlink import protocol as P

# run as a script: this folder is sys.path[0]
from skills_netns import CountingClient, Driver, serve  # isort: skip


class FailoverClient(CountingClient):
    """A counting client that also records each WELCOME: when, from which broker, new epoch or not."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.welcomes: list[tuple[float, str, bool]] = []
        super().__init__(*args, **kwargs)

    def on_welcome(self, welcome: P.Welcome, new_epoch: bool) -> None:
        self.welcomes.append((time.monotonic(), self.endpoint, new_epoch))
        super().on_welcome(welcome, new_epoch)


def _names(st: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["name"]: n for n in st.get("nodes", [])}


class MultiDriver(Driver):
    client: FailoverClient

    def __init__(self, client: FailoverClient, results_path: str, probe_joins: dict[str, str]) -> None:
        super().__init__(client, results_path)
        self.probe_joins = probe_joins
        self.probes: dict[str, zlink.Client] = {}

    def close(self) -> None:
        for probe in self.probes.values():
            try:
                probe.close(timeout=1.0)
            except zlink.ZlinkError:
                pass
        super().close()

    def probe(self, broker: str, *, fresh: bool = False, timeout: float = 5.0) -> zlink.Client:
        """The probe client of ``broker`` (a new one when ``fresh``); raises ZlinkError when it cannot connect."""
        old = self.probes.pop(broker, None) if fresh else self.probes.get(broker)
        if old is not None and not fresh:
            return old
        if old is not None:
            try:
                old.close(timeout=1.0)
            except zlink.ZlinkError:
                pass
        probe = zlink.Client(self.probe_joins[broker], connect_timeout=max(0.5, timeout))
        self.probes[broker] = probe
        return probe

    def where(self) -> dict[str, Any]:
        c = self.client
        return {
            "endpoint": c.endpoint,
            "welcomed": c.welcome is not None,
            "welcomes": [[t, ep, new] for t, ep, new in c.welcomes],
            "now": time.monotonic(),
        }

    def wait_moved(self, away_from: str, timeout: float) -> dict[str, Any]:
        """Until the task client is registered (WELCOME) with a broker other than ``away_from``."""
        start = time.monotonic()
        c = self.client
        while time.monotonic() - start < timeout:
            if c.endpoint != away_from and c.welcome is not None:
                return {"ok": True, "elapsed": time.monotonic() - start, **self.where()}
            time.sleep(0.01)
        return {"ok": False, "elapsed": time.monotonic() - start, **self.where()}

    def probe_nodes(
        self, broker: str, present: list[str], absent: list[str], busy: list[str], timeout: float, fresh: bool
    ) -> dict[str, Any]:  # fmt: skip
        """skills_netns's wait_nodes, through ``broker``'s probe (made again on any error)."""
        start = time.monotonic()
        st: dict[str, Any] = {}
        renew = fresh
        while True:
            left = timeout - (time.monotonic() - start)
            try:
                probe = self.probe(broker, fresh=renew, timeout=min(5.0, max(0.5, left)))
                renew = False
                st = probe.status(timeout=min(2.0, max(0.5, left)))
            except zlink.ZlinkError as exc:  # a STATUS lost in an outage: start over with a fresh probe
                st = {"error": f"{type(exc).__name__}: {exc}", "nodes": []}
                renew = True
            nodes = _names(st)
            if (
                "error" not in st
                and all(n in nodes for n in present)
                and not any(n in nodes for n in absent)
                and all(n in nodes and nodes[n]["busy"] > 0 for n in busy)
            ):
                return {"ok": True, "elapsed": time.monotonic() - start, "status": st}
            if time.monotonic() - start > timeout:
                return {"ok": False, "elapsed": time.monotonic() - start, "status": st}
            time.sleep(0.05)

    def probe_submit(self, broker: str, items: list[list[Any]], timeout: float) -> dict[str, Any]:
        """Run ``work(i, seconds)`` for each item through ``broker``'s probe; the outcomes by item."""
        probe = self.probe(broker)
        futs = {i: probe.submit("work", i, seconds, timeout=timeout) for i, seconds in items}
        out: dict[str, Any] = {}
        deadline = time.monotonic() + timeout + 5.0
        for i, fut in futs.items():
            try:
                out[str(i)] = {"ok": True, "value": fut.result(max(0.1, deadline - time.monotonic()))}
            except Exception as exc:  # reported to the test
                out[str(i)] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        return {"results": out}

    def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd["op"]
        if op == "where":
            return self.where()
        if op == "wait_moved":
            return self.wait_moved(cmd["away_from"], cmd["timeout"])
        if op == "probe_nodes":
            return self.probe_nodes(
                cmd["broker"], cmd.get("present", []), cmd.get("absent", []), cmd.get("busy", []), cmd["timeout"],
                cmd.get("fresh", False),
            )  # fmt: skip
        if op == "probe_submit":
            return self.probe_submit(cmd["broker"], cmd["items"], cmd.get("timeout", 30.0))
        return super().handle(cmd)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: skills_netns_multibroker.py RESULTS_FILE  ($ZLINK_JOIN, $ZLINK_PROBE_JOINS)", file=sys.stderr)
        return 2
    probe_joins = json.loads(os.environ.pop("ZLINK_PROBE_JOINS", "{}"))
    client = FailoverClient(None, connect_timeout=15.0)
    return serve(client, MultiDriver(client, argv[0], probe_joins))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
