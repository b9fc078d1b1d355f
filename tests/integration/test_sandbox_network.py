"""The job's network: a loopback of its own, no way out, no way to the host's services."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import pytest_twisted

from sandrun.wire import Reason

from .conftest import JobRunner

CONNECT = """
import errno, socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
s.settimeout(3)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("connected")
except OSError as e:
    print(errno.errorcode.get(e.errno, e))
"""


@pytest.fixture
def host_listener() -> Iterator[socket.socket]:
    """A TCP listener on the host's loopback, standing in for the worker's own API."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.setblocking(False)
    yield listener
    listener.close()


def _nobody_came(listener: socket.socket) -> bool:
    try:
        listener.accept()[0].close()
        return False
    except BlockingIOError:
        return True


@pytest_twisted.ensureDeferred
async def test_an_outside_address_is_unreachable(runner: JobRunner) -> None:
    ran = await runner.run(("python3", "-I", "-S", "-c", CONNECT, "1.1.1.1", "53"))
    assert ran.out == "ENETUNREACH\n", ran.describe()
    ran = await runner.run(("python3", "-I", "-S", "-c", CONNECT, "2606:4700:4700::1111", "53"))
    assert ran.out == "ENETUNREACH\n", ran.describe()


@pytest_twisted.ensureDeferred
async def test_a_udp_datagram_to_the_outside_cannot_be_sent(runner: JobRunner) -> None:
    ran = await runner.python(
        "import socket, errno\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "try:\n    s.sendto(b'x', ('8.8.8.8', 53)); print('sent')\n"
        "except OSError as e:\n    print(errno.errorcode[e.errno])\n")
    assert ran.out == "ENETUNREACH\n", ran.describe()


@pytest_twisted.ensureDeferred
async def test_the_hosts_loopback_services_are_not_reachable(
        runner: JobRunner, host_listener: socket.socket) -> None:
    port = host_listener.getsockname()[1]
    ran = await runner.run(("python3", "-I", "-S", "-c", CONNECT, "127.0.0.1", str(port)))
    assert ran.out == "ECONNREFUSED\n", ran.describe()
    assert _nobody_came(host_listener)


@pytest_twisted.ensureDeferred
async def test_a_name_cannot_be_resolved(runner: JobRunner) -> None:
    ran = await runner.python(
        "import socket\n"
        "for name in ('example.com', 'deb.debian.org', 'localhost'):\n"
        "    try:\n        print(name, socket.getaddrinfo(name, 80)[0][4][0])\n"
        "    except socket.gaierror as e:\n        print(name, 'unresolved')\n")
    # Only the sandbox's /etc/hosts answers.
    assert ran.lines()[:2] == ["example.com unresolved", "deb.debian.org unresolved"], \
        ran.describe()
    assert ran.lines()[2] in {"localhost 127.0.0.1", "localhost ::1"}


SOCKETS = """
import errno, socket
for name, family, kind, proto in (
        ("netlink", socket.AF_NETLINK, socket.SOCK_RAW, 0),
        ("packet", socket.AF_PACKET, socket.SOCK_RAW, 0),
        ("inet_raw", socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
        ("inet6_raw", socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)):
    try:
        socket.socket(family, kind, proto)
        print(name, "opened")
    except OSError as e:
        print(name, errno.errorcode[e.errno])
"""


@pytest_twisted.ensureDeferred
async def test_raw_packet_and_netlink_sockets_are_refused(runner: JobRunner) -> None:
    ran = await runner.python(SOCKETS)
    assert ran.lines() == ["netlink EPERM", "packet EPERM", "inet_raw EPERM",
                           "inet6_raw EPERM"], ran.describe()


LOOPBACK = """
import socket, threading
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(1)
def serve():
    conn, _ = server.accept()
    conn.sendall(conn.recv(100).upper())
    conn.close()
threading.Thread(target=serve).start()
client = socket.create_connection(server.getsockname(), timeout=3)
client.sendall(b"ping")
print(client.recv(100).decode())
# if_nameindex() needs netlink, which the job may not open
print(sorted(line.split(":")[0].strip() for line in open("/proc/net/dev").readlines()[2:]))
"""


@pytest_twisted.ensureDeferred
async def test_loopback_is_up_inside_and_the_only_interface(runner: JobRunner) -> None:
    ran = await runner.python(LOOPBACK)
    assert ran.reason == Reason.COMPLETED, ran.describe()
    assert ran.lines() == ["PING", "['lo']"]


@pytest_twisted.ensureDeferred
async def test_a_port_one_job_listens_on_is_not_the_next_jobs(runner: JobRunner) -> None:
    # Each job gets a fresh network namespace: a port bound by one is free for the next.
    bind = ("import socket; s = socket.socket(); "
            "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0); "
            "s.bind(('127.0.0.1', 4242)); s.listen(); print('bound')")
    assert (await runner.python(bind)).out == "bound\n"
    assert (await runner.python(bind)).out == "bound\n"
