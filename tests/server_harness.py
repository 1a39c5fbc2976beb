"""Run the HTTP server in a background thread on a free loopback port, for the length of a test."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from quantlab.engine.server import ServerSettings, make_server


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def running_server(async_llm, settings: ServerSettings | None = None, startup_timeout: float = 20.0):
    """Yield (base_url, server state); the server is stopped (gracefully) and joined afterwards."""
    sock = free_socket()
    settings = settings or ServerSettings(port=sock.getsockname()[1], grace_period=2.0)
    server = make_server(async_llm, settings, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", server.config.app.state.serving
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "the server did not stop within 30 s"


def scrape(base_url: str) -> dict[str, float]:
    """GET /metrics as {'name{label="v",...}': value} over every sample (the model_name label left out)."""
    import httpx2
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx2.get(base_url + "/metrics", timeout=30).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()) if k != "model_name")
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def wait_until(condition, timeout: float = 2.0, what: str = "condition") -> None:
    """Poll `condition()` every 5 ms; fail the test with `what` if it is still false after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not hold within {timeout} s"
        time.sleep(0.005)
