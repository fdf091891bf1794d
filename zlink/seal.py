"""End-to-end sealed payloads: the broker moves them and cannot read or alter them.

A swarm's *seal key* is 32 random bytes that clients and nodes hold and the
broker never does (``zlink seal-key`` makes one on a trusted machine; see
docs/security.md). With it:

- **Task payloads** are sealed by the client with ChaCha20-Poly1305 under a
  per-session key ``HKDF(seal key, salt=client session public key)``. The
  nonce is the task id's counter, unique within the session; the associated
  data binds the task id and the skill, so the broker can neither read a task,
  alter it, forge one, nor replay its payload into another task or skill.
- **Results** (and partial results and errors) are sealed *to the submitting
  client*: the node and the client agree on a key by X25519 between the node
  process's key pair and the client session's key pair, mixed with the seal
  key in HKDF (so only a holder of the seal key can produce it). Another
  client, even one with the seal key, cannot read them, and the broker cannot
  forge one. The associated data binds task id, skill, attempt and status.

Envelope layouts (``0xC1`` is a byte msgpack never uses, so a sealed payload
cannot be mistaken for a plain one)::

    task:   C1 'T' 01 | client public key (32) | ciphertext + tag (16)
    result: C1 'R' 01 | node public key (32) | nonce (12) | ciphertext + tag (16)

Key agreement is cached per peer pair, so a payload costs one AEAD call.
Outcomes the broker itself decides (timeout, lost, cancelled, rejected) carry
a reason string, not user data, and travel unsealed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import os
import stat
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import ConfigError, SealError

__all__ = [
    "SEAL_OVERHEAD", "SEAL_PREFIX", "ClientSealer", "MessageSealer", "NodeSealer", "SealKey", "answer_aead",
    "is_sealed", "open_answer", "seal_answer",
]  # fmt: skip

SEAL_PREFIX: Final = "zlinkseal1:"
TASK_MAGIC: Final = b"\xc1T\x01"
RESULT_MAGIC: Final = b"\xc1R\x01"
_PUB: Final = 32
_NONCE: Final = 12
_TAG: Final = 16
#: task ids end in an 8-byte counter that is unique within the client session
_TID_COUNTER: Final = 8
#: the most bytes sealing adds to a payload
SEAL_OVERHEAD: Final = 3 + _PUB + _NONCE + _TAG
_CACHE: Final = 4096  # peer keys remembered per sealer (least recently used go first)


def is_sealed(payload: bytes | memoryview) -> bool:
    """True when ``payload`` is a sealed envelope (task or result)."""
    return len(payload) >= 3 and payload[0] == 0xC1


def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)


def _raw(pub: X25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return pub.public_bytes(Encoding.Raw, PublicFormat.Raw)


class SealKey:
    """A swarm's payload key. Text form: ``zlinkseal1:`` + urlsafe base64 of 32 bytes."""

    __slots__ = ("_key", "key_id")

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ConfigError("a seal key is 32 bytes")
        self._key = key
        #: a short public fingerprint (safe to show and to send to the broker)
        self.key_id = hashlib.blake2b(key, digest_size=6, person=b"zlink-key-id").hexdigest()

    @classmethod
    def generate(cls) -> SealKey:
        return cls(os.urandom(32))

    @classmethod
    def parse(cls, text: str) -> SealKey:
        text = (text or "").strip()
        if not text.startswith(SEAL_PREFIX):
            raise ConfigError(
                f"not a zlink seal key (it should start with {SEAL_PREFIX!r}; make one with 'zlink seal-key')"
            )
        b64 = text[len(SEAL_PREFIX) :]
        try:
            raw = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4))
        except (binascii.Error, ValueError):
            raise ConfigError("the seal key is damaged (was it cut off when copied?)") from None
        if len(raw) != 32:
            raise ConfigError("the seal key is damaged (wrong length)")
        return cls(raw)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SealKey:
        """Read a key file; refuses one that other users can read."""
        p = Path(path)
        try:
            mode = p.stat().st_mode
            text = p.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read the seal key file {p}: {exc.strerror}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"the seal key file {p} is readable by other users: chmod 600 {p}")
        return cls.parse(text)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the key to a new file readable only by its owner."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.text() + "\n")

    def text(self) -> str:
        return SEAL_PREFIX + base64.urlsafe_b64encode(self._key).decode("ascii").rstrip("=")

    def __repr__(self) -> str:
        return f"SealKey(id={self.key_id})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SealKey) and other._key == self._key

    def __hash__(self) -> int:
        return hash(self.key_id)

    # key schedule -------------------------------------------------------------

    def task_aead(self, client_pub: bytes) -> ChaCha20Poly1305:
        return ChaCha20Poly1305(_hkdf(self._key, client_pub, b"zlink task v1"))

    def result_aead(self, shared: bytes, node_pub: bytes, client_pub: bytes) -> ChaCha20Poly1305:
        return ChaCha20Poly1305(_hkdf(shared, self._key, b"zlink result v1" + node_pub + client_pub))


def _task_nonce(tid: bytes) -> bytes:
    """The task id's counter (its last 8 bytes; any length of id gives 12 bytes)."""
    return tid[-_TID_COUNTER:].rjust(_NONCE, b"\0")


def _task_ad(tid: bytes, skill: str) -> bytes:
    return b"zlink task\0" + tid + b"\0" + skill.encode()


def _result_ad(tid: bytes, skill: str, attempt: int, status: int) -> bytes:
    return b"zlink result\0" + tid + b"\0" + skill.encode() + b"\0" + attempt.to_bytes(8, "big") + bytes((status,))


class _Cache(OrderedDict[bytes, ChaCha20Poly1305]):
    """A small cache of derived AEADs, one per peer public key, oldest added evicted first; thread-safe."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()

    def get_or(self, pub: bytes, make: object) -> ChaCha20Poly1305:
        aead = self.get(pub)  # the hot path: one peer key, every task; a dict read is atomic
        if aead is not None:
            return aead
        aead = make(pub)  # type: ignore[operator]
        with self.lock:
            self[pub] = aead
            if len(self) > _CACHE:
                self.popitem(last=False)
        return aead  # type: ignore[no-any-return]


class ClientSealer:
    """One client session's side: seals tasks, opens results sealed to it."""

    def __init__(self, key: SealKey) -> None:
        self.key = key
        self._sk = X25519PrivateKey.generate()
        self.public = _raw(self._sk.public_key())
        self._task = key.task_aead(self.public)
        self._results = _Cache()
        #: answers to this session's tasks' questions
        self.answer_aead = answer_aead(key, self.public)

    def seal_task(self, tid: bytes, skill: str, plain: bytes) -> bytes:
        nonce = _task_nonce(tid)
        return TASK_MAGIC + self.public + self._task.encrypt(nonce, plain, _task_ad(tid, skill))

    def _result_aead(self, node_pub: bytes) -> ChaCha20Poly1305:
        try:
            shared = self._sk.exchange(X25519PublicKey.from_public_bytes(node_pub))
        except ValueError:
            raise SealError("a result names an invalid node key") from None
        return self.key.result_aead(shared, node_pub, self.public)

    def open_result(self, tid: bytes, skill: str, attempt: int, status: int, data: bytes | memoryview) -> bytes:
        """The plaintext of a sealed result; raises :class:`SealError` if it is not sealed to us intact."""
        if bytes(data[:3]) != RESULT_MAGIC or len(data) < 3 + _PUB + _NONCE + _TAG:
            raise SealError(f"the result of task {tid.hex()} is not sealed (sealing is on for this client)")
        node_pub = bytes(data[3 : 3 + _PUB])
        nonce = bytes(data[3 + _PUB : 3 + _PUB + _NONCE])
        aead = self._results.get_or(node_pub, self._result_aead)
        try:
            return aead.decrypt(nonce, bytes(data[3 + _PUB + _NONCE :]), _result_ad(tid, skill, attempt, status))
        except InvalidTag:
            raise SealError(
                f"the result of task {tid.hex()} failed to open: tampered with, or sealed with another seal key"
            ) from None


class NodeSealer:
    """One node process's side: opens tasks, seals results to their clients."""

    def __init__(self, key: SealKey) -> None:
        self.key = key
        self._sk = X25519PrivateKey.generate()
        self.public = _raw(self._sk.public_key())
        self._tasks = _Cache()
        self._results = _Cache()
        self._counter = itertools.count(1)
        self._prefix = os.urandom(4)  # with the counter: nonces never repeat under one key

    def open_task(self, tid: bytes, skill: str, data: bytes | memoryview) -> tuple[bytes, bytes]:
        """(plaintext, client public key) of a sealed task; raises :class:`SealError`."""
        if bytes(data[:3]) != TASK_MAGIC or len(data) < 3 + _PUB + _TAG:
            raise SealError(f"task {tid.hex()} is not sealed, and this node accepts only sealed tasks")
        client_pub = bytes(data[3 : 3 + _PUB])
        aead = self._tasks.get_or(client_pub, self.key.task_aead)
        nonce = _task_nonce(tid)
        try:
            plain = aead.decrypt(nonce, bytes(data[3 + _PUB :]), _task_ad(tid, skill))
        except InvalidTag:
            raise SealError(
                f"task {tid.hex()} failed to open: tampered with, or sealed with another seal key"
            ) from None
        self._results.get_or(client_pub, self._result_aead)  # the key agreement, checked now
        return plain, client_pub

    def _result_aead(self, client_pub: bytes) -> ChaCha20Poly1305:
        try:
            shared = self._sk.exchange(X25519PublicKey.from_public_bytes(client_pub))
        except ValueError:  # e.g. a low-order point: no shared secret
            raise SealError("a task names an invalid client key") from None
        return self.key.result_aead(shared, self.public, client_pub)

    def seal_result(self, client_pub: bytes, tid: bytes, skill: str, attempt: int, status: int, plain: bytes) -> bytes:
        aead = self._results.get_or(client_pub, self._result_aead)
        nonce = self._prefix + next(self._counter).to_bytes(8, "big")
        return RESULT_MAGIC + self.public + nonce + aead.encrypt(nonce, plain, _result_ad(tid, skill, attempt, status))


MESSAGE_MAGIC: Final = b"\xc1M\x01"
ANSWER_MAGIC: Final = b"\xc1A\x01"


def _open_aead(aead: ChaCha20Poly1305, magic: bytes, data: bytes | memoryview, ad: bytes, what: str) -> bytes:
    """Open ``magic | nonce | ciphertext``; raises :class:`SealError`."""
    if bytes(data[:3]) != magic or len(data) < 3 + _NONCE + _TAG:
        raise SealError(f"{what} is not sealed, and this peer accepts only sealed ones")
    try:
        return aead.decrypt(bytes(data[3 : 3 + _NONCE]), bytes(data[3 + _NONCE :]), ad)
    except InvalidTag:
        raise SealError(f"{what} failed to open: tampered with, or sealed with another seal key") from None


class MessageSealer:
    """Agent messages (direct and topics), sealed to the swarm: any holder of the seal key
    may open them, the broker may not. Bound to sender, recipient (or topic) and message id,
    so the broker cannot pass one off as from another sender or for another peer."""

    def __init__(self, key: SealKey) -> None:
        self.key = key
        self._aead = ChaCha20Poly1305(_hkdf(key._key, b"", b"zlink message v1"))

    @staticmethod
    def _ad(sender: str, target: str, mid: bytes) -> bytes:
        return b"zlink msg\0" + sender.encode() + b"\0" + target.encode() + b"\0" + mid

    def seal(self, sender: str, target: str, mid: bytes, plain: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return MESSAGE_MAGIC + nonce + self._aead.encrypt(nonce, plain, self._ad(sender, target, mid))

    def open(self, sender: str, target: str, mid: bytes, data: bytes | memoryview) -> bytes:
        return _open_aead(self._aead, MESSAGE_MAGIC, data, self._ad(sender, target, mid), f"a message from {sender!r}")


def _answer_ad(tid: bytes, seq: int) -> bytes:
    return b"zlink answer\0" + tid + b"\0" + seq.to_bytes(4, "big")


def answer_aead(key: SealKey, client_pub: bytes) -> ChaCha20Poly1305:
    """Answers to a task's questions: client session to the node running the task."""
    return ChaCha20Poly1305(_hkdf(key._key, client_pub, b"zlink answer v1"))


def seal_answer(aead: ChaCha20Poly1305, tid: bytes, seq: int, plain: bytes) -> bytes:
    nonce = os.urandom(_NONCE)
    return ANSWER_MAGIC + nonce + aead.encrypt(nonce, plain, _answer_ad(tid, seq))


def open_answer(aead: ChaCha20Poly1305, tid: bytes, seq: int, data: bytes | memoryview) -> bytes:
    what = f"the answer to question {seq} of task {tid.hex()}"
    return _open_aead(aead, ANSWER_MAGIC, data, _answer_ad(tid, seq), what)
