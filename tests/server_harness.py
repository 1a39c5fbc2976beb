"""The HTTP server on a free loopback port for the length of a test, and reading its /metrics."""

from __future__ import annotations

import contextlib
import socket
import time

from quantlab.engine.server import ServerSettings, background_server


def free_socket() -> socket.socket:
    """A bound loopback socket; its port is free for a ServerSettings that background_server rebinds."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def running_server(async_llm, settings: ServerSettings | None = None):
    """Yield (base_url, server state) of a server on a free port; stopped gracefully afterwards."""
    with background_server(async_llm, settings) as (url, state):
        yield url, state


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


def wait_until(condition, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `condition()` every 5 ms; fail the test with `what` if it is still false after `timeout` s (generous:
    a loaded CI machine may stall a thread for seconds, and a condition that holds returns at once)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not hold within {timeout} s"
        time.sleep(0.005)
