"""``sandrun serve --join``: what the worker announces, and that failures never stop it."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer, task

from sandrun.announce import Announcer
from sandrun.cli import build_parser, check_config, config_from


class FakeResponse:
    def __init__(self, code: int, body: dict[str, Any]) -> None:
        self.code, self.body = code, json.dumps(body).encode()

    def content(self) -> defer.Deferred[bytes]:
        return defer.succeed(self.body)


class FakeHTTP:
    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.posts: list[tuple[str, Any]] = []

    def post(self, url: str, data: bytes, headers: Any) -> defer.Deferred[Any]:
        self.posts.append((url, json.loads(data)))
        answer = self.answers.pop(0)
        return defer.fail(answer) if isinstance(answer, Exception) else defer.succeed(answer)


def test_the_worker_announces_its_key_and_url_at_start_and_every_interval() -> None:
    clock = task.Clock()
    http = FakeHTTP(ConnectionRefusedError(), FakeResponse(200, {"status": "enrolled"}))
    announcer = Announcer(clock, "http://pool.example:9000/", "KEY=", "http://10.0.0.5:8443",
                          interval=60.0, http=http)
    announcer.start()
    assert http.posts == [("http://pool.example:9000/pool/join",
                           {"worker_id": "KEY=", "endpoint": "http://10.0.0.5:8443"})]
    assert announcer.joined is False  # refused: logged, tried again later
    clock.advance(60)
    assert len(http.posts) == 2 and announcer.joined is True
    announcer.stop()


def test_a_refusal_is_not_a_join() -> None:
    http = FakeHTTP(FakeResponse(403, {"error": "Open enrollment is off"}))
    announcer = Announcer(task.Clock(), "http://pool", "KEY=", "http://h:1", http=http)
    announcer.start()
    assert announcer.joined is False
    announcer.stop()


def test_join_needs_a_worker_key_and_urls() -> None:
    def problem(*argv: str) -> str | None:
        return check_config(config_from(build_parser().parse_args(["serve", *argv])))

    assert "--worker-key" in (problem("--join", "http://pool:9000") or "")
    assert "bad --join" in (problem("--join", "pool:9000", "--worker-key", "k.pem") or "")
    assert problem("--join", "http://pool:9000", "--worker-key", "k.pem",
                   "--advertise", "http://10.0.0.5:8443") is None
