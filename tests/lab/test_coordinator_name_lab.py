"""One host name for the two coordinators of a cluster (``--coordinator NAME:PORT``), resolved by the real
system resolver in alice's namespace: ``ip netns exec`` mounts /etc/netns/<ns>/hosts over /etc/hosts (and
nsswitch.conf, "hosts: files", so no DNS query ever leaves) for the commands it runs, and glibc reads
every line of a name (``multi on``). Nothing of the root namespace changes.

The two coordinators (the cluster test's helpers: redis-server and both nodes on the lab server, by PID)
listen on one port, A on 198.51.100.10 and B on .11, without --alt-address (it would bind the port on the
other address too). Bob registers at B by address; alice's forwarder knows only the name:

* while the name lists A alone, alice registers at A and fetches bob's page (SHA-256);
* the name gains B (a DNS change), A is killed (SIGKILL): alice resolves the name again and registers at
  B through it, and fetches the page again;
* a new alice process, the name listing the dead A first, registers at B at start;
* a name that does not resolve is an error that names it.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tcppunch.lab import Lab
from tests.lab.processes import PY, random_page, stop, token_env
from tests.lab.test_cluster_lab import KEEPALIVE, TOKEN, coordinator, fetch, forwarder, redis_in, serving_bob
from tests.lab.test_cluster_lab import lab as lab  # the cluster test's fixture: pr and seq NATs

NAME = "coord.tcppunch.test"
A, B = "198.51.100.10:3478", "198.51.100.11:3478"


@contextmanager
def netns_etc(netns: str) -> Iterator[Path]:
    """/etc/netns/<netns>/ (ours: it must not exist yet) with nsswitch.conf resolving host names from the
    hosts file alone; yields the hosts file's path. Removed by name afterwards, and /etc/netns too if this
    made it and nothing else is in it."""
    parent = Path("/etc/netns")
    parent_is_ours = not parent.exists()  # removed again afterwards if we made it (and it is empty)
    folder = parent / netns
    folder.mkdir(parents=True)
    try:
        (folder / "nsswitch.conf").write_text("hosts: files\n")
        hosts = folder / "hosts"
        hosts.write_text("127.0.0.1 localhost\n")
        yield hosts
    finally:
        shutil.rmtree(folder)
        if parent_is_ours:
            with contextlib.suppress(OSError):  # another run's folder may be in it now: then it stays
                parent.rmdir()


def names(hosts: Path, *addresses: str) -> None:
    """The name's addresses, one line each. Rewritten in place: the running processes' mount is this inode."""
    with open(hosts, "r+", encoding="ascii") as out:
        out.truncate(0)
        out.write("127.0.0.1 localhost\n" + "".join(f"{a.split(':')[0]} {NAME}\n" for a in addresses))


def registered_at(text: str) -> list[str]:
    """The coordinator of each 'registered:' progress line, in order."""
    return [line.rsplit("coordinator=", 1)[1].split()[0] for line in text.splitlines()
            if "registered:" in line and "coordinator=" in line]


def test_one_name_for_two_coordinators_is_followed_across_a_failover(lab: Lab, tmp_path: Path) -> None:
    want = random_page(tmp_path, 300_000)
    alice_host, bob_host = lab.host("pr"), lab.host("seq")
    procs: list[subprocess.Popen[str]] = []
    with redis_in(lab.server) as url, netns_etc(alice_host.netns) as hosts, \
            coordinator(lab, A, None, None, url) as a, coordinator(lab, B, None, None, url):
        try:
            procs += serving_bob(bob_host, tmp_path, B)

            names(hosts, A)
            alice, alice_log = forwarder(alice_host, "alice", 9000, f"{NAME}:3478")
            procs.append(alice)
            assert f"resolved: coordinator={NAME}:3478 addresses={A}" in alice_log.text, alice_log.text
            assert registered_at(alice_log.text) == [A]
            assert fetch(alice_host, 9000) == want

            # DNS now lists both nodes; A dies without a word (alice's id stays claimed until its TTL)
            names(hosts, A, B)
            a.kill()
            a.wait(10)
            assert alice_log.wait_for_count("registered:", 2, 3 * KEEPALIVE + 5.0), alice_log.text
            assert registered_at(alice_log.text) == [A, B]
            assert f"resolved: coordinator={NAME}:3478 addresses={A},{B}" in alice_log.text
            assert fetch(alice_host, 9000) == want
            stop(alice)

            # at start: the name's first address is dead (refused), its second registers
            again, again_log = forwarder(alice_host, "alice", 9001, f"{NAME}:3478")
            procs.append(again)
            assert registered_at(again_log.text) == [B], again_log.text
            assert fetch(alice_host, 9001) == want

            unknown = alice_host.run([*PY, "connect", "bob", "--id", "dave", "--coordinator", "nosuch.tcppunch.test",
                                      "--no-detect"], env=token_env(TOKEN), timeout=30)
            assert unknown.returncode == 3  # unreachable, at once
            want_line = "tcppunch: cannot resolve the coordinator nosuch.tcppunch.test:3478"
            assert want_line in unknown.stderr, unknown.stderr
        finally:
            for proc in reversed(procs):
                stop(proc)
    assert not (Path("/etc/netns") / alice_host.netns).exists()

