"""What a plain-HTTP worker loads at start: nothing it does not use while idle (issue #14).

Each test builds the worker the way ``sandrun serve`` does (argument parsing,
``cli.lean_imports``, then ``WorkerService`` with the reactor) in a fresh
interpreter and reads its ``sys.modules``: TLS, the HTTP client, the WebSocket
library, netlink, the MCP server and the rest are loaded where they are used,
so an idle worker does not hold their memory (``bench/memory.py`` measures it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Build the worker as ``sandrun serve ARGS`` does, without starting it; print what is loaded.
_BUILD = textwrap.dedent("""
    import json, sys
    from sandrun import cli

    args = cli.apply_config_file(cli.build_parser(), sys.argv[1:])
    config = cli.config_from(args)
    cli.lean_imports(config)
    from twisted.internet import reactor
    from twisted.internet.interfaces import IReactorSSL

    from sandrun.service import WorkerService

    WorkerService(reactor, config)
    print(json.dumps({"modules": sorted(sys.modules),
                      "reactor_ssl": IReactorSSL.providedBy(reactor)}))
""")

# Top-level packages (or modules) an idle plain-HTTP worker must not have imported.
NOT_AT_IDLE = (
    "OpenSSL", "cryptography", "service_identity",  # TLS: Twisted imports them eagerly
    "twisted.internet.ssl", "twisted.protocols.tls",
    "nacl",  # signing: only with --worker-key
    "treq", "twisted.web.client",  # the HTTP client: announcing to a coordinator
    "autobahn", "txaio", "sandrun.api.websocket",  # the first WebSocket stream
    "pyroute2", "yaml", "mcp", "sandrun.mcp_server",
    "prometheus_client.twisted",  # --metrics-listen only
    "sandrun.environments.builder",  # sandrun env build, never the worker
)


def build_worker(tmp_path: Any, *flags: str) -> dict[str, Any]:
    argv = ["serve", "--state-dir", str(tmp_path / "state"), "--env-dir", str(tmp_path / "env"),
            "--deps-dir", str(tmp_path / "deps"), *flags]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", _BUILD, *argv], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def loaded(modules: list[str], names: tuple[str, ...]) -> list[str]:
    """Each of ``names`` that is in ``modules``, itself or by a submodule."""
    return [n for n in names if any(m == n or m.startswith(n + ".") for m in modules)]


def test_a_plain_http_worker_with_defaults_loads_no_tls_client_websocket_or_netlink(
        tmp_path: Any) -> None:
    result = build_worker(tmp_path)
    assert loaded(result["modules"], NOT_AT_IDLE) == []
    # What it does load: the sandbox's Twisted side, the API, the job manager.
    assert loaded(result["modules"], ("sandrun.api.app", "sandrun.jobs.manager", "klein",
                                      "sandrun.sandbox.supervisor")) == [
        "sandrun.api.app", "sandrun.jobs.manager", "klein", "sandrun.sandbox.supervisor"]
    assert result["reactor_ssl"] is False


def test_a_worker_with_a_key_from_keygen_loads_pynacl_but_not_cryptography(
        tmp_path: Any) -> None:
    from sandrun.identity import WorkerIdentity, write_private_key

    identity = WorkerIdentity.generate()
    write_private_key(identity, tmp_path / "worker.pem")
    result = build_worker(tmp_path, "--worker-key", str(tmp_path / "worker.pem"))
    assert loaded(result["modules"], ("nacl", "cryptography", "OpenSSL")) == ["nacl"]


def test_a_worker_listening_on_ssl_keeps_twisted_tls(tmp_path: Any) -> None:
    result = build_worker(tmp_path, "--listen", "ssl:8443:privateKey=k.pem:certKey=c.pem")
    assert loaded(result["modules"], ("OpenSSL", "twisted.internet.ssl")) == [
        "OpenSSL", "twisted.internet.ssl"]
    assert result["reactor_ssl"] is True


@pytest.mark.parametrize(("listen", "urls", "expected"), [
    (("tcp:8443:interface=127.0.0.1", None), (None,), False),
    (("tcp:8443", "unix:/run/m.sock"), ("http://coordinator:9000",), False),
    (("ssl:8443:privateKey=k.pem", None), (None,), True),
    (("tcp:8443", "SSL:9100:privateKey=k.pem"), (None,), True),
    (("tcp:8443", None), ("https://coordinator:9000",), True),
])
def test_tls_is_needed_for_an_ssl_listener_or_an_https_coordinator(
        listen: tuple[str | None, ...], urls: tuple[str | None, ...], expected: bool) -> None:
    from sandrun.notls import uses_tls

    assert uses_tls(listen, urls) is expected


def test_after_refuse_tls_pyopenssl_cannot_be_imported_and_twisted_runs_without_it() -> None:
    code = textwrap.dedent("""
        from sandrun import notls
        assert notls.refuse_tls() is True
        from twisted.internet import endpoints, reactor
        try:
            import OpenSSL.SSL
        except ImportError as e:
            print("refused:", e)
        try:
            endpoints.wrapClientTLS(None, None)
        except NotImplementedError:
            print("wrapClientTLS: not implemented")
    """)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "refused: OpenSSL is not loaded in a worker that speaks plain HTTP" in done.stdout
    assert "wrapClientTLS: not implemented" in done.stdout


def test_refuse_tls_changes_nothing_once_pyopenssl_is_loaded() -> None:
    code = textwrap.dedent("""
        import sys
        import OpenSSL
        from sandrun import notls
        print(notls.refuse_tls(), any(type(f).__name__ == "_RefuseTLS" for f in sys.meta_path))
    """)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]
