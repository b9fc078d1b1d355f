"""Connection caps, the header deadline, the upload budget and body routes, in memory."""

from __future__ import annotations

import json
import resource
from typing import Any

import pytest
from klein import Klein
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource

from sandrun.connections import (
    BodyRoutes,
    ConnectionCaps,
    GuardedChannel,
    UploadBudget,
    guard_site,
)
from sandrun.daemon import ConnectionPolicy, connection_cap, raise_open_files_limit
from sandrun.httpjson import RawBodyRequest


def address(host: str, port: int = 40000) -> IPv4Address:
    return IPv4Address("TCP", host, port)


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"hello"

    def render_POST(self, request: Any) -> bytes:
        return b"got %d" % len(request.content.read())


def site() -> server.Site:
    s = server.Site(Hello())
    s.protocol = GuardedChannel  # type: ignore[assignment]
    return s


def connect(factory: Any, host: str, clock: Clock | None = None) -> tuple[Any, StringTransport]:
    protocol = factory.buildProtocol(address(host))
    transport = StringTransport(peerAddress=address(host))
    if clock is not None:
        protocol.callLater = clock.callLater
    protocol.makeConnection(transport)
    return protocol, transport


def capped(max_total: int, max_per_ip: int, exempt: tuple[str, ...] = ()) -> tuple[
        server.Site, ConnectionCaps]:
    s = site()
    policy = ConnectionPolicy(max_connections=max_total, max_connections_per_ip=max_per_ip,
                              exempt=exempt)
    return s, guard_site(s, policy, reserve=0)


def answer(transport: StringTransport) -> tuple[int, dict[str, Any]]:
    head, _, body = transport.value().partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


def test_a_connection_past_the_per_address_cap_is_answered_429_and_closed() -> None:
    s, caps = capped(100, 2)
    connect(s, "10.0.0.1")
    connect(s, "10.0.0.1")
    _, refused = connect(s, "10.0.0.1")
    status, body = answer(refused)
    assert status == 429 and body["error"] == "Too many connections"
    assert b"Retry-After: 1" in refused.value()
    assert refused.disconnecting
    _, other = connect(s, "10.0.0.2")  # another address is served
    assert other.value() == b"" and not other.disconnecting
    assert caps.per_ip == {"10.0.0.1": 2, "10.0.0.2": 1} and caps.total == 3


def test_a_closed_connection_frees_its_place() -> None:
    s, caps = capped(100, 1)
    first, _ = connect(s, "10.0.0.1")
    first.connectionLost(None)
    assert caps.total == 0 and caps.per_ip == {}
    _, again = connect(s, "10.0.0.1")
    assert again.value() == b""


def test_a_connection_taken_over_by_another_protocol_is_freed_when_its_transport_goes() -> None:
    """A WebSocket upgrade hands the transport to another protocol: the channel never hears
    of the end, the transport does."""
    s, caps = capped(100, 1)
    _, transport = connect(s, "10.0.0.1")
    transport.disconnected = True  # type: ignore[attr-defined]
    _, again = connect(s, "10.0.0.1")
    assert again.value() == b""
    assert caps.total == 1


def test_past_the_global_cap_everyone_gets_503() -> None:
    s, caps = capped(2, 10)
    connect(s, "10.0.0.1")
    connect(s, "10.0.0.2")
    _, refused = connect(s, "10.0.0.3")
    assert answer(refused)[0] == 503
    assert caps.refused == 1


def test_an_exempt_address_has_no_per_address_cap_but_the_global_one_holds() -> None:
    s, _ = capped(3, 1, ("10.1.0.0/16",))
    for _ in range(3):
        assert connect(s, "10.1.2.3")[1].value() == b""
    assert answer(connect(s, "10.1.2.3")[1])[0] == 503


def test_ipv6_clients_are_capped_by_their_64() -> None:
    s, _ = capped(10, 1)
    protocol = s.buildProtocol(IPv6Address("TCP", "2001:db8::1", 1))
    protocol.makeConnection(StringTransport())
    refused = s.buildProtocol(IPv6Address("TCP", "2001:db8::2", 1))
    transport = StringTransport()
    refused.makeConnection(transport)
    assert answer(transport)[0] == 429


def test_headers_not_complete_within_the_deadline_get_408_and_the_connection_closes() -> None:
    clock = Clock()
    s = site()
    s.protocol = type("C", (GuardedChannel,), {"header_timeout": 5.0})  # type: ignore[assignment]
    channel, transport = connect(s, "10.0.0.1", clock)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and then nothing more
    clock.advance(4.9)
    assert transport.value() == b""
    clock.advance(0.2)
    status, body = answer(transport)
    assert status == 408 and "5 s" in body["details"]
    assert transport.disconnecting


def test_a_kept_alive_connection_may_rest_and_its_next_request_has_the_deadline() -> None:
    clock = Clock()
    channel, transport = connect(site(), "10.0.0.1", clock)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"hello" in transport.value()
    transport.clear()
    clock.advance(GuardedChannel.header_timeout * 3)  # resting: the idle timeout's business
    assert transport.value() == b"" and not transport.disconnecting
    channel.dataReceived(b"GET / HTTP/1.1\r\n")  # a request begins, and dawdles
    clock.advance(GuardedChannel.header_timeout + 0.1)
    assert answer(transport)[0] == 408


def test_headers_that_complete_just_in_time_are_served() -> None:
    clock = Clock()
    channel, transport = connect(site(), "10.0.0.1", clock)
    channel.dataReceived(b"GET / HTTP/1.1\r\n")
    clock.advance(GuardedChannel.header_timeout - 0.1)
    channel.dataReceived(b"Host: x\r\n\r\n")
    clock.advance(1)
    assert b"hello" in transport.value() and b"408" not in transport.value()
    assert not transport.disconnecting


def rated(rate: float = 100.0, grace: float = 5.0) -> server.Site:
    s = site()
    s.protocol = type("C", (GuardedChannel,),  # type: ignore[assignment]
                      {"min_body_rate": rate, "body_grace": grace})
    return s


def post_head(length: int) -> bytes:
    return b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % length


def test_a_body_trickled_below_the_least_rate_gets_408_after_its_grace() -> None:
    clock = Clock()
    channel, transport = connect(rated(rate=100.0, grace=5.0), "10.0.0.1", clock)
    channel.dataReceived(post_head(10_000))
    for _ in range(5):  # the grace: nothing is counted yet
        channel.dataReceived(b"x")
        clock.advance(1)
    assert transport.value() == b""
    for _ in range(3):  # 1 byte a second where 100 are due
        channel.dataReceived(b"x")
        clock.advance(1)
    status, body = answer(transport)
    assert status == 408 and body["error"] == "Request timeout"
    assert "100 bytes a second" in body["details"] and "after its first 5 s" in body["details"]
    assert transport.disconnecting


def test_a_body_at_the_least_rate_is_served_however_long_it_takes() -> None:
    clock = Clock()
    channel, transport = connect(rated(rate=100.0, grace=5.0), "10.0.0.1", clock)
    channel.dataReceived(post_head(3_000))
    for _ in range(29):
        channel.dataReceived(b"x" * 100)
        clock.advance(1)
    assert transport.value() == b""  # 29 s in, still coming at the rate
    channel.dataReceived(b"x" * 100)
    assert b"got 3000" in transport.value() and not transport.disconnecting
    clock.advance(60)  # the answer given, no clock is left to fire
    assert b"408" not in transport.value()


def test_a_request_without_a_body_and_a_resting_connection_are_not_timed_as_bodies() -> None:
    clock = Clock()
    channel, transport = connect(rated(rate=10**6, grace=0.0), "10.0.0.1", clock)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    channel.dataReceived(post_head(0))
    clock.advance(5)
    assert transport.value().count(b"200 OK") == 2 and b"408" not in transport.value()


def test_a_slow_body_cut_off_gives_back_its_in_flight_allowance() -> None:
    clock = Clock()
    budget = UploadBudget(total=10_000, per_ip=10_000)
    s = rated(rate=100.0, grace=1.0)

    class Budgeted(RawBodyRequest):
        upload_budget = budget

        def gotLength(self, length: int | None) -> None:
            super().gotLength(length)
            self.refuse_early(length)

    s.requestFactory = Budgeted
    channel, transport = connect(s, "10.0.0.1", clock)
    channel.dataReceived(post_head(5_000))
    assert budget.total == 5_000
    clock.advance(3)
    assert answer(transport)[0] == 408
    channel.connectionLost(Failure(ConnectionDone()))
    assert budget.total == 0 and budget.per_ip == {}


def test_malformed_http_is_a_json_400() -> None:
    channel, transport = connect(site(), "10.0.0.1")
    channel.dataReceived(b"GET / HTTP/1.1\r\nContent-Length: nope\r\n\r\n")
    status, body = answer(transport)
    assert status == 400 and body["error"] == "Bad request"


def test_guard_site_sets_the_idle_timeout_and_caps_below_the_descriptor_limit() -> None:
    s = site()
    policy = ConnectionPolicy(max_connections=10**9, max_connections_per_ip=7,
                              header_timeout=3.0, idle_timeout=9.0, min_upload_rate=512,
                              upload_grace=4.0)
    caps = guard_site(s, policy, reserve=100)
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert s.timeOut == 9.0
    assert s.protocol.header_timeout == 3.0  # type: ignore[attr-defined]
    assert s.protocol.min_body_rate == 512  # type: ignore[attr-defined]
    assert s.protocol.body_grace == 4.0  # type: ignore[attr-defined]
    assert caps.max_total == soft - 100 and caps.max_per_ip == 7


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        assert raise_open_files_limit() == (hard if hard != resource.RLIM_INFINITY
                                            else resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        assert connection_cap(10**9, 64) == resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 64
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_upload_budget_refuses_one_address_past_its_share_and_everyone_past_the_total(
        ) -> None:
    budget = UploadBudget(total=250, per_ip=100)
    assert budget.reserve("10.0.0.1", 60) is None
    refusal = budget.reserve("10.0.0.1", 60)
    assert refusal is not None and refusal[0] == 429
    assert refusal[1]["error"] == "Too many uploads" and refusal[2] == {"Retry-After": "5"}
    assert budget.reserve("10.0.0.2", 100) is None
    assert budget.reserve("10.0.0.3", 80) is None
    total = budget.reserve("10.0.0.4", 20)
    assert total is not None and total[0] == 503
    budget.release("10.0.0.1", 60)
    assert budget.reserve("10.0.0.1", 60) is None
    assert budget.total == 240


def test_the_upload_budget_exempts_trusted_proxies_from_the_per_address_share() -> None:
    budget = UploadBudget(total=1000, per_ip=100, exempt=("127.0.0.1",))
    assert budget.reserve("127.0.0.1", 90) is None
    assert budget.reserve("127.0.0.1", 90) is None


class Routes:
    app = Klein()
    app.url_map.merge_slashes = False

    @app.route("/submit", methods=["POST"])
    def submit(self, request: Any) -> bytes:
        return b""

    @app.route("/health", methods=["GET"])
    def health(self, request: Any) -> bytes:
        return b""

    @app.route("/status/<string:job_id>", methods=["GET"])
    def status(self, request: Any, job_id: str) -> bytes:
        return b""

    @app.route("/", branch=True, methods=["OPTIONS"])
    def preflight(self, request: Any) -> bytes:
        return b""


@pytest.mark.parametrize(("method", "path", "status"), [
    (b"POST", b"/health", 405),
    (b"POST", b"/nowhere", 404),
    (b"PUT", b"/status/job-1", 405),
    (b"GET", b"/status/job-1", 413),
    (b"GET", b"/status/job-1//x", 404),
    (b"GET", b"/%ff", 404),
])
def test_a_body_where_the_route_takes_none_is_refused_as_the_router_would(
        method: bytes, path: bytes, status: int) -> None:
    refusal = BodyRoutes(Routes.app.url_map).refusal(method, path)
    assert refusal is not None and refusal[0] == status


@pytest.mark.parametrize("path", [b"/submit", b"/%73ubmit", b"/submit?x=1"])
def test_a_body_to_a_route_that_takes_one_is_let_through_however_the_path_is_spelt(
        path: bytes) -> None:
    routes = BodyRoutes(Routes.app.url_map)
    assert routes.refusal(b"POST", path) is None
    assert routes.route(b"POST", path) == ("submit", 0)
