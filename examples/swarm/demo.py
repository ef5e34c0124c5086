"""The swarm in the NAT lab: one seeder and N leechers, each behind its own NAT router, a coordinator
(``tcppunch server``) on the lab server, every peer a ``python -m examples.swarm peer`` process on its lab
host. Prints per peer what it got and sent, and per pair of peers whether they went direct or through the
relay; checks every leecher's file against the seeder's (SHA-256).

Synchronisation is by events only: the server's "listening on" line, each peer's JSON event lines
(ready / connected / progress / complete / stats). Every wait is bounded by ``timeout``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from examples.swarm.metainfo import create_metainfo
from tcppunch.lab import Lab, LabHost, LabSpec, LinkShape, NatType, RouterSpec, SynPolicy
from tcppunch.lab.server_process import lab_server
from tcppunch.wire.endpoint import Endpoint

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKEN = "swarm-demo"
SERVER_PORT = 3478
# Lab router names (1-8 characters) per NAT type; a peer's id is its router's name.
ROUTER_NAMES = {
    NatType.NONE: "public", NatType.FULL_CONE: "fullcone", NatType.RESTRICTED: "restrict",
    NatType.PORT_RESTRICTED: "portrest", NatType.SYMMETRIC_SEQ: "symseq", NatType.SYMMETRIC_RANDOM: "symrand",
    NatType.CGNAT: "cgnat",
}
GRACE_AFTER_COMPLETE = 15.0  # once every leecher is done: how long to wait for pairs still connecting


@dataclass
class DemoConfig:
    size: int = 20_000_000
    piece_size: int = 256 * 1024
    seeder: str = "port-restricted"
    leechers: list[str] = field(default_factory=lambda: ["full-cone", "restricted", "symmetric-seq",
                                                         "symmetric-random", "cgnat"])
    upload_rate: float | None = None
    serial_dials: bool = True
    # NAT type of a peer to SIGKILL mid-transfer: once it uploaded a piece, at its next incoming request. With
    # --upload-rate that request is still owed when the SIGKILL lands (pacing holds each piece back for
    # (piece size - 64 KiB burst) / rate), so the requester must fetch it from someone else.
    kill: str | None = None
    timeout: float = 300.0
    workdir: Path | None = None
    syn_policy: SynPolicy = SynPolicy.DROP
    delay_ms: float = 0.0  # one-way delay on every router's WAN link (a round trip between peers gains 4x)


@dataclass
class PeerResult:
    id: str
    nat: NatType
    seeder: bool
    killed: bool = False
    complete: bool = False
    sha256_ok: bool | None = None
    downloaded: int = 0
    uploaded: int = 0
    requeued: int = 0
    complete_seconds: float | None = None
    exit_code: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class PairResult:
    a: str
    b: str
    nat_a: NatType
    nat_b: NatType
    method: str | None  # "direct" | "relay" | None (never connected)
    connect_seconds: float | None
    a_to_b: int  # bytes
    b_to_a: int


@dataclass
class DemoResult:
    peers: list[PeerResult]
    pairs: list[PairResult]
    seconds: float
    file_sha256: str
    size: int
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        leechers = [p for p in self.peers if not p.seeder and not p.killed]
        return not self.errors and all(p.complete and p.sha256_ok for p in leechers)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "seconds": round(self.seconds, 3), "size": self.size, "sha256": self.file_sha256,
            "errors": self.errors,
            "peers": [{k: (v.value if isinstance(v, NatType) else v) for k, v in p.__dict__.items() if k != "stats"}
                      for p in self.peers],
            "pairs": [{k: (v.value if isinstance(v, NatType) else v) for k, v in p.__dict__.items()}
                      for p in self.pairs],
        }


class _Process:
    """A peer process and a thread turning its stdout JSON lines into events on a shared queue."""

    def __init__(self, peer_id: str, host: LabHost, argv: list[str], events: queue.Queue[dict[str, Any]],
                 stderr: IO[str]) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1", "TCPPUNCH_TOKEN": TOKEN}
        self.id = peer_id
        self.proc = host.python(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
        self.stats: dict[str, Any] | None = None
        self._thread = threading.Thread(target=self._pump, args=(events,), daemon=True)
        self._thread.start()

    def _pump(self, events: queue.Queue[dict[str, Any]]) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict):
                event.setdefault("peer", self.id)
                events.put(event)
        events.put({"peer": self.id, "event": "exited"})

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def _nat(name: str) -> NatType:
    try:
        return NatType(name)
    except ValueError:
        raise ValueError(f"unknown NAT type {name!r}; one of {', '.join(t.value for t in NatType)}") from None


def run_demo(config: DemoConfig, progress: Callable[[str], None] = lambda line: None) -> DemoResult:
    """Build the lab, run the swarm, tear everything down; the result says what happened."""
    seeder_nat = _nat(config.seeder)
    leecher_nats = [_nat(n) for n in config.leechers]
    nats = [seeder_nat, *leecher_nats]
    if len(set(nats)) != len(nats):
        raise ValueError("one peer per NAT type: the seeder's and the leechers' types must all differ")
    kill_nat = None if config.kill is None else _nat(config.kill)
    if kill_nat is not None and kill_nat not in nats:
        raise ValueError(f"--kill {config.kill}: no peer behind that NAT type")
    with contextlib.ExitStack() as stack:
        workdir = config.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="swarm-")))
        workdir.mkdir(parents=True, exist_ok=True)
        link = LinkShape(delay_ms=config.delay_ms)
        spec = LabSpec([RouterSpec(ROUTER_NAMES[t], t, config.syn_policy, link=link) for t in nats])
        progress(f"building the lab: {', '.join(f'{ROUTER_NAMES[t]} ({t.value})' for t in nats)}")
        lab = stack.enter_context(Lab(spec))
        return _run(lab, config, nats, kill_nat, workdir, progress)
    raise AssertionError("unreachable")


def _run(lab: Lab, config: DemoConfig, nats: list[NatType], kill_nat: NatType | None, workdir: Path,
         progress: Callable[[str], None]) -> DemoResult:
    started = time.monotonic()
    deadline = started + config.timeout
    ids = [ROUTER_NAMES[t] for t in nats]
    nat_of = dict(zip(ids, nats, strict=True))
    seeder = ids[0]
    coordinator = f"{lab.server.address}:{SERVER_PORT}"

    # the content: random bytes, hashed into a metainfo
    seed_dir = workdir / seeder
    seed_dir.mkdir(exist_ok=True)
    data_path = seed_dir / "random.bin"
    with data_path.open("wb") as f:
        for offset in range(0, config.size, 1 << 20):
            f.write(os.urandom(min(1 << 20, config.size - offset)))
    meta = create_metainfo(data_path, swarm="demo", piece_size=config.piece_size)
    meta_path = workdir / "random.bin.swarm.json"
    meta.save(meta_path)
    file_sha = hashlib.sha256(data_path.read_bytes()).hexdigest()
    progress(f"{config.size} random bytes, {meta.piece_count} pieces, sha256 {file_sha[:16]}…")

    log_file = (workdir / "stderr.log").open("w")
    errors: list[str] = []
    processes: dict[str, _Process] = {}
    server = contextlib.ExitStack()
    try:
        server.enter_context(lab_server(lab, TOKEN, listen=Endpoint(lab.server.address, SERVER_PORT),
                                        ready_timeout=min(20.0, deadline - time.monotonic())))
        progress(f"coordinator listening on {coordinator}")

        events: queue.Queue[dict[str, Any]] = queue.Queue()
        for peer_id, nat in zip(ids, nats, strict=True):
            argv = ["-m", "examples.swarm", "peer", str(meta_path), "--coordinator", coordinator, "--id", peer_id,
                    "--dir", str(workdir / peer_id), "--run-timeout", str(config.timeout)]
            if config.upload_rate:
                argv += ["--upload-rate", str(config.upload_rate)]
            if not config.serial_dials:
                argv.append("--parallel-dials")
            processes[peer_id] = _Process(peer_id, lab.host(ROUTER_NAMES[nat]), argv, events, log_file)

        state = _watch(events, processes, ids, seeder, kill_nat and ROUTER_NAMES[kill_nat], deadline, progress,
                       errors, workdir / "events.jsonl")
        for p in processes.values():
            if p.proc.poll() is None:
                p.proc.terminate()  # the peers' SIGTERM handler stops them cleanly; they print "stats"
        _collect_stats(events, processes, time.monotonic() + 20.0, state)
    finally:
        for p in processes.values():
            if p.proc.poll() is None:
                p.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.proc.wait(5)
        server.close()
        log_file.close()

    peers = []
    for peer_id in ids:
        proc = processes[peer_id]
        stats = proc.stats or state.last_progress.get(peer_id, {})  # a killed peer: what it last said
        path = workdir / peer_id / meta.name
        sha_ok = None
        if peer_id != seeder and peer_id not in state.killed:
            sha_ok = path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == file_sha
            if not sha_ok:
                errors.append(f"{peer_id}: file missing or differs from the seeder's")
        peers.append(PeerResult(
            peer_id, nat_of[peer_id], peer_id == seeder, killed=peer_id in state.killed,
            # its "complete" event counts even when its final stats line was lost at shutdown
            complete=bool(stats.get("complete")) or peer_id in state.complete_at, sha256_ok=sha_ok,
            downloaded=int(stats.get("downloaded", 0)),
            uploaded=int(stats.get("uploaded", 0)), requeued=int(stats.get("requeued", 0)),
            complete_seconds=state.complete_at.get(peer_id), exit_code=proc.proc.returncode, stats=stats))
    pairs = _pairs(ids, nat_of, state)
    return DemoResult(peers, pairs, time.monotonic() - started, file_sha, config.size, errors)


@dataclass
class _State:
    complete_at: dict[str, float] = field(default_factory=dict)
    connected: dict[frozenset[str], dict[str, Any]] = field(default_factory=dict)
    killed: set[str] = field(default_factory=set)
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    last_progress: dict[str, dict[str, Any]] = field(default_factory=dict)


def _watch(events: queue.Queue[dict[str, Any]], processes: dict[str, _Process], ids: list[str], seeder: str,
           kill: str | None, deadline: float, progress: Callable[[str], None], errors: list[str],
           journal: Path) -> _State:
    """Follow the peers' events until every (living) leecher completed and every pair connected — or the
    deadline, or a grace period after completion for pairs that never connect."""
    state = _State()
    all_pairs = {frozenset((a, b)) for i, a in enumerate(ids) for b in ids[i + 1:]}
    with journal.open("w") as record:
        return _follow(events, processes, ids, seeder, kill, deadline, progress, errors, state, all_pairs, record)


def _follow(events: queue.Queue[dict[str, Any]], processes: dict[str, _Process], ids: list[str], seeder: str,
            kill: str | None, deadline: float, progress: Callable[[str], None], errors: list[str], state: _State,
            all_pairs: set[frozenset[str]], record: IO[str]) -> _State:
    complete_since: float | None = None
    while True:
        now = time.monotonic()
        living = [i for i in ids if i not in state.killed]
        leechers = [i for i in living if i != seeder]
        if all(i in state.complete_at for i in leechers):
            complete_since = complete_since or now
            live_pairs = {p for p in all_pairs if not p & state.killed}
            if live_pairs <= set(state.connected) or now - complete_since > GRACE_AFTER_COMPLETE:
                return state
        if now > deadline:
            errors.append(f"timeout: not complete: {', '.join(i for i in leechers if i not in state.complete_at)}")
            return state
        try:
            event = events.get(timeout=min(1.0, max(0.01, deadline - now)))
        except queue.Empty:
            continue
        record.write(json.dumps(event) + "\n")
        peer, kind = event.get("peer", "?"), event.get("event")
        if kind == "progress":
            state.last_progress[peer] = event
        if kind == "ready":
            progress(f"{peer}: registered, public {event.get('observed')}")
        elif kind == "connected":
            remote = str(event.get("remote"))
            if event.get("dialed"):  # the dialing side reports the pair (its timings cover the whole connect)
                state.connected.setdefault(frozenset((peer, remote)), event)
                progress(f"{peer} -> {remote}: {event.get('method')} in {event.get('seconds')} s")
        elif kind == "dial_failed":
            progress(f"{peer} -> {event.get('remote')}: dial failed ({event.get('error')})")
        elif kind == "complete":
            state.complete_at[peer] = event.get("seconds", 0.0)
            progress(f"{peer}: complete in {event.get('seconds')} s")
        elif kind == "stats":
            state.stats[peer] = event
            processes[peer].stats = event
        elif kind == "disconnected":
            progress(f"{peer}: lost {event.get('remote')} ({event.get('reason')}), {event.get('requeued')} "
                     "requests to retry elsewhere")
        elif kind == "exited" and peer not in state.killed:
            code = processes[peer].proc.poll()
            errors.append(f"{peer} exited early (code {code})")
            state.killed.add(peer)  # treated as gone; its pairs no longer awaited
        # The first request the victim receives: its requester now waits on it, so the kill is sure to
        # leave a request to retry elsewhere (waiting for "after it uploaded something" raced: all its
        # requests could arrive before its first upload finished, and then none came later).
        elif kind == "request" and kill is not None and peer == kill and kill not in state.killed:
            processes[kill].proc.kill()
            state.killed.add(kill)
            progress(f"killed {kill} (SIGKILL) after {event['uploaded_pieces']} pieces uploaded, just as "
                     f"{event.get('remote')} asked it for piece {event.get('piece')}")


def _collect_stats(events: queue.Queue[dict[str, Any]], processes: dict[str, _Process], deadline: float,
                   state: _State) -> None:
    """After SIGTERM: the final "stats" event of every process still running (bounded)."""
    waiting = {i for i, p in processes.items() if i not in state.killed and p.stats is None}
    while waiting and time.monotonic() < deadline:
        try:
            event = events.get(timeout=0.5)
        except queue.Empty:
            continue
        peer = event.get("peer", "?")
        if event.get("event") == "stats":
            processes[peer].stats = event
            state.stats[peer] = event
            waiting.discard(peer)
        elif event.get("event") == "exited":
            waiting.discard(peer)


def _pairs(ids: list[str], nat_of: dict[str, NatType], state: _State) -> list[PairResult]:
    out = []
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            sa = state.stats.get(a, {}).get("pairs", {}).get(b, {})
            sb = state.stats.get(b, {}).get("pairs", {}).get(a, {})
            first = state.connected.get(frozenset((a, b)), {})
            method = first.get("method") or sa.get("method") or sb.get("method") or None
            out.append(PairResult(a, b, nat_of[a], nat_of[b], method, first.get("seconds"),
                                  int(sa.get("uploaded", 0) or sb.get("downloaded", 0)),
                                  int(sb.get("uploaded", 0) or sa.get("downloaded", 0))))
    return out


def format_table(result: DemoResult) -> str:
    mb = 1_000_000
    rows = [f"swarm demo: {result.size / mb:.1f} MB, sha256 {result.file_sha256[:16]}…, {result.seconds:.1f} s total",
            "",
            f"{'peer':<9} {'NAT':<17} {'role':<7} {'complete':<9} {'sha256':<7} {'down MB':>8} {'up MB':>8} "
            f"{'retried':>7} {'done at s':>9}"]
    for p in result.peers:
        role = "seeder" if p.seeder else "leecher"
        complete = "killed" if p.killed else ("yes" if p.complete else "NO")
        sha = "-" if p.sha256_ok is None else ("ok" if p.sha256_ok else "BAD")
        done = "-" if p.complete_seconds is None else f"{p.complete_seconds:.2f}"
        rows.append(f"{p.id:<9} {p.nat.value:<17} {role:<7} {complete:<9} {sha:<7} {p.downloaded / mb:>8.2f} "
                    f"{p.uploaded / mb:>8.2f} {p.requeued:>7} {done:>9}")
    rows += ["", f"{'pair':<19} {'NATs':<36} {'method':<7} {'connect s':>9} {'a->b MB':>8} {'b->a MB':>8}"]
    for q in result.pairs:
        secs = "-" if q.connect_seconds is None else f"{q.connect_seconds:.3f}"
        rows.append(f"{q.a + ' ~ ' + q.b:<19} {q.nat_a.value + ' ~ ' + q.nat_b.value:<36} {q.method or 'none':<7} "
                    f"{secs:>9} {q.a_to_b / mb:>8.2f} {q.b_to_a / mb:>8.2f}")
    direct = sum(1 for q in result.pairs if q.method == "direct")
    relay = sum(1 for q in result.pairs if q.method == "relay")
    rows += ["", f"pairs: {direct} direct, {relay} relay, {len(result.pairs) - direct - relay} not connected"]
    rows.append("RESULT: " + ("every leecher's file equals the seeder's" if result.ok
                              else "FAILED: " + "; ".join(result.errors)))
    return "\n".join(rows)

