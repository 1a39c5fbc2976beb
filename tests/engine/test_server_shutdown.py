"""SIGTERM: stop admitting, let in-flight requests finish within the grace period (abort the rest), exit 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2

from server_harness import free_socket, wait_until

TESTS = Path(__file__).resolve().parents[1]
SCRIPT = """
import json, sys
from fake_async_llm import FakeAsyncLLM
from quantlab.engine.server import ServerSettings, serve
llm = FakeAsyncLLM(step_time=float(sys.argv[3]))
serve(llm, ServerSettings(port=int(sys.argv[1]), grace_period=float(sys.argv[2])))
print(json.dumps({"free": llm.stats().num_blocks_free, "total": llm.num_blocks, "aborted": llm.num_aborted,
                  "shut_down": llm.shut_down}))
"""


def _start(grace: float, step: float):
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(port), str(grace), str(step)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, proc.stderr.read()
        try:
            return httpx2.get(base + "/health", timeout=1).status_code == 200
        except httpx2.TransportError:
            return False
    wait_until(up, timeout=30, what="the server up")
    return proc, base


def _stream_in_thread(base: str, max_tokens: int, events: list) -> threading.Thread:
    def run():
        try:
            body = {"prompt": "long", "max_tokens": max_tokens, "stream": True}
            with httpx2.stream("POST", base + "/v1/completions", json=body, timeout=30) as r:
                for line in r.iter_lines():
                    if line:
                        events.append(line)
        except httpx2.TransportError as e:
            events.append(f"transport error {type(e).__name__}")
    t = threading.Thread(target=run, daemon=True)
    t.start()
    wait_until(lambda: len(events) >= 2, timeout=10, what="the stream started")
    return t


def test_sigterm_finishes_in_flight_requests_refuses_new_ones_and_exits_0():
    proc, base = _start(grace=10, step=0.02)
    events: list[str] = []
    t = _stream_in_thread(base, 60, events)  # about 1.2 s of tokens
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    try:
        refused = httpx2.post(base + "/v1/completions", json={"prompt": "late"}, timeout=5).status_code
    except httpx2.TransportError:
        refused = "connection refused"
    assert refused in (503, "connection refused")
    t.join(timeout=20)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert events[-1] == "data: [DONE]" and len(events) == 61, events[-3:]
    final = json.loads(out.strip().splitlines()[-1])
    assert final == {"free": final["total"], "total": final["total"], "aborted": 0, "shut_down": True}


def test_sigterm_aborts_what_outlives_the_grace_period_and_exits_0():
    proc, base = _start(grace=0.5, step=0.1)
    events: list[str] = []
    t = _stream_in_thread(base, 80, events)  # about 8 s of tokens, well past the grace period
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert time.monotonic() - start < 5, "shutdown took longer than the grace period and a margin"
    t.join(timeout=10)
    assert events[-1] != "data: [DONE]"
    final = json.loads(out.strip().splitlines()[-1])
    assert final["aborted"] == 1 and final["free"] == final["total"] and final["shut_down"]
