"""``make up`` right after ``make down``: the stack starts again at once on the same fixed
ports, although the servers that just stopped left connections in TIME_WAIT on them.

A server that closes a connection first (prometheus-client answers /metrics as HTTP/1.0 and
closes; a stopping server drops its clients) leaves that connection in TIME_WAIT on its own
port for a minute.  Every server here binds with SO_REUSEADDR, so such a port is free for
the next one; the stack's port check must say so too (a plain bind calls it busy).
"""

from __future__ import annotations

import random
import socket
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import save_tiny_model
from rise.stack import Stack, free_port, grpc_serving, metrics_answer, port_is_free

# /proc/net/tcp's state of a connection in TIME_WAIT.
TIME_WAIT = "06"


def time_wait_ports() -> set[int]:
    """Local ports of the IPv4 and IPv6 connections in TIME_WAIT (Linux)."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if f[3] == TIME_WAIT:
                out.add(int(f[1].rsplit(":", 1)[1], 16))
    return out


def server_side_time_wait() -> tuple[int, socket.socket]:
    """A listening port whose one accepted connection the server closed first (so it sits
    in TIME_WAIT on that port), and the listener, still open."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = srv.accept()
    conn.close()  # the server's FIN first: its end goes to TIME_WAIT
    assert client.recv(1) == b""
    client.close()
    return port, srv


def test_port_is_free_counts_time_wait_as_free_and_a_listener_as_busy():
    port, srv = server_side_time_wait()
    try:
        assert not port_is_free(port), "a port something listens on is busy"
    finally:
        srv.close()
    assert port in time_wait_ports()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as plain:
        with pytest.raises(OSError):  # what the check used to do: refused for a minute
            plain.bind(("127.0.0.1", port))
    assert port_is_free(port)


def fixed_ports() -> tuple[int, int, int]:
    """Free gateway and scorer ports and a metrics port p with p..p+3 free (the worker,
    the scorer and the controller take p+1..p+3), away from make up's defaults."""
    gateway, scorer = free_port(), free_port()
    for _ in range(500):
        start = random.randint(20000, 32000)  # below Linux's ephemeral ports
        block = range(start, start + 4)
        if {gateway, scorer}.isdisjoint(block) and all(port_is_free(p) for p in block):
            return gateway, scorer, start
    pytest.skip("no four consecutive free ports")


@pytest.mark.integration
def test_up_again_right_after_down_on_the_same_ports(tmp_path):
    model = save_tiny_model("llama", tmp_path / "tiny-llama")
    gateway, scorer, metrics = fixed_ports()
    ports = dict(gateway_port=gateway, scorer_port=scorer, metrics_port=metrics)
    stack = Stack.up(tmp_path / "stack", pools={"tiny": str(model)}, die_with_parent=True,
                     **ports)
    try:
        metrics_ports = [urlsplit(url).port for url in stack.endpoints["metrics"].values()]
        assert stack.endpoints["gateway"] == f"127.0.0.1:{gateway}"
        assert set(metrics_ports) <= {metrics + k for k in range(4)}
        assert not port_is_free(gateway) and not port_is_free(metrics)
        for p in metrics_ports:  # each answer is closed by the server: TIME_WAIT on p
            assert "rise_" in metrics_answer(p)
    finally:
        stack.down()
    assert set(metrics_ports) & time_wait_ports(), "the test needs a port in TIME_WAIT"

    again = Stack.up(tmp_path / "stack", pools={"tiny": str(model)}, die_with_parent=True,
                     **ports)
    try:
        for key in ("gateway", "scorer", "metrics"):
            assert again.endpoints[key] == stack.endpoints[key]
        assert grpc_serving(f"127.0.0.1:{gateway}") and grpc_serving(f"127.0.0.1:{scorer}")
        for p in metrics_ports:
            assert "rise_" in metrics_answer(p)
    finally:
        again.down()
