"""Free TCP ports on 127.0.0.1: picked automatically, or checked when fixed.

Every port handed out here is remembered for the life of the process, so two servers
started by one process (one stack, or the servers of one test session) never get the
same port even before either has bound it.
"""

from __future__ import annotations

import random
import socket

_HANDED_OUT: set[int] = set()  # ports chosen here but maybe not bound yet


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (and that this process
    has not handed out before, so one stack's ports never collide)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free port found")


def port_is_free(port: int) -> bool:
    """A server could listen on 127.0.0.1:``port`` now.

    Asked the way the servers bind (SO_REUSEADDR, then listen: gRPC, prometheus-client's
    HTTP server, Redis and SeaweedFS all set it): a port whose last server stopped a moment
    ago still has connections in TIME_WAIT for a minute (an HTTP/1.0 /metrics answer, a
    client the stopped server dropped), which a plain bind counts as busy although the next
    server binds it fine.  A port something listens on is still busy."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen(1)
        except OSError:
            return False
    return True


def free_port_pair(offset: int) -> int:
    """A free port p with p + offset free too."""
    for _ in range(500):
        p = random.randint(20000, 65535 - offset)
        if {p, p + offset}.isdisjoint(_HANDED_OUT) and port_is_free(p) \
                and port_is_free(p + offset):
            _HANDED_OUT.update((p, p + offset))
            return p
    raise RuntimeError("no free port pair found")


def claim_port(value: int | str | None) -> int:
    """0, None or 'auto' -> a free port; a busy fixed port is refused now, not later."""
    if value in (None, 0, "0", "auto"):
        return free_port()
    port = int(value)
    if not port_is_free(port):
        raise RuntimeError(f"port {port} on 127.0.0.1 is in use (pick another, or 'auto')")
    _HANDED_OUT.add(port)
    return port
