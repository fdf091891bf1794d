"""Keys, key files, the broker's allowed-keys table, ZAP policy and join strings.

Every zlink socket runs CurveZMQ. The broker authorises a peer by its public
key: the folder ``HOME/allowed/`` holds one public certificate per authorised
key (pyzmq's certificate format, with ``name`` and ``role`` in its metadata
section). The broker re-reads that folder when it changes, so ``zlink invite``,
``zlink allow`` and ``zlink revoke`` take effect on a running broker.

A *join string* is a single line holding everything a peer needs to connect:
the broker's endpoint(s) and public key, and the peer's own key pair. It is a
credential: whoever holds it can connect with its role.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import math
import os
import re
import socket
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgpack
import zmq
from zmq.utils import z85

from .errors import ConfigError
from .seal import SEAL_PREFIX, SealKey

__all__ = [
    "JOIN_PREFIX",
    "ROLE_NAMES",
    "AllowedKeys",
    "Join",
    "KeyPair",
    "ZapPolicy",
    "default_home",
    "generate_keypair",
    "load_keypair",
    "read_cert",
    "write_cert",
]

JOIN_PREFIX: Final = "zlink1:"
ROLE_NAMES: Final = ("node", "client", "both", "admin")
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_Z85_RE: Final = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")


def default_home() -> Path:
    """``$ZLINK_HOME`` or ``~/.zlink``."""
    env = os.environ.get("ZLINK_HOME")
    return Path(env).expanduser() if env else Path.home() / ".zlink"


def check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ConfigError(
            f"invalid name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def check_role(role: str) -> str:
    if role not in ROLE_NAMES:
        raise ConfigError(f"invalid role {role!r}: choose one of {', '.join(ROLE_NAMES)}")
    return role


def _check_z85(key: str, what: str) -> str:
    if not isinstance(key, str) or not _Z85_RE.match(key):
        raise ConfigError(f"{what} is not a 40-character Z85 CurveZMQ key")
    return key


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A CurveZMQ key pair as Z85 text (``secret`` may be None for a public cert)."""

    public: str
    secret: str | None = None

    def __repr__(self) -> str:  # never print a secret key by accident
        return f"KeyPair(public={self.public!r}, secret={'<hidden>' if self.secret else None})"


def generate_keypair() -> KeyPair:
    public, secret = zmq.curve_keypair()
    return KeyPair(public.decode("ascii"), secret.decode("ascii"))


# --------------------------------------------------------------------------- certificate files

_HEADER = """#   ****  Generated on {date} by zlink  ****
#   ZeroMQ CURVE {kind} Certificate
#   Exchange securely, or use a secure mechanism to verify the contents
#   of this file after exchange.

"""


def write_cert(path: Path, keys: KeyPair, *, metadata: dict[str, str] | None = None, secret: bool = False) -> None:
    """Write a certificate in pyzmq's format (public, or public + secret).

    Secret certificates are created with mode 0600 and never overwritten.
    """
    lines = [
        _HEADER.format(
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(), kind="Secret" if secret else "Public"
        )
    ]
    lines.append("metadata\n")
    for k, v in (metadata or {}).items():
        if not re.match(r"^[a-z][a-z0-9_-]*$", k) or '"' in v or "\n" in v:
            raise ConfigError(f"invalid certificate metadata {k!r}")
        lines.append(f'    {k} = "{v}"\n')
    lines.append("curve\n")
    lines.append(f'    public-key = "{keys.public}"\n')
    if secret:
        if keys.secret is None:
            raise ConfigError("no secret key to write")
        lines.append(f'    secret-key = "{keys.secret}"\n')
    data = "".join(lines).encode("ascii")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    mode = 0o600 if secret else 0o644
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise ConfigError(f"{path} already exists; refusing to overwrite a key") from None
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


@dataclass(frozen=True, slots=True)
class Cert:
    public: str
    secret: str | None
    metadata: dict[str, str] = field(default_factory=dict)


def read_cert(path: Path) -> Cert:
    """Parse a pyzmq/zlink certificate file (public or secret)."""
    try:
        text = Path(path).read_text("ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read certificate {path}: {exc}") from None
    section = ""
    metadata: dict[str, str] = {}
    keys: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.rstrip()
        if not line.strip() or line.lstrip().startswith("#"):
            continue  # Z85 keys may contain '#': only whole-line comments
        if not line.startswith((" ", "\t")):
            section = line.strip()
            continue
        m = re.match(r'^\s+([A-Za-z0-9_-]+)\s*=\s*"?([^"]*)"?\s*$', line)
        if not m:
            raise ConfigError(f"malformed line in certificate {path}: {line.strip()!r}")
        (metadata if section == "metadata" else keys)[m.group(1)] = m.group(2)
    public = keys.get("public-key")
    if public is None:
        raise ConfigError(f"certificate {path} has no public-key")
    _check_z85(public, f"public-key in {path}")
    secret = keys.get("secret-key")
    if secret is not None:
        _check_z85(secret, f"secret-key in {path}")
    return Cert(public, secret, metadata)


def load_keypair(path: Path) -> KeyPair:
    """Load ``NAME.key_secret`` (or a path to ``NAME.key`` whose secret sits beside it)."""
    p = Path(path)
    if p.suffix == ".key" and p.with_suffix(".key_secret").exists():
        p = p.with_suffix(".key_secret")
    cert = read_cert(p)
    if cert.secret is None:
        raise ConfigError(f"{p} holds no secret key")
    return KeyPair(cert.public, cert.secret)


# --------------------------------------------------------------------------- the allowed-keys table


@dataclass(frozen=True, slots=True)
class AllowedKey:
    name: str
    role: str
    public: str
    path: str


_RACY_S = 2.0  # the coarsest mtime of a common file system (FAT: 2 s)


class AllowedKeys:
    """The broker's table of authorised keys, re-read when ``allowed/`` changes.

    :meth:`refresh` is cheap (one ``scandir``, and only new or changed files
    are parsed) and returns the public keys that disappeared since the last
    read, so the broker can disconnect them. ``max_age`` skips the scan when
    the last one is that recent and the folder itself (its mtime: a key file
    added, removed or renamed into place) has not changed: a join storm of a
    thousand nodes then costs one ``stat`` per handshake, not a scan.

    An mtime is only as fine as the kernel's clock tick (or the file system's:
    up to 2 s), so a key written in the same tick as the last scan leaves it
    unchanged. A folder stamp seen for less than 2 s is "racy" (as git calls
    it): meanwhile a refresh with ``exact`` (a stranger's handshake: its key may
    have been written a moment ago) scans anyway; a known key's refresh still
    waits ``max_age`` (a revocation shows within it). The 2 s run on this
    process's monotonic clock from the moment the stamp was first seen, so a
    wall clock stepped back, or a file server's clock ahead, changes nothing.
    """

    def __init__(self, folder: Path, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.folder = Path(folder)
        self._clock = clock
        self._stamp_seen = -math.inf  # when the folder's current mtime was first seen
        self._stamp: tuple[tuple[str, int, int], ...] | None = None
        self._scanned = -math.inf
        self._folder_mtime: int | None = None
        #: file name -> (mtime, size) and what it held (None: unreadable or a bad role)
        self._parsed: dict[str, tuple[tuple[int, int], AllowedKey | None]] = {}
        self.by_key: dict[str, AllowedKey] = {}
        self.bad_files: list[str] = []
        #: keys removed (or whose role changed) since :meth:`take_removed` last ran
        self.removed: set[str] = set()
        self.refresh()

    def _scan(self) -> tuple[tuple[str, int, int], ...]:
        entries = []
        try:
            with os.scandir(self.folder) as it:
                for e in it:
                    if e.name.endswith(".key") and e.is_file():
                        st = e.stat()
                        entries.append((e.name, st.st_mtime_ns, st.st_size))
        except FileNotFoundError:
            pass
        return tuple(sorted(entries))

    def _parse(self, name: str) -> AllowedKey | None:
        path = self.folder / name
        try:
            cert = read_cert(path)
        except ConfigError:
            return None
        role = cert.metadata.get("role", "both")
        if role not in ROLE_NAMES:
            return None
        return AllowedKey(cert.metadata.get("name") or name[: -len(".key")], role, cert.public, str(path))

    def _folder_stamp(self) -> int | None:
        try:
            return os.stat(self.folder).st_mtime_ns
        except OSError:
            return None

    def refresh(self, *, max_age: float = 0.0, exact: bool = False) -> set[str]:
        now = self._clock()
        folder = self._folder_stamp()
        fresh = max_age > 0 and now - self._scanned < max_age and folder == self._folder_mtime
        if fresh and not (exact and self.racy()):
            return set()
        if folder != self._folder_mtime:
            self._stamp_seen = now
        self._scanned, self._folder_mtime = now, folder
        stamp = self._scan()
        if stamp == self._stamp:
            return set()
        self._stamp = stamp
        parsed: dict[str, tuple[tuple[int, int], AllowedKey | None]] = {}
        for name, mtime, size in stamp:
            old = self._parsed.get(name)
            parsed[name] = old if old is not None and old[0] == (mtime, size) else ((mtime, size), self._parse(name))
        self._parsed = parsed
        table = {k.public: k for _, k in parsed.values() if k is not None}
        removed = set(self.by_key) - set(table)
        removed |= {k for k, v in table.items() if k in self.by_key and self.by_key[k].role != v.role}
        self.by_key = table
        self.bad_files = [name for name, (_, k) in parsed.items() if k is None]
        self.removed |= removed
        return removed

    def racy(self) -> bool:
        """The folder's mtime may hide a change made in the tick it was read in (or there is no folder)."""
        return self._folder_mtime is None or self._clock() - self._stamp_seen < _RACY_S

    def take_removed(self) -> set[str]:
        """Refresh, then return and forget the keys removed since the last call."""
        self.refresh()
        out, self.removed = self.removed, set()
        return out

    def get(self, public: str) -> AllowedKey | None:
        return self.by_key.get(public)

    def find_name(self, name: str) -> list[AllowedKey]:
        return [k for k in self.by_key.values() if k.name == name]


class ZapPolicy:
    """Answers ZAP requests (RFC 27) from libzmq: CURVE keys in the table pass.

    The user id in the reply is the client's Z85 public key; the broker reads it
    back from each connection's first message (the ``User-Id`` property).
    """

    def __init__(self, keys: AllowedKeys) -> None:
        self.keys = keys
        self.allowed = 0
        self.denied = 0

    def reply(self, request: list[bytes]) -> list[bytes]:
        if len(request) < 6:
            self.denied += 1
            return [b"1.0", request[1] if len(request) > 1 else b"", b"400", b"bad ZAP request", b"", b""]
        version, request_id, _domain, _address, _identity, mechanism = request[:6]
        creds = request[6:]
        if version != b"1.0":
            self.denied += 1
            return [b"1.0", request_id, b"400", b"bad ZAP version", b"", b""]
        if mechanism != b"CURVE" or len(creds) != 1 or len(creds[0]) != 32:
            self.denied += 1
            return [b"1.0", request_id, b"400", b"CURVE required", b"", b""]
        public = z85.encode(creds[0]).decode("ascii")
        # One stat of the folder per handshake; a full scan only when the folder changed (a key
        # invited or revoked), or the last scan is older than a second for a known key (an edited
        # file) or a tenth of a second for a stranger (so a flood of them cannot keep it scanning),
        # except that a stranger always gets a scan while the folder's mtime is too recent to
        # prove that no key was written since the last one (see AllowedKeys).
        known = self.keys.get(public) is not None
        self.keys.refresh(max_age=1.0 if known else 0.1, exact=not known)
        if self.keys.get(public) is None:
            self.denied += 1
            return [b"1.0", request_id, b"400", b"key not authorised", b"", b""]
        self.allowed += 1
        return [b"1.0", request_id, b"200", b"OK", public.encode("ascii"), b""]


# --------------------------------------------------------------------------- join strings


@dataclass(frozen=True, slots=True)
class Join:
    """Everything a peer needs to join a swarm (see :meth:`parse`)."""

    endpoints: tuple[str, ...]
    broker_key: str
    keys: KeyPair
    name: str = ""
    role: str = "both"
    #: the swarm's payload key, when the join string carries one (see ``zlink seal-key``)
    seal_key: SealKey | None = None

    def __repr__(self) -> str:
        sealed = f", seal_key={self.seal_key.key_id}" if self.seal_key is not None else ""
        return f"Join(endpoints={self.endpoints!r}, name={self.name!r}, role={self.role!r}{sealed})"

    def with_seal_key(self, key: SealKey | None) -> Join:
        """This join string with ``key`` added (``None``: removed)."""
        return dataclasses.replace(self, seal_key=key)

    def dump(self) -> str:
        body: dict[str, Any] = {
            "e": list(self.endpoints),
            "b": self.broker_key,
            "p": self.keys.public,
            "s": self.keys.secret,
            "n": self.name,
            "r": self.role,
        }
        if self.seal_key is not None:
            body["k"] = self.seal_key.text()
        raw = msgpack.packb(body, use_bin_type=True)
        return JOIN_PREFIX + base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")

    @classmethod
    def parse(cls, text: str) -> Join:
        """Parse a join string; raises ConfigError with a clear reason."""
        text = (text or "").strip()
        if not text:
            raise ConfigError("no join string: pass --join or set $ZLINK_JOIN (create one with 'zlink invite')")
        if not text.startswith(JOIN_PREFIX):
            raise ConfigError(f"not a zlink join string (it should start with {JOIN_PREFIX!r})")
        b64 = text[len(JOIN_PREFIX) :]
        try:
            raw = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4))
            body = msgpack.unpackb(raw, raw=False)
        except (binascii.Error, ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
            raise ConfigError("join string is damaged (was it cut off when copied?)") from None
        if not isinstance(body, dict):
            raise ConfigError("join string is damaged")
        try:
            endpoints = tuple(body["e"])
            if not endpoints or not all(isinstance(e, str) and e.startswith("tcp://") for e in endpoints):
                raise ConfigError("join string names no tcp:// endpoint")
            return cls(
                endpoints=endpoints,
                broker_key=_check_z85(body["b"], "broker key"),
                keys=KeyPair(_check_z85(body["p"], "public key"), _check_z85(body["s"], "secret key")),
                name=str(body.get("n", "")),
                role=check_role(str(body.get("r", "both"))),
                seal_key=SealKey.parse(str(body["k"])) if body.get("k") else None,
            )
        except (KeyError, TypeError):
            raise ConfigError("join string is damaged (missing fields)") from None

    @classmethod
    def from_env(cls, join: str | Join | None) -> Join:
        if isinstance(join, Join):
            return join
        if join is None:
            join = os.environ.get("ZLINK_JOIN", "")
            if not join.strip():
                raise ConfigError(
                    "no join string: pass join=... / --join, or set $ZLINK_JOIN (create one with 'zlink invite')"
                )
        return cls.parse(join)


def resolve_seal_key(explicit: SealKey | str | None, join: Join) -> SealKey | None:
    """The payload key a peer uses: ``explicit`` (a key, its text or a key file),
    else the join string's, else ``$ZLINK_SEAL_KEY`` (text or a file path), else None."""
    if explicit is None:
        if join.seal_key is not None:
            return join.seal_key
        explicit = os.environ.get("ZLINK_SEAL_KEY", "").strip() or None
        if explicit is None:
            return None
    return load_seal_key(explicit)


def load_seal_key(source: SealKey | str) -> SealKey:
    """A seal key from its text (``zlinkseal1:...``) or from a key file's path."""
    if isinstance(source, SealKey):
        return source
    text = source.strip()
    return SealKey.parse(text) if text.startswith(SEAL_PREFIX) else SealKey.load(text)


def default_host() -> str:
    """A name other machines can likely use to reach this one."""
    try:
        return socket.getfqdn() or socket.gethostname()
    except OSError:
        return "127.0.0.1"


def secure_dir(path: Path) -> Path:
    """Create ``path`` (and parents) readable only by this user."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            path.chmod(0o700)
    except OSError as exc:
        raise ConfigError(f"cannot create {path}: {exc.strerror}") from None
    return path


# --------------------------------------------------------------------------- the broker's home folder


class BrokerHome:
    """``HOME/broker.key``, ``HOME/broker.key_secret``, ``HOME/allowed/``, ``HOME/broker.json``.

    The home holds keys and the broker's last bind address, never payloads.
    """

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path).expanduser() if path is not None else default_home()
        self.public_file = self.path / "broker.key"
        self.secret_file = self.path / "broker.key_secret"
        self.allowed = self.path / "allowed"
        self.config_file = self.path / "broker.json"

    def exists(self) -> bool:
        return self.secret_file.exists()

    def ensure(self) -> tuple[KeyPair, bool]:
        """Create the home (keys, allowed/) if needed; returns (keys, created)."""
        secure_dir(self.path)
        secure_dir(self.allowed)
        created = False
        if not self.secret_file.exists():
            keys = generate_keypair()
            try:
                write_cert(self.secret_file, keys, metadata={"name": "broker"}, secret=True)
            except ConfigError:
                if not self.secret_file.exists():
                    raise
                # another broker of this swarm started from this home at the same moment and
                # created the keys first: all of them use those
            else:
                if self.public_file.exists():
                    self.public_file.unlink()
                write_cert(self.public_file, KeyPair(keys.public), metadata={"name": "broker"})
                created = True
        for _ in range(50):  # a key being written by a broker starting beside us is complete in a moment
            try:
                return load_keypair(self.secret_file), created
            except ConfigError:
                time.sleep(0.02)
        return load_keypair(self.secret_file), created

    def keys(self) -> KeyPair:
        if not self.secret_file.exists():
            raise ConfigError(
                f"no broker keys in {self.path}: start 'zlink broker --home {self.path}' once, "
                "or point --home / $ZLINK_HOME at the broker's home"
            )
        return load_keypair(self.secret_file)

    def save_endpoints(self, binds: list[str], peers: Sequence[str] = ()) -> None:
        """Record where this broker listens and the other brokers of its swarm (for ``zlink invite``)."""
        import json

        tmp = self.config_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"bind": binds, "peers": list(peers)}) + "\n")
        tmp.replace(self.config_file)

    def peers(self) -> list[str]:
        """The swarm's other brokers, as the last broker started from this home recorded them."""
        import json

        try:
            data = json.loads(self.config_file.read_text())
            return [str(x) for x in data.get("peers", [])]
        except (OSError, ValueError):
            return []

    def bound_endpoints(self) -> list[str]:
        import json

        try:
            data = json.loads(self.config_file.read_text())
            return [str(x) for x in data.get("bind", [])]
        except (OSError, ValueError):
            return []

    def allow(self, public: str, *, name: str, role: str) -> Path:
        """Authorise a public key under ``name`` with ``role``."""
        check_name(name)
        check_role(role)
        _check_z85(public, "public key")
        secure_dir(self.allowed)
        for existing in AllowedKeys(self.allowed).by_key.values():
            if existing.name == name:
                raise ConfigError(f"a key named {name!r} is already allowed; revoke it first or pick another --name")
            if existing.public == public:
                raise ConfigError(f"this key is already allowed as {existing.name!r}")
        path = self.allowed / f"{name}.key"
        write_cert(path, KeyPair(public), metadata={"name": name, "role": role})
        return path

    def revoke(self, name: str) -> list[Path]:
        gone = []
        for k in AllowedKeys(self.allowed).find_name(name):
            Path(k.path).unlink(missing_ok=True)
            gone.append(Path(k.path))
        return gone

    def invite(self, *, name: str, role: str, endpoints: list[str]) -> Join:
        """Create a key pair for a new peer, authorise it, and return its join string.

        The secret key exists only in the returned join string: it is not stored.
        """
        broker = self.keys()
        keys = generate_keypair()
        self.allow(keys.public, name=name, role=role)
        return Join(endpoints=tuple(endpoints), broker_key=broker.public, keys=keys, name=name, role=role)
