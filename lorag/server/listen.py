"""The server's listening socket, bound before the engine starts.

Starting an engine takes seconds to minutes, and it opens ports of its own; binding first
keeps the port ours meanwhile and turns "port in use" into a one-line error before that
wait, instead of a uvicorn error after it.
"""

from __future__ import annotations

import socket

from lorag.errors import LoragError


class PortInUse(LoragError):
    code = "port_in_use"


def bind_listener(host: str, port: int) -> socket.socket:
    """A bound (not yet listening) TCP socket for uvicorn to serve on."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise LoragError(f"cannot listen on {host}: {err.strerror}", param="server.host") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise PortInUse(f"cannot listen on {host}:{port}: {err.strerror}; choose another with --port",
                        param="server.port") from None
    sock.set_inheritable(True)
    return sock
