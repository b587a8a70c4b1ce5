"""Where `rast serve` listens: loopback by default, and the sockets it binds itself (every interface
for "", a socket per address a name resolves to, a missing address family skipped, a port in use or a
malformed name refused)."""
from __future__ import annotations

import socket

import pytest

from rast_engine.cli import build_parser
from rast_engine.errors import RastError


def test_serve_binds_loopback_by_default() -> None:
    args = build_parser().parse_args(["serve", "m", "--expert", "r1", "b1", "0.5", "--expert", "r2", "b2", "-1"])
    assert (args.host, args.port) == ("127.0.0.1", 8000)
    assert args.expert == [["r1", "b1", "0.5"], ["r2", "b2", "-1"]]


def test_serve_listens_where_uvicorn_would(monkeypatch: pytest.MonkeyPatch) -> None:
    """rast serve binds its sockets itself: "" is every interface (it was refused as an unknown host), a
    name gets a socket per address it resolves to, a family the kernel lacks is skipped (as asyncio does),
    and a port in use or a malformed name is refused."""
    from rast_engine.server.cli import _listen

    with pytest.raises(RastError, match="cannot listen on a..b"):  # the idna codec's UnicodeError
        _listen("a..b", 0)
    real = socket.socket

    def no_ipv6(family: int = socket.AF_INET, *args: object) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(97, "Address family not supported by protocol")
        return real(family, *args)

    with monkeypatch.context() as m:
        m.setattr(socket, "socket", no_ipv6)
        socks = _listen("", 0)
        assert [s.getsockname()[0] for s in socks] == ["0.0.0.0"]
        socks[0].close()

    socks = _listen("", 0)
    try:
        assert {s.getsockname()[0] for s in socks} >= {"0.0.0.0"}
    finally:
        for s in socks:
            s.close()
    socks = _listen("localhost", 0)
    try:
        names = {s.getsockname()[0] for s in socks}
        assert names and names <= {"127.0.0.1", "::1"}
        with pytest.raises(RastError, match="cannot listen on localhost"):
            _listen("localhost", socks[0].getsockname()[1])
    finally:
        for s in socks:
            s.close()
