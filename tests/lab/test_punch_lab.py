"""The punch engine between two lab hosts behind real NAT routers (no coordinator: the test derives each
side's plan from the lab's ground truth and an echo-address service on the lab server).

Also the measurements of docs/punching.md::

    .venv/bin/python -m tests.lab.test_punch_lab --runs 10 --delay-ms 5 --delay-ms 0   # low TTL on/off
    .venv/bin/python -m tests.lab.test_punch_lab --table 10                            # lab results
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tcppunch.lab import Lab, LabHost, LabSpec, LinkShape, NatType, NetnsLoop, RouterSpec, SynPolicy
from tcppunch.nat.sockets import endpoint_of
from tcppunch.punch.engine import punch
from tcppunch.punch.plan import AttemptOutcome, PunchFailed, PunchPlan, PunchResult, Role
from tcppunch.punch.prediction import build_candidates, direct_possible, retry_policy_for
from tcppunch.punch.sockets import reuse_listener, reuse_socket
from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.natreport import NatReport, TcpBehaviour

ECHO = Endpoint("198.51.100.10", 3479)
KEY = os.urandom(32)


# ---------------------------------------------------------------------------------------------- helpers


async def _echo_address_server(ready: asyncio.Event, stop: asyncio.Event) -> None:
    """Writes back the source endpoint it sees ("ip:port\\n") and closes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ip, port = writer.get_extra_info("peername")[:2]
        writer.write(f"{ip}:{port}\n".encode())
        with contextlib.suppress(OSError):
            await writer.drain()
            await reader.read(1)  # the client closes first: TIME_WAIT stays on its side
        writer.close()

    server = await asyncio.start_server(handle, ECHO.ip, ECHO.port, reuse_address=True)
    ready.set()
    async with server:
        await stop.wait()


@dataclass
class Side:
    """One lab host with its event loop and the punch port it holds."""

    host: LabHost
    loop: NetnsLoop
    listener: socket.socket | None = None
    local: Endpoint | None = None
    observed: Endpoint | None = None

    def report(self) -> NatReport:
        return truth_report(self.host.nat)


def truth_report(nat: NatType) -> NatReport:
    """The NatReport a perfect ``detect`` would write for a lab NAT type (the lab's ground truth)."""
    if nat is NatType.NONE:
        return NatReport(behind_nat=False)
    return NatReport(
        tcp=TcpBehaviour(mapping=nat.mapping, filtering=nat.filtering, port_delta=nat.port_delta),
        behind_nat=True,
    )


async def _observe(local_ip: str) -> tuple[socket.socket, Endpoint]:
    """Bind a punch port (listening), learn its public endpoint from the echo service."""
    lst = reuse_listener(Endpoint(local_ip, 0))
    port = endpoint_of(lst.getsockname()).port
    probe = reuse_socket(Endpoint(local_ip, port))
    try:
        await asyncio.get_running_loop().sock_connect(probe, (ECHO.ip, ECHO.port))
        data = b""
        async with asyncio.timeout(5):
            while not data.endswith(b"\n"):
                chunk = await asyncio.get_running_loop().sock_recv(probe, 64)
                if not chunk:
                    break
                data += chunk
    finally:
        probe.close()
    ip, _, p = data.decode().strip().rpartition(":")
    return lst, Endpoint(ip, int(p))


async def _punch_side(plan: PunchPlan, lst: socket.socket, nbytes: int) -> tuple[PunchResult | PunchFailed, str]:
    """Punch; on success send ``nbytes`` bytes, read the peer's, return (result, digest of what came)."""
    try:
        try:
            res = await punch(plan, listener=lst)
        except PunchFailed as exc:
            return exc, ""
    finally:
        lst.close()
    assert res.reader is not None and res.writer is not None
    out = hashlib.sha256(plan.session_id.encode() + plan.role.value.encode()).digest() * (nbytes // 32 + 1)
    res.writer.write(out[:nbytes])
    res.writer.write_eof()
    got = await res.reader.read()
    res.writer.close()
    with contextlib.suppress(OSError):
        await res.writer.wait_closed()
    return res, hashlib.sha256(got).hexdigest()


@dataclass
class PairOutcome:
    ok: bool
    results: tuple[PunchResult | PunchFailed, PunchResult | PunchFailed]
    digests_match: bool
    time_to_verified: float | None  # max over both sides, seconds after fire


def run_pair(
    a: Side, b: Side, *, session: str, low_ttl: bool = False, nbytes: int = 100_000, deadline: float = 6.0
) -> PairOutcome:
    """Observe both mappings, build both plans from ground truth, fire both engines at the same moment."""
    a.listener, a.observed = a.loop.run(_observe(a.host.address))
    b.listener, b.observed = b.loop.run(_observe(b.host.address))
    a.local = Endpoint(a.host.address, 0)
    b.local = Endpoint(b.host.address, 0)
    fire_at = a.loop.loop.time() + 0.3  # both loops read time.monotonic(): one clock
    plans = []
    for me, peer, role in ((a, b, Role.INITIATOR), (b, a, Role.RESPONDER)):
        assert peer.observed is not None
        layers = 2 if me.host.nat is NatType.CGNAT else 1
        plans.append(
            PunchPlan(
                local=Endpoint(me.host.address, 0),  # the engine uses the given listener's port
                role=role,
                session_id=session,
                key=KEY,
                candidates=build_candidates(
                    peer_observed=peer.observed, peer_nat=peer.report(), own_nat=me.report()
                ),
                fire_at=fire_at,
                deadline=fire_at + deadline,
                low_ttl=(layers + 1) if low_ttl else None,
                retry=retry_policy_for(me.report()),
            )
        )
    fa = a.loop.submit(_punch_side(plans[0], a.listener, nbytes))
    fb = b.loop.submit(_punch_side(plans[1], b.listener, nbytes))
    ra, da = fa.result(deadline + 15)
    rb, db = fb.result(deadline + 15)
    ok = isinstance(ra, PunchResult) and isinstance(rb, PunchResult)
    expect_a = hashlib.sha256(
        (hashlib.sha256((session + "responder").encode()).digest() * (nbytes // 32 + 1))[:nbytes]
    ).hexdigest()
    expect_b = hashlib.sha256(
        (hashlib.sha256((session + "initiator").encode()).digest() * (nbytes // 32 + 1))[:nbytes]
    ).hexdigest()
    t = None
    if isinstance(ra, PunchResult) and isinstance(rb, PunchResult):
        t = max(ra.timings.verified, rb.timings.verified)
    return PairOutcome(ok, (ra, rb), da == expect_a and db == expect_b, t)


@contextlib.contextmanager
def lab_sides(spec: LabSpec) -> Iterator[tuple[Lab, dict[str, Side]]]:
    with Lab(spec) as lab, contextlib.ExitStack() as stack:
        srv = stack.enter_context(lab.server.event_loop())
        ready, stop = asyncio.Event(), asyncio.Event()
        srv_future = srv.submit(_echo_address_server(ready, stop))
        srv.run(asyncio.wait_for(ready.wait(), 5))
        sides = {}
        for r in spec.routers:
            host = lab.host(r.name)
            sides[r.name] = Side(host, stack.enter_context(host.event_loop()))
        try:
            yield lab, sides
        finally:
            srv.loop.call_soon_threadsafe(stop.set)
            with contextlib.suppress(Exception):
                srv_future.result(5)


# ------------------------------------------------------------------------------------------------ tests

D, R = SynPolicy.DROP, SynPolicy.RST
PR, SEQ, RND, FC = NatType.PORT_RESTRICTED, NatType.SYMMETRIC_SEQ, NatType.SYMMETRIC_RANDOM, NatType.FULL_CONE
SHORT = {"pr": PR, "sq": SEQ, "rn": RND, "fc": FC, "rc": NatType.RESTRICTED, "cg": NatType.CGNAT, "pub": NatType.NONE}
# (x, y): host behind router "<x>1<policy>" punches to host behind "<y>2<policy>"
PAIRS = [
    ("pr", "pr"),
    ("sq", "pr"),
    ("sq", "sq"),
    ("rn", "fc"),
    ("rc", "rn"),
    ("cg", "cg"),
    ("cg", "sq"),
    ("pub", "rn"),
]
CASES = [(x, y, pol) for x, y in PAIRS for pol in (D, R)]
# A few ms of delay on every WAN link: against RST-answering NATs the two SYNs must cross in flight, so
# the fire-time skew between the two engines (threads of this one process, sharing a GIL: up to ~1 ms)
# must stay below the one-way delay between the NATs (2 x LINK_DELAY_MS here). Real paths have that.
LINK_DELAY_MS = 3.0
ROUTERS = [
    RouterSpec(name, SHORT[name[:-2]], SynPolicy.DROP if name[-1] == "d" else SynPolicy.RST,
               link=LinkShape(delay_ms=LINK_DELAY_MS))
    for name in sorted({f"{x}1{p.value[0]}" for x, _, p in CASES} | {f"{y}2{p.value[0]}" for _, y, p in CASES})
]


@pytest.fixture(scope="module")
def lab() -> Iterator[dict[str, Side]]:
    with lab_sides(LabSpec(ROUTERS)) as (_, sides):
        yield sides


@pytest.mark.parametrize(("x", "y", "policy"), CASES, ids=[f"{x}-{y}-{p.value}" for x, y, p in CASES])
def test_pair_punches_direct(lab: dict[str, Side], x: str, y: str, policy: SynPolicy) -> None:
    a, b = lab[f"{x}1{policy.value[0]}"], lab[f"{y}2{policy.value[0]}"]
    assert direct_possible(a.report(), b.report())
    out = run_pair(a, b, session=f"{x}-{y}-{policy.value}")
    ra, rb = out.results
    assert isinstance(ra, PunchResult), getattr(ra, "explanation", ra)
    assert isinstance(rb, PunchResult), getattr(rb, "explanation", rb)
    # one TCP connection, seen through two NATs: each side's remote is the other's public mapping
    assert ra.remote.ip == b.host.public_address and rb.remote.ip == a.host.public_address
    assert ra.local.ip == a.host.address and rb.local.ip == b.host.address
    assert out.digests_match
    for r in (ra, rb):
        assert [at.outcome for at in r.attempts].count(AttemptOutcome.SELECTED) == 1


def test_impossible_pair_fails_with_an_explanation(lab: dict[str, Side]) -> None:
    a, b = lab["rn1d"], lab["sq2d"]  # random mapping facing a sequential one: no birthday, no prediction
    assert not direct_possible(a.report(), b.report())
    out = run_pair(a, b, session="impossible", deadline=1.0)
    for r in out.results:
        assert isinstance(r, PunchFailed)
        assert "relay" in r.explanation


# ----------------------------------------------------------------------------------------- measurement
# Each engine in its own process (as in real use: no shared GIL between the two peers' fire moments).


async def _child(ip: str) -> None:
    """One side: print the observed endpoint, read the plan inputs from stdin, punch, print the outcome."""
    lst, observed = await _observe(ip)
    print(json.dumps({"observed": [observed.ip, observed.port]}), flush=True)
    cfg = json.loads(await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline))
    own, peer = NatReport.from_json(cfg["own"]), NatReport.from_json(cfg["peer"])
    plan = PunchPlan(
        local=Endpoint(ip, 0),
        role=Role(cfg["role"]),
        session_id=cfg["sid"],
        key=bytes.fromhex(cfg["key"]),
        candidates=build_candidates(peer_observed=Endpoint(*cfg["peer_observed"]), peer_nat=peer, own_nat=own),
        fire_at=cfg["fire_at"],
        deadline=cfg["fire_at"] + cfg["deadline"],
        low_ttl=cfg["low_ttl"],
        retry=retry_policy_for(own),
    )
    try:
        res = await punch(plan, listener=lst, streams=False)
        out: dict[str, object] = {"ok": True, "verified": res.timings.verified, "n": len(res.attempts)}
        res.sock.close()
    except PunchFailed as exc:
        out = {"ok": False, "n": len(exc.attempts)}
    finally:
        lst.close()
    print(json.dumps(out), flush=True)


def _one_run(a: Side, b: Side, sid: str, low: bool, deadline: float = 3.0) -> tuple[dict[str, Any], ...]:
    procs = [
        s.host.python(["-m", "tests.lab.test_punch_lab", "--child", s.host.address],
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for s in (a, b)
    ]
    try:
        observed = [json.loads(p.stdout.readline())["observed"] for p in procs]  # type: ignore[union-attr]
        fire_at = time.monotonic() + 0.3  # CLOCK_MONOTONIC is one clock for every namespace
        key = os.urandom(32).hex()
        for i, (me, peer, role) in enumerate(((a, b, "initiator"), (b, a, "responder"))):
            layers = 2 if me.host.nat is NatType.CGNAT else 1
            cfg = {"own": truth_report(me.host.nat).to_json(), "peer": truth_report(peer.host.nat).to_json(),
                   "peer_observed": observed[1 - i], "role": role, "sid": sid, "key": key,
                   "fire_at": fire_at, "deadline": deadline, "low_ttl": layers + 1 if low else None}
            procs[i].stdin.write(json.dumps(cfg) + "\n")  # type: ignore[union-attr]
            procs[i].stdin.flush()  # type: ignore[union-attr]
        return tuple(json.loads(p.stdout.readline()) for p in procs)  # type: ignore[union-attr]
    finally:
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _measure(runs: int, delay_ms: float, policy: SynPolicy, pairs: list[str]) -> None:
    link = LinkShape(delay_ms=delay_ms)
    short = {"pr": PR, "sq": SEQ, "rn": RND, "fc": FC, "cg": NatType.CGNAT}
    names = sorted({n for pair in pairs for n in pair.split("-")})
    routers = [RouterSpec(f"{n}{i}", short[n], policy, link=link) for n in names for i in (1, 2)]
    with lab_sides(LabSpec(routers)) as (_, sides):
        for pair in pairs:
            x, y = pair.split("-")
            for low in (False, True):
                oks, times, lines = 0, [], []
                for i in range(runs):
                    ra, rb = _one_run(sides[f"{x}1"], sides[f"{y}2"], f"m-{pair}-{low}-{i}", low)
                    if ra["ok"] and rb["ok"]:
                        oks += 1
                        times.append(max(ra["verified"], rb["verified"]))
                    lines.append(ra["n"] + rb["n"])
                med = f"{statistics.median(times) * 1000:.1f} ms" if times else "-"
                print(f"delay {delay_ms:g} ms  {policy.value}  {pair:6} low_ttl={low!s:5}  ok {oks}/{runs}  "
                      f"median fire->verified {med}  mean attempt-log lines {statistics.mean(lines):.0f}",
                      flush=True)


def _table(runs: int) -> None:
    """The lab-results table of docs/punching.md: every CASES row, ``runs`` times, as the tests run it."""
    with lab_sides(LabSpec(ROUTERS)) as (_, sides):
        for x, y, pol in CASES:
            a, b = sides[f"{x}1{pol.value[0]}"], sides[f"{y}2{pol.value[0]}"]
            oks, times, ways = 0, [], set()
            for i in range(runs):
                out = run_pair(a, b, session=f"t-{x}-{y}-{pol.value}-{i}")
                ra, rb = out.results
                if isinstance(ra, PunchResult) and isinstance(rb, PunchResult) and out.digests_match:
                    oks += 1
                    times.append(out.time_to_verified or 0.0)
                    kinds = [r.candidate.kind.value if r.candidate else "-" for r in (ra, rb)]
                    ways.add(f"{ra.via}/{rb.via} {'+'.join(kinds)}")
            med = f"{statistics.median(times) * 1000:.1f} ms" if times else "-"
            print(f"| {x}-{y} | {pol.value} | {oks}/{runs} | {med} | {', '.join(sorted(ways))} |", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="low-TTL measurement (see docs/punching.md)")
    parser.add_argument("--child", metavar="IP", help=argparse.SUPPRESS)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--delay-ms", type=float, action="append")
    parser.add_argument("--policy", choices=[p.value for p in SynPolicy], default="rst")
    parser.add_argument("--pairs", default="pr-pr,sq-pr,sq-sq,rn-fc")
    parser.add_argument("--table", type=int, metavar="RUNS", help="print the lab-results table instead")
    args = parser.parse_args()
    import logging

    import structlog

    # a script entry point may configure logging: attempt logs at debug would cost time in the engine
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    if args.child:
        asyncio.run(_child(args.child))
    elif args.table:
        _table(args.table)
    else:
        for d in args.delay_ms or [0.0]:
            _measure(args.runs, d, SynPolicy(args.policy), args.pairs.split(","))
