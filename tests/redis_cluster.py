"""Start a throwaway local Redis Cluster for tests, and stop it without leaving anything behind.

Usage::

    if not cluster_binaries_available():
        pytest.skip("redis-server and redis-cli are needed for a Redis Cluster")
    cluster = start_cluster(3, 1, base_dir=tmp_path)
    try:
        client = redis.asyncio.RedisCluster(host="127.0.0.1", port=cluster.port)
        ...
        cluster.pause(cluster.primaries[0])  # SIGSTOP; resume() sends SIGCONT
    finally:
        cluster.stop()

or ``with redis_cluster(3, 0) as cluster: ...``.

With ``tls=True`` every node listens with TLS only (its plain port is 0), on a
server certificate for ``127.0.0.1`` signed by a self-signed CA made for the
cluster (``openssl`` must be on ``PATH`` too); the cluster bus and replication
use TLS as well. ``cluster.ca_path`` is the CA's file and ``cluster.url`` a
``rediss+cluster://`` URL naming it. The harness's own commands (:func:`command`)
speak TLS to those ports: launching a TLS node records its port's client
``ssl.SSLContext`` in ``_TLS_CONTEXTS`` (until :meth:`Cluster.stop`).

Every node is a ``redis-server`` on a free loopback port (its cluster bus port,
port + 10000, is free too) that stores nothing on disk, in a directory of its
own under one temporary directory that :meth:`Cluster.stop` removes. The
cluster is returned once every node answers ``PING``, reports
``cluster_state:ok`` and agrees with every other node on the owner of each of
the 16384 slots (and every replica's link to its primary is up).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

__all__ = [
    "SLOTS",
    "Cluster",
    "ClusterError",
    "ClusterNode",
    "TlsFiles",
    "cluster_binaries_available",
    "key_slot",
    "make_tls_files",
    "redis_cluster",
    "start_cluster",
]

#: Hash slots of a Redis Cluster.
SLOTS = 16384
#: The cluster bus port of a node is its port plus this.
BUS_OFFSET = 10000
_HOST = "127.0.0.1"
_POLL = 0.02
_LOG_TAIL = 40


class ClusterError(RuntimeError):
    """A node did not start, or the cluster did not form (or settle) in time."""


def cluster_binaries_available(tls: bool = False) -> bool:
    """Whether ``redis-server`` and ``redis-cli`` (needed to form a cluster) are on ``PATH``,
    and with ``tls`` also ``openssl`` (to make the certificates)."""
    needed = ("redis-server", "redis-cli", "openssl") if tls else ("redis-server", "redis-cli")
    return all(shutil.which(name) is not None for name in needed)


# ---------------------------------------------------------------- TLS certificates

_OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
"""


@dataclass(eq=False)
class TlsFiles:
    """A self-signed CA and a server certificate it signed for ``127.0.0.1`` (also usable
    as a client certificate), as PEM files in ``directory``; see :func:`make_tls_files`."""

    directory: Path
    _context: ssl.SSLContext | None = field(default=None, repr=False)

    @property
    def ca_path(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def cert_path(self) -> Path:
        return self.directory / "cert.pem"

    @property
    def key_path(self) -> Path:
        return self.directory / "key.pem"

    def client_context(self) -> ssl.SSLContext:
        """A client context trusting this CA only (made once; hostnames are checked)."""
        if self._context is None:
            self._context = ssl.create_default_context(cafile=str(self.ca_path))
        return self._context


def _openssl(directory: Path, *args: str) -> None:
    done = subprocess.run(
        ["openssl", *args],
        cwd=directory,
        capture_output=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if done.returncode != 0:
        output = (done.stdout + done.stderr).decode(errors="replace")
        raise ClusterError(f"openssl {' '.join(args[:2])} failed ({done.returncode}):\n{output}")


def make_tls_files(directory: str | os.PathLike[str], name: str = "tagcache test CA") -> TlsFiles:
    """Make a new self-signed CA (common name ``name``) and a server certificate for
    ``127.0.0.1`` (subjectAltName ``IP:127.0.0.1``) it signs, in ``directory`` (created),
    with the ``openssl`` command. Keys are P-256, certificates valid for two days."""
    where = Path(directory)
    where.mkdir(parents=True, exist_ok=True)
    (where / "openssl.cnf").write_text(_OPENSSL_CONFIG)
    newkey = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        where,
        "req",
        "-x509",
        "-new",
        "-config",
        "openssl.cnf",
        "-extensions",
        "ca",
        *newkey,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
    )
    _openssl(
        where,
        "req",
        "-new",
        "-config",
        "openssl.cnf",
        *newkey,
        "-keyout",
        "key.pem",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    )
    _openssl(
        where,
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-set_serial",
        f"0x{secrets.token_hex(16)}",
        "-days",
        "2",
        "-extfile",
        "openssl.cnf",
        "-extensions",
        "server",
        "-out",
        "cert.pem",
    )
    return TlsFiles(where)


# ---------------------------------------------------------------- slots


def _crc16(data: bytes) -> int:
    """CRC16/XMODEM, the checksum of Redis Cluster's key hashing."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def key_slot(key: str | bytes) -> int:
    """The hash slot of ``key``: of its hash tag (``{...}``, non-empty) when it has one."""
    raw = key.encode() if isinstance(key, str) else key
    start = raw.find(b"{")
    if start >= 0:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    return _crc16(raw) % SLOTS


# ---------------------------------------------------------------- a minimal RESP client


class _ErrorReply(Exception):
    """An error reply of a node."""


def _read_line(buf: bytearray, sock: socket.socket) -> bytes:
    while b"\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed by the node")
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\r\n")
    buf[:] = rest
    return line


def _read_exact(buf: bytearray, sock: socket.socket, n: int) -> bytes:
    while len(buf) < n + 2:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed by the node")
        buf += chunk
    data = bytes(buf[:n])
    buf[:] = buf[n + 2 :]
    return data


def _read_reply(buf: bytearray, sock: socket.socket) -> object:
    line = _read_line(buf, sock)
    kind, rest = line[:1], line[1:]
    if kind == b"+":
        return rest
    if kind == b"-":
        raise _ErrorReply(rest.decode(errors="replace"))
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        return None if n < 0 else _read_exact(buf, sock, n)
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_read_reply(buf, sock) for _ in range(n)]
    raise ConnectionError(f"unexpected reply {line[:80]!r}")


#: Port -> client TLS context, for the ports of the TLS nodes launched (and not stopped):
#: :func:`command` speaks TLS to those.
_TLS_CONTEXTS: dict[int, ssl.SSLContext] = {}


def command(port: int, *args: str, timeout: float = 2.0) -> object:
    """Send one command to the node on ``port`` over a new connection (TLS for the port of
    a TLS node); return its reply (bytes, int, None or a list). An error reply raises
    :class:`ClusterError`."""
    packed = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(a.encode()), a.encode()) for a in args)
    context = _TLS_CONTEXTS.get(port)
    sock = socket.create_connection((_HOST, port), timeout=timeout)
    try:
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname=_HOST)
        sock.sendall(packed)
        try:
            return _read_reply(bytearray(), sock)
        except _ErrorReply as exc:
            raise ClusterError(f"{' '.join(args)} on port {port}: {exc}") from None
    finally:
        sock.close()


def _text(port: int, *args: str) -> str:
    reply = command(port, *args)
    if not isinstance(reply, bytes):
        raise ClusterError(f"{' '.join(args)} on port {port} replied {reply!r}")
    return reply.decode(errors="replace")


def _fields(text: str) -> dict[str, str]:
    """The ``name:value`` lines of an ``INFO`` or ``CLUSTER INFO`` reply."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and not line.startswith("#"):
            out[name.strip()] = value.strip()
    return out


def _answers_ping(port: int) -> bool:
    try:
        return command(port, "PING", timeout=0.5) == b"PONG"
    except (OSError, ClusterError):
        return False


# ---------------------------------------------------------------- ports


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((_HOST, port))
        except OSError:
            return False
    return True


def _free_ports(count: int, avoid: set[int]) -> list[int]:
    """``count`` distinct free loopback ports (from the kernel: bind port 0) whose cluster
    bus port (port + 10000) is free too, none in ``avoid`` nor any one's bus port."""
    chosen: list[int] = []
    taken = set(avoid) | {p + BUS_OFFSET for p in avoid}
    for _ in range(count * 200):
        if len(chosen) == count:
            break
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((_HOST, 0))
            port = int(sock.getsockname()[1])
        bus = port + BUS_OFFSET
        if bus > 65535 or port in taken or bus in taken or not _port_free(bus):
            continue
        chosen.append(port)
        taken.update((port, bus))
    if len(chosen) < count:
        raise ClusterError(f"could not find {count} free ports with free cluster bus ports")
    return chosen


# ---------------------------------------------------------------- nodes and the cluster


def _tail(path: Path, lines: int = _LOG_TAIL) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


@dataclass(eq=False)
class ClusterNode:
    """One ``redis-server`` of a :class:`Cluster`.

    ``role`` is ``"primary"`` or ``"replica"`` as of the last
    :meth:`Cluster.refresh` (done when the cluster formed); ``node_id`` is its
    cluster node ID; ``primary_id`` the ID of its primary when a replica.
    """

    port: int
    workdir: Path
    #: The certificates of a TLS node (it listens with TLS only), else ``None``.
    tls: TlsFiles | None = None
    proc: subprocess.Popen[bytes] | None = None
    role: str = "unknown"
    node_id: str = ""
    primary_id: str | None = None
    slots: list[tuple[int, int]] = field(default_factory=list)
    paused: bool = False

    @property
    def pid(self) -> int | None:
        """The process ID, or ``None`` once the node is killed."""
        return self.proc.pid if self.proc is not None else None

    @property
    def bus_port(self) -> int:
        return self.port + BUS_OFFSET

    @property
    def address(self) -> tuple[str, int]:
        return (_HOST, self.port)

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = _LOG_TAIL) -> str:
        """The last lines of the node's log and of what it wrote to stdout/stderr."""
        out = _tail(self.log_path, lines)
        early = _tail(self.workdir / "stdout.log", lines)
        return out if early in ("(empty log)", "(no log)") else f"{out}\n--- stdout/stderr ---\n{early}"

    def apply(self, entry: _NodesEntry) -> None:
        """Take ID, role, primary and slots from a ``CLUSTER NODES`` line about this node."""
        self.node_id = entry.node_id
        self.role = "primary" if "master" in entry.flags else "replica"
        self.primary_id = entry.primary_id
        self.slots = entry.slots

    def __repr__(self) -> str:
        state = "paused" if self.paused else ("alive" if self.alive else "dead")
        return f"ClusterNode(port={self.port}, pid={self.pid}, role={self.role}, {state})"


class Cluster:
    """A running local Redis Cluster (see :func:`start_cluster`); :meth:`stop` ends it."""

    def __init__(
        self, root: Path, nodes: list[ClusterNode], replicas_per_primary: int, tls: TlsFiles | None = None
    ) -> None:
        self.root = root
        self.nodes = nodes
        self.replicas_per_primary = replicas_per_primary
        self.tls = tls
        self.stopped = False

    # -- addresses ---------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port of the first node (enough for a cluster client to discover the rest)."""
        return self.nodes[0].port

    @property
    def ca_path(self) -> Path | None:
        """The PEM file of the CA that signed a TLS cluster's certificate (``None`` without TLS)."""
        return self.tls.ca_path if self.tls is not None else None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port of the first node>``; for a TLS cluster
        ``rediss+cluster://127.0.0.1:<port>/?ssl_ca_certs=<CA file>``."""
        if self.tls is not None:
            return (
                f"rediss+cluster://{_HOST}:{self.port}/?ssl_ca_certs={quote(str(self.tls.ca_path), safe='/')}"
            )
        return f"redis://{_HOST}:{self.port}"

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """``(host, port)`` of every node. For ``RedisCluster(startup_nodes=...)``, wrap
        each in ``redis.asyncio.cluster.ClusterNode(host, port)``."""
        return [node.address for node in self.nodes]

    @property
    def primaries(self) -> list[ClusterNode]:
        """The nodes that were primaries at the last :meth:`refresh`."""
        return [node for node in self.nodes if node.role == "primary"]

    @property
    def replicas(self) -> list[ClusterNode]:
        """The nodes that were replicas at the last :meth:`refresh`."""
        return [node for node in self.nodes if node.role == "replica"]

    def node_for_slot(self, slot: int) -> ClusterNode:
        """The primary serving ``slot`` (as of the last :meth:`refresh`)."""
        for node in self.primaries:
            if any(lo <= slot <= hi for lo, hi in node.slots):
                return node
        raise ClusterError(f"no primary serves slot {slot}")

    def node_for_key(self, key: str | bytes) -> ClusterNode:
        """The primary serving ``key``'s slot (as of the last :meth:`refresh`)."""
        return self.node_for_slot(key_slot(key))

    # -- faults ------------------------------------------------------------------

    def pause(self, node: ClusterNode) -> None:
        """Freeze ``node`` (SIGSTOP): it keeps its connections but answers nothing."""
        if node.proc is None:
            raise ClusterError(f"{node!r} is not running")
        node.proc.send_signal(signal.SIGSTOP)
        node.paused = True

    def resume(self, node: ClusterNode) -> None:
        """Unfreeze a paused ``node`` (SIGCONT)."""
        if node.proc is None:
            raise ClusterError(f"{node!r} is not running")
        node.proc.send_signal(signal.SIGCONT)
        node.paused = False

    def kill(self, node: ClusterNode) -> None:
        """Kill ``node`` at once (SIGKILL); nothing is saved. Its port stays reserved."""
        proc = node.proc
        if proc is None:
            return
        if node.paused:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
            node.paused = False
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):  # SIGKILL waits for nothing
            proc.wait(timeout=10)
        node.proc = None

    # -- state -------------------------------------------------------------------

    def refresh(self) -> None:
        """Read each live, unpaused node's ``CLUSTER NODES`` view of itself (its ID, role and
        slots); a paused or dead node's role and slots are taken from another node's view."""
        others: dict[str, _NodesEntry] = {}
        for node in self.nodes:
            if not node.alive or node.paused:
                continue
            entries = _parse_nodes(_text(node.port, "CLUSTER", "NODES"))
            if not others:
                others = {entry.node_id: entry for entry in entries}
            for entry in entries:
                if "myself" in entry.flags:
                    node.apply(entry)
        for node in self.nodes:
            if (not node.alive or node.paused) and node.node_id in others:
                node.apply(others[node.node_id])

    def wait_until_ok(self, timeout: float = 30.0) -> None:
        """Wait until every live, unpaused node reports ``cluster_state:ok``, all agree on
        which node serves each of the 16384 slots, every slot is served by a live,
        unpaused primary (so after :meth:`pause` or :meth:`kill` of a primary this
        waits for its replica to take over), and every replica's link is up.

        :raises ClusterError: at the deadline, saying what was still wrong.
        """
        deadline = time.monotonic() + timeout
        problem = "not checked"
        while True:
            problem = self._settle_problem()
            if not problem:
                self.refresh()
                return
            if time.monotonic() >= deadline:
                raise ClusterError(f"the cluster did not settle in {timeout:.0f}s: {problem}")
            time.sleep(_POLL * 5)

    def _settle_problem(self) -> str:
        """What keeps the cluster from being settled, or ``""``."""
        views: dict[int, list[tuple[int, int, str]]] = {}
        live = [node for node in self.nodes if node.alive and not node.paused]
        # IDs are known from the first refresh on (when the cluster formed); before
        # it nothing is paused or dead.
        live_ids = {node.node_id for node in live} if all(n.node_id for n in self.nodes) else None
        for node in live:
            try:
                info = _fields(_text(node.port, "CLUSTER", "INFO"))
                if info.get("cluster_state") != "ok":
                    return f"port {node.port}: cluster_state:{info.get('cluster_state')}"
                entries = _parse_nodes(_text(node.port, "CLUSTER", "NODES"))
                me = next((e for e in entries if "myself" in e.flags), None)
                if me is not None and "master" not in me.flags:
                    repl = _fields(_text(node.port, "INFO", "replication"))
                    if repl.get("master_link_status") != "up":
                        return f"port {node.port}: replica link {repl.get('master_link_status')}"
            except (OSError, ClusterError) as exc:
                return f"port {node.port}: {exc}"
            if len(entries) != len(self.nodes) or any(e.handshake for e in entries):
                return f"port {node.port} knows {len(entries)} of {len(self.nodes)} nodes"
            ranges = sorted(
                (lo, hi, e.node_id)
                for e in entries
                if "master" in e.flags and "fail" not in e.flags
                for lo, hi in e.slots
            )
            covered = sum(hi - lo + 1 for lo, hi, _ in ranges)
            if covered != SLOTS:
                return f"port {node.port} sees {covered} of {SLOTS} slots served"
            gone = {owner for _, _, owner in ranges} - live_ids if live_ids is not None else set()
            if gone:
                return f"port {node.port} sees slots served by a paused or dead node ({sorted(gone)})"
            views[node.port] = ranges
        distinct = {tuple(v) for v in views.values()}
        if len(distinct) > 1:
            return "the nodes disagree on the slot owners"
        return ""

    # -- the end -----------------------------------------------------------------

    def stop(self) -> None:
        """Kill every node (paused ones included) and remove the cluster's directory.

        Safe to call twice, and after a failed start; every node is killed even if
        killing another one fails.
        """
        errors: list[BaseException] = []
        for node in self.nodes:
            try:
                self.kill(node)
            except BaseException as exc:  # keep killing the others
                errors.append(exc)
            if node.tls is not None:
                _TLS_CONTEXTS.pop(node.port, None)
        shutil.rmtree(self.root, ignore_errors=True)
        self.stopped = True
        if errors:
            raise errors[0]

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Cluster({self.url}, nodes={self.nodes!r})"


@dataclass
class _NodesEntry:
    node_id: str
    port: int
    flags: set[str]
    primary_id: str | None
    slots: list[tuple[int, int]]

    @property
    def handshake(self) -> bool:
        return "handshake" in self.flags or "noaddr" in self.flags


def _parse_nodes(text: str) -> list[_NodesEntry]:
    """The lines of a ``CLUSTER NODES`` reply (slots being imported or migrated are ignored)."""
    entries = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        address = parts[1].split("@")[0]
        port = int(address.rsplit(":", 1)[1] or 0)
        slots: list[tuple[int, int]] = []
        for item in parts[8:]:
            if item.startswith("["):
                continue
            lo, _, hi = item.partition("-")
            slots.append((int(lo), int(hi or lo)))
        primary = parts[3] if parts[3] != "-" else None
        entries.append(_NodesEntry(parts[0], port, set(parts[2].split(",")), primary, slots))
    return entries


def _launch(node: ClusterNode, node_timeout_ms: int) -> None:
    node.workdir.mkdir(parents=True, exist_ok=True)
    for stale in ("nodes.conf", "redis.log", "stdout.log"):
        with contextlib.suppress(FileNotFoundError):
            (node.workdir / stale).unlink()
    if node.tls is None:
        listen = ["--port", str(node.port)]
    else:  # TLS only: the plain port is off; the cluster bus and replication use TLS too
        listen = [
            "--port",
            "0",
            "--tls-port",
            str(node.port),
            "--tls-cert-file",
            str(node.tls.cert_path),
            "--tls-key-file",
            str(node.tls.key_path),
            "--tls-ca-cert-file",
            str(node.tls.ca_path),
            "--tls-auth-clients",
            "no",
            "--tls-cluster",
            "yes",
            "--tls-replication",
            "yes",
        ]
        _TLS_CONTEXTS[node.port] = node.tls.client_context()
    args = [
        "redis-server",
        *listen,
        "--bind",
        _HOST,
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        str(node.workdir / "nodes.conf"),
        "--cluster-node-timeout",
        str(node_timeout_ms),
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(node.workdir),
        "--logfile",
        str(node.log_path),
        "--daemonize",
        "no",
        # A replica's first full sync starts at once (Redis 7 waits 5 s for more replicas).
        "--repl-diskless-sync-delay",
        "0",
    ]
    with open(node.workdir / "stdout.log", "wb") as out:
        node.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _wait_for(check: Callable[[], bool], until: float) -> bool:
    """Poll ``check`` until it holds (``True``) or the ``time.monotonic()`` deadline ``until``."""
    while True:
        if check():
            return True
        if time.monotonic() >= until:
            return False
        time.sleep(_POLL)


def _wait_up(node: ClusterNode, until: float) -> bool:
    """Wait until ``node`` answers PING (``True``) or exits or the deadline passes (``False``)."""
    proc = node.proc
    if proc is None:
        return False
    _wait_for(lambda: proc.poll() is not None or _answers_ping(node.port), until)
    return proc.poll() is None and _answers_ping(node.port)


def _start_node(node: ClusterNode, node_timeout_ms: int, timeout: float, avoid: set[int]) -> None:
    """Start ``node`` and wait until it answers PING. A port taken meanwhile (by another
    program) is replaced by a fresh one, a few times; any other failure raises."""
    for attempt in range(5):
        _launch(node, node_timeout_ms)
        if _wait_up(node, time.monotonic() + timeout):
            return
        proc = node.proc
        assert proc is not None
        tail = node.log_tail()
        exited = proc.poll()
        if exited is None:
            proc.kill()
        proc.wait()
        node.proc = None
        if "Address already in use" in tail and attempt < 4:
            _TLS_CONTEXTS.pop(node.port, None)
            node.port = _free_ports(1, avoid)[0]
            continue
        what = f"exited with status {exited}" if exited is not None else f"did not answer PING in {timeout}s"
        raise ClusterError(
            f"redis-server on port {node.port} {what}; the end of its log ({node.workdir}):\n{tail}"
        )


def start_cluster(
    primaries: int = 3,
    replicas_per_primary: int = 0,
    *,
    base_dir: str | os.PathLike[str] | None = None,
    node_timeout_ms: int = 2000,
    timeout: float = 30.0,
    tls: bool = False,
) -> Cluster:
    """Start ``primaries`` primaries with ``replicas_per_primary`` replicas each on free
    loopback ports, form a cluster of them and wait until it is settled (see
    :meth:`Cluster.wait_until_ok`).

    :param base_dir: where the cluster's temporary directory is made (the system's
        temporary directory by default); :meth:`Cluster.stop` removes it.
    :param node_timeout_ms: ``cluster-node-timeout`` (how soon a silent node is
        failed over).
    :param timeout: seconds each step (a node's start, forming, settling) may take.
    :param tls: every node listens with TLS only, with a certificate signed by a new
        self-signed CA (``cluster.ca_path``); needs ``openssl``. See the module docs.
    :raises ClusterError: when a node does not start (with the end of its log) or the
        cluster does not form; every process started is killed first.
    """
    if primaries < 3:
        raise ValueError(f"a Redis Cluster needs at least 3 primaries, got {primaries}")
    if replicas_per_primary < 0:
        raise ValueError(f"replicas_per_primary must be >= 0, got {replicas_per_primary}")
    if not cluster_binaries_available(tls):
        needed = "redis-server, redis-cli and openssl" if tls else "redis-server and redis-cli"
        raise ClusterError(f"{needed} must be on PATH to start a Redis Cluster")
    root = Path(tempfile.mkdtemp(prefix="tagcache-cluster-", dir=base_dir))
    count = primaries * (1 + replicas_per_primary)
    try:
        files = make_tls_files(root / "tls") if tls else None
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    ports = _free_ports(count, set())
    nodes = [ClusterNode(port=port, workdir=root / f"node-{i}", tls=files) for i, port in enumerate(ports)]
    cluster = Cluster(root, nodes, replicas_per_primary, files)
    try:
        for node in nodes:
            _launch(node, node_timeout_ms)
        # All started at once; then wait for each (restarting any whose port was taken).
        until = time.monotonic() + timeout
        for node in nodes:
            if not _wait_up(node, until):
                proc = node.proc
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()
                _start_node(node, node_timeout_ms, timeout, {n.port for n in nodes})
        tls_args = ["--tls", "--cacert", str(files.ca_path)] if files is not None else []
        create = subprocess.run(
            [
                "redis-cli",
                *tls_args,
                "--cluster",
                "create",
                *[f"{_HOST}:{node.port}" for node in nodes],
                "--cluster-replicas",
                str(replicas_per_primary),
                "--cluster-yes",
            ],
            capture_output=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if create.returncode != 0:
            output = (create.stdout + create.stderr).decode(errors="replace")
            raise ClusterError(f"redis-cli --cluster create failed ({create.returncode}):\n{output}")
        cluster.wait_until_ok(timeout)
        if len(cluster.primaries) != primaries:
            raise ClusterError(f"expected {primaries} primaries, got {cluster.nodes!r}")
    except BaseException:
        cluster.stop()
        raise
    return cluster


@contextlib.contextmanager
def redis_cluster(
    primaries: int = 3,
    replicas_per_primary: int = 0,
    *,
    base_dir: str | os.PathLike[str] | None = None,
    node_timeout_ms: int = 2000,
    timeout: float = 30.0,
    tls: bool = False,
) -> Iterator[Cluster]:
    """:func:`start_cluster` as a context manager: the cluster is stopped on exit."""
    cluster = start_cluster(
        primaries,
        replicas_per_primary,
        base_dir=base_dir,
        node_timeout_ms=node_timeout_ms,
        timeout=timeout,
        tls=tls,
    )
    try:
        yield cluster
    finally:
        cluster.stop()
