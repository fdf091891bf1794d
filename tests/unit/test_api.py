"""The public surface: exactly what __all__ promises, and docs that match the code."""

from __future__ import annotations

import re
from pathlib import Path

import zlink
from zlink import errors, scheduler

ROOT = Path(__file__).resolve().parents[2]

PUBLIC = {
    "AsyncClient", "AuthenticationError", "Broker", "Client", "ClosedError", "ConfigError", "Executor",
    "ConnectError", "Join", "KeyPair", "LocalProtocolError", "Node", "ProtocolError",
    "RejectedError", "RemoteError", "RemoteProtocolError", "SealError", "SealKey", "SkillSpec",
    "LoopGuarded", "Message", "Question", "Undeliverable", "TaskCancelled",
    "TaskContext", "TaskError", "TaskFuture", "TaskLost", "TaskStream", "TaskTimeout", "ZlinkError",
    "__version__", "current_task", "skill",
}  # fmt: skip


def test_all_lists_exactly_the_public_names() -> None:
    assert set(zlink.__all__) == PUBLIC
    assert len(zlink.__all__) == len(set(zlink.__all__))
    for name in zlink.__all__:
        assert hasattr(zlink, name), name
    public_attrs = {n for n in vars(zlink) if not n.startswith("_")} - {
        "annotations", "broker", "client", "errors", "node", "protocol", "scheduler", "seal", "security", "_peer",
        "top", "metrics", "_batch", "_progress", "a2a",
    }  # fmt: skip
    assert public_attrs <= PUBLIC | {"demo", "cli"}


def test_every_error_is_a_zlink_error_and_drawn_in_the_docstring() -> None:
    doc = errors.__doc__ or ""
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, zlink.ZlinkError)
        assert name in doc, f"{name} missing from the tree in zlink/errors.py"


def test_py_typed_is_shipped() -> None:
    assert (ROOT / "zlink" / "py.typed").exists()


def test_skill_decorator_returns_the_function_unchanged() -> None:
    def f(x: int) -> int:
        return x + 1

    g = zlink.skill()(f)
    assert g is f and g(1) == 2
    assert zlink.skill(f) is f  # bare form

    @zlink.skill("renamed", tags=["t"])
    async def h() -> None:
        """First paragraph.

        More."""

    spec = h.__zlink_skill__  # type: ignore[attr-defined]
    assert spec.name == "renamed" and spec.is_async and spec.tags == ("t",)
    assert spec.description == "First paragraph."


def test_architecture_doc_lists_exactly_the_task_transitions() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("<!-- transitions:start -->", 1)[1].split("<!-- transitions:end -->", 1)[0]
    rows = set()
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("state", "") and not set(cells[0]) <= {"-"}:
            rows.add(((cells[0], cells[1]), cells[2]))
    assert rows == set(scheduler.TASK_TRANSITIONS.items())


def test_protocol_doc_lists_every_command_and_error_code() -> None:
    from zlink import protocol

    text = (ROOT / "docs" / "protocol.md").read_text()
    for command in protocol.COMMANDS:
        assert re.search(rf"`{command}`", text), command
    for code in ("malformed", "bad-version", "unknown-command", "bad-field", "frame-count", "too-large"):
        assert f"`{code}`" in text, code
