"""A real Redis Cluster on this machine: three primaries, each with a replica, as processes.

``LocalCluster`` starts six ``redis-server`` processes in cluster mode, joins them with
``redis-cli --cluster create`` and waits until every node agrees the cluster is whole. It is
plain synchronous code with no test framework in it, so the tests' fixtures and a benchmark
script use the same cluster; from async code, call its waiting methods in a thread
(``asyncio.to_thread``) so the clients under test keep running meanwhile.

The roles are never remembered here: each node is asked (``ROLE``, ``CLUSTER SLOTS``) every
time, because a failover, a kill or a restart changes them behind our back, and a helper
that trusted its own notes would wait for the wrong thing.

What the node options are for: a short ``cluster-node-timeout`` so that a dead primary is
replaced within seconds; ``cluster-replica-validity-factor 0`` so that a replica may take
over however long it was cut off (otherwise a replica that missed a few pings refuses, and
a test waits for a failover that never comes); diskless sync without delay so that a
replica (or an old primary rejoining as one) is in sync at once; no persistence, as a
cluster that only lives for the tests has nothing to keep.
"""

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis import Redis
from redis.crc import key_slot
from redis.exceptions import RedisError

__all__ = ("SLOTS", "ClusterError", "ClusterNode", "LocalCluster", "missing_binaries")

SLOTS = 16384
BINARIES = ("redis-server", "redis-cli")
_HOST = "127.0.0.1"
# The cluster bus listens on the port + 10000: both must be free, and below 65536.
_PORTS = range(20000, 30000)
_POLL = 0.05


class ClusterError(RuntimeError):
    """The cluster did not get where it was asked to, in time; the message says how far."""


def missing_binaries() -> list[str]:
    """The programs this needs that are not on PATH."""
    return [name for name in BINARIES if shutil.which(name) is None]


def _port_pair_free(port: int) -> bool:
    for candidate in (port, port + 10000):
        with socket.socket() as sock:
            try:
                sock.bind((_HOST, candidate))
            except OSError:
                return False
    return True


def _free_ports(count: int) -> list[int]:
    """``count`` ports whose cluster-bus twins (+10000) are free too; never Redis's 6379."""
    ports: list[int] = []
    candidates = list(_PORTS)
    random.shuffle(candidates)
    for port in candidates:
        if port not in ports and port + 10000 not in ports and _port_pair_free(port):
            ports.append(port)
            if len(ports) == count:
                return ports
    raise ClusterError(f"no {count} free port pairs in {_PORTS}")


@dataclass(eq=False)
class ClusterNode:
    """One ``redis-server`` of the cluster: its port, its directory, its process."""

    port: int
    dir: Path
    process: "subprocess.Popen[bytes] | None" = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"{_HOST}:{self.port}"

    @property
    def url(self) -> str:
        return f"redis://{self.address}"

    @property
    def log_path(self) -> Path:
        return self.dir / "redis.log"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def argv(self, node_timeout_ms: int) -> list[str]:
        return [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            _HOST,
            "--dir",
            str(self.dir),
            "--daemonize",
            "no",
            "--logfile",
            str(self.log_path),
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(node_timeout_ms),
            "--cluster-replica-validity-factor",
            "0",
            # As docs/operations.md asks of a production cluster: a shard without a primary
            # refuses its own slots only, not the whole cluster's (CLUSTERDOWN).
            "--cluster-require-full-coverage",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--repl-diskless-sync",
            "yes",
            "--repl-diskless-sync-delay",
            "0",
        ]

    def client(self, timeout: float = 2.0) -> "Redis":
        """A plain (not cluster) client of this node alone; close it after use."""
        return Redis(host=_HOST, port=self.port, socket_timeout=timeout, socket_connect_timeout=1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class LocalCluster:
    """Six (by default) ``redis-server`` processes forming one Redis Cluster.

    ``start()`` (or ``with LocalCluster() as cluster``) returns once the cluster is whole;
    ``stop()`` kills every node and removes their directories.
    """

    def __init__(
        self,
        *,
        primaries: int = 3,
        replicas_per_primary: int = 1,
        node_timeout_ms: int = 1000,
        base_dir: Path | None = None,
        ready_timeout: float = 30.0,
    ) -> None:
        if primaries < 3:
            raise ValueError("redis-cli --cluster create wants at least three primaries")
        self._primaries = primaries
        self._replicas_per_primary = replicas_per_primary
        self.node_timeout_ms = node_timeout_ms
        self.ready_timeout = ready_timeout
        self._own_dir = base_dir is None
        self.base_dir = (
            Path(tempfile.mkdtemp(prefix="redis-cluster-")) if base_dir is None else base_dir
        )
        ports = _free_ports(primaries * (1 + replicas_per_primary))
        self.nodes = [ClusterNode(port, self.base_dir / str(port)) for port in ports]

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> "LocalCluster":
        missing = missing_binaries()
        if missing:
            raise ClusterError(
                f"{' and '.join(missing)} not on PATH: a Redis Cluster needs Redis 7"
                " (Debian: apt-get install redis-server redis-tools)"
            )
        try:
            for node in self.nodes:
                self._spawn(node)
            for node in self.nodes:
                self._wait_answering(node, self.ready_timeout)
            self._create()
            self.wait_ok(self.ready_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in self.nodes:
            self.kill(node)
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def _spawn(self, node: ClusterNode) -> None:
        node.dir.mkdir(parents=True, exist_ok=True)
        node.process = subprocess.Popen(
            node.argv(self.node_timeout_ms),
            cwd=node.dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _wait_answering(self, node: ClusterNode, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not node.alive:
                raise ClusterError(f"redis-server on {node.address} exited:\n{node.log()[-2000:]}")
            with contextlib.suppress(RedisError, OSError), self._client(node) as client:
                if client.ping():
                    return
            if time.monotonic() > deadline:
                raise ClusterError(f"redis-server on {node.address} does not answer")
            time.sleep(_POLL)

    def _create(self) -> None:
        result = subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(node.address for node in self.nodes),
                "--cluster-replicas",
                str(self._replicas_per_primary),
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=self.ready_timeout,
            check=False,
        )
        if result.returncode != 0:
            raise ClusterError(
                f"redis-cli --cluster create failed:\n{result.stdout}{result.stderr}"
            )

    # -- addresses -------------------------------------------------------------------------

    @property
    def seeds(self) -> list[tuple[str, int]]:
        """Every node's (host, port): what a cluster client may start from."""
        return [(_HOST, node.port) for node in self.nodes]

    @property
    def url(self) -> str:
        """A URL naming one primary, as ``REDIS_URL`` names a seed."""
        return self.primaries()[0].url

    def node(self, port: int) -> ClusterNode:
        for node in self.nodes:
            if node.port == port:
                return node
        raise KeyError(port)

    # -- what each node says ---------------------------------------------------------------

    @contextlib.contextmanager
    def _client(self, node: ClusterNode) -> Iterator[Redis]:
        client = node.client()
        try:
            yield client
        finally:
            client.close()

    def command(self, node: ClusterNode, *args: Any) -> Any:
        with self._client(node) as client:
            return client.execute_command(*args)

    def info(self, node: ClusterNode, section: str = "default") -> dict[str, Any]:
        with self._client(node) as client:
            info: dict[str, Any] = client.info(section)
            return info

    def cpu_seconds(self, node: ClusterNode) -> float:
        """The CPU time the node has used (system and user), from ``INFO cpu``."""
        info = self.info(node, "cpu")
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])

    def role(self, node: ClusterNode) -> tuple[str, int | None]:
        """(``master`` or ``slave``, the primary's port for a replica) as the node says."""
        reply = self.command(node, "ROLE")
        role = _text(reply[0])
        return role, (int(reply[2]) if role == "slave" else None)

    def alive(self) -> list[ClusterNode]:
        return [node for node in self.nodes if node.alive]

    def primaries(self) -> list[ClusterNode]:
        """The live nodes that serve slots now (a primary without slots is not one)."""
        owners = set(self.slot_owners().values())
        return [node for node in self.alive() if node.port in owners]

    def replicas(self) -> list[ClusterNode]:
        return [node for node in self.alive() if self.role(node)[0] == "slave"]

    def replica_of(self, primary: ClusterNode) -> ClusterNode:
        """A live replica of ``primary`` (the first, if it has several)."""
        for node in self.alive():
            if node is not primary and self.role(node) == ("slave", primary.port):
                return node
        raise ClusterError(f"{primary.address} has no live replica")

    def slot_owners(self, node: ClusterNode | None = None) -> dict[int, int]:
        """Slot-range start -> the port of its primary, as ``node`` (any live one) sees it."""
        asked = node if node is not None else self.alive()[0]
        ranges: dict[int, int] = {}
        for entry in self.command(asked, "CLUSTER", "SLOTS"):
            ranges[int(entry[0])] = int(entry[2][1])
        return ranges

    def _slot_map(self, node: ClusterNode) -> list[tuple[int, int, int]]:
        return sorted(
            (int(entry[0]), int(entry[1]), int(entry[2][1]))
            for entry in self.command(node, "CLUSTER", "SLOTS")
        )

    def primary_for_slot(self, slot: int) -> ClusterNode:
        for start, end, port in self._slot_map(self.alive()[0]):
            if start <= slot <= end:
                return self.node(port)
        raise ClusterError(f"slot {slot} is not served")

    def primary_for_key(self, key: str | bytes) -> ClusterNode:
        return self.primary_for_slot(key_slot(key.encode() if isinstance(key, str) else key))

    # -- waiting ---------------------------------------------------------------------------

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until the cluster is whole as every live node sees it.

        Every live node: ``cluster_state:ok`` with all slots assigned and ok, no live node
        flagged as failing, and the same slot map, each range served by a live primary;
        every live replica replicates a primary of that map over a link that is up, its
        first sync done; with every node up, each primary has its replicas so linked.
        """
        deadline = time.monotonic() + timeout
        why = "not asked yet"
        while time.monotonic() < deadline:
            try:
                why = self._not_ok()
            except (RedisError, OSError) as e:
                why = f"{type(e).__name__}: {e}"
            if not why:
                return
            time.sleep(_POLL)
        raise ClusterError(f"the cluster is not ok after {timeout} s: {why}")

    def _not_ok(self) -> str:
        """Why the cluster is not whole now, or '' when it is."""
        alive = self.alive()
        alive_ports = {node.port for node in alive}
        maps = {}
        for node in alive:
            info = _cluster_info(self.command(node, "CLUSTER", "INFO"))
            if info.get("cluster_state") != "ok":
                return f"{node.address}: cluster_state {info.get('cluster_state')}"
            if info.get("cluster_slots_ok") != str(SLOTS):
                return f"{node.address}: {info.get('cluster_slots_ok')} slots ok"
            maps[node.port] = self._slot_map(node)
            for line in _text(self.command(node, "CLUSTER", "NODES")).splitlines():
                address, flags = line.split()[1:3]
                port = int(address.split("@")[0].rpartition(":")[2])
                if port in alive_ports and ("fail" in flags.split(",") or "fail?" in flags):
                    return f"{node.address} still sees 127.0.0.1:{port} as failing"
        first = next(iter(maps.values()))
        for port, slot_map in maps.items():
            if slot_map != first:
                return f"127.0.0.1:{port} sees another slot map"
        if sum(end - start + 1 for start, end, _ in first) != SLOTS:
            return "the slot map does not cover every slot"
        primaries = {port for _, _, port in first}
        if not primaries <= alive_ports:
            return f"slots served by nodes that are down: {sorted(primaries - alive_ports)}"
        linked: dict[int, int] = dict.fromkeys(primaries, 0)
        for node in alive:
            role, of = self.role(node)
            if role == "master":
                continue
            replication = self.info(node, "replication")
            if of not in primaries:
                return f"{node.address} replicates {of}, which serves no slots"
            if replication.get("master_link_status") != "up" or replication.get(
                "master_sync_in_progress"
            ):
                return f"{node.address}: link to its primary {of} not up yet"
            linked[of] += 1
        for port in primaries:
            expected = self._replicas_per_primary if len(alive) == len(self.nodes) else 0
            if linked[port] < expected:
                return f"127.0.0.1:{port} has {linked[port]} linked replica(s)"
        return ""

    def _wait(self, what: str, done: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(RedisError, OSError):
                if done():
                    return
            time.sleep(_POLL)
        raise ClusterError(f"{what}: not within {timeout} s")

    # -- faults ----------------------------------------------------------------------------

    def failover(self, primary: ClusterNode, timeout: float = 30.0) -> ClusterNode:
        """``CLUSTER FAILOVER`` on ``primary``'s replica, a manual, lossless handover: the
        replica waits for everything the primary acknowledged, then takes its slots. Returns
        the new primary once the whole cluster sees it."""
        replica = self.replica_of(primary)
        self.command(replica, "CLUSTER", "FAILOVER")
        self._wait(
            f"{replica.address} taking over from {primary.address}",
            lambda: self.role(replica)[0] == "master",
            timeout,
        )
        self.wait_ok(timeout)
        return replica

    def kill(self, node: ClusterNode) -> None:
        """``kill -9``: no goodbye to the others, who find out by the node timeout."""
        process = node.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)

    def restart(self, node: ClusterNode, timeout: float = 30.0) -> None:
        """Start ``node`` again on its port and directory; it rejoins from its ``nodes.conf``
        (a primary that was replaced meanwhile comes back as its successor's replica) and
        this returns once the cluster is whole again with it."""
        self.kill(node)
        self._spawn(node)
        self._wait_answering(node, timeout)
        self.wait_ok(timeout)

    def wait_promoted(self, replica: ClusterNode, timeout: float = 30.0) -> None:
        """Until ``replica`` (of a primary that was killed) serves slots in every live
        node's map and the cluster is ok without the dead node."""
        self._wait(
            f"{replica.address} promoted",
            lambda: self.role(replica)[0] == "master" and not self._not_ok(),
            timeout,
        )

    # -- data ------------------------------------------------------------------------------

    def flushall(self) -> None:
        """``FLUSHALL`` on every primary (replicas follow): an empty cluster for the next test."""
        for node in self.primaries():
            self.command(node, "FLUSHALL")

    def logs(self, nodes: Sequence[ClusterNode] | None = None) -> str:
        """The tail of each node's log: what to print when something did not happen."""
        return "\n".join(
            f"--- {node.address}\n{node.log()[-1500:]}" for node in (nodes or self.nodes)
        )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _cluster_info(reply: Any) -> dict[str, str]:
    if isinstance(reply, dict):
        return {str(k): _text(v) for k, v in reply.items()}
    lines = _text(reply).splitlines()
    return dict(line.split(":", 1) for line in lines if ":" in line)
