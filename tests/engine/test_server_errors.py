"""Errors: OpenAI's JSON error shape, the status a client can act on, the field named, no traceback."""

from __future__ import annotations

import asyncio

import httpx2
import openai
import pytest

from fake_async_llm import FakeAsyncLLM
from quantlab.engine.server import ServerSettings
from server_harness import free_socket, running_server


@pytest.fixture(scope="module")
def url():
    with running_server(FakeAsyncLLM()) as (base, _):
        yield base


def _post(url: str, path: str, body) -> httpx2.Response:
    kw = {"content": body} if isinstance(body, (str, bytes)) else {"json": body}
    return httpx2.post(url + path, timeout=30, headers={"content-type": "application/json"}, **kw)


def _error(r: httpx2.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    assert "Traceback" not in r.text and "File \"" not in r.text
    return err


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_token": 3}, "max_token"),
    ("/v1/completions", {"max_tokens": 3}, "prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, "prompt"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": "hello"}, "messages"),
])
def test_bad_field_or_type_is_400_naming_the_field(url, path, body, field):
    err = _error(_post(url, path, body), 400)
    assert err["param"] == field and field in err["message"]


@pytest.mark.parametrize(("body", "field"), [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "logprobs": 50}, "logprobs"),
    ({"prompt": "x", "logit_bias": {"5": 1.0}}, "logit_bias"),
])
def test_out_of_range_sampling_is_400_naming_the_field(url, body, field):
    err = _error(_post(url, "/v1/completions", body), 400)
    assert err["param"] == field and err["message"].startswith(field)


def test_overlong_and_empty_prompts_are_400(url):
    assert "tokens" in _error(_post(url, "/v1/completions", {"prompt": "x" * 500}), 400)["message"]
    _error(_post(url, "/v1/completions", {"prompt": ""}), 400)
    _error(_post(url, "/v1/completions", {"prompt": "x" * 500, "stream": True}), 400)


def test_invalid_json_is_400(url):
    assert "JSON" in _error(_post(url, "/v1/completions", "{not json"), 400)["message"]


def test_unknown_model_is_404_and_unknown_route_too(url):
    assert _error(_post(url, "/v1/completions", {"prompt": "x", "model": "gpt-9"}), 404)["param"] == "model"
    _error(httpx2.get(url + "/v1/nothing"), 404)


def test_openai_client_raises_its_typed_errors(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="fake-model", prompt="x", temperature=-2)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")


def test_queue_full_is_429():
    llm = FakeAsyncLLM(max_batch_size=1, step_time=0.05)
    settings = ServerSettings(max_queue=2)
    with running_server(llm, settings) as (base, state):
        async def burst():
            async with httpx2.AsyncClient(base_url=base, timeout=30) as c:
                return await asyncio.gather(*[c.post("/v1/completions", json={"prompt": "q", "max_tokens": 4})
                                              for _ in range(8)])
        statuses = sorted(r.status_code for r in asyncio.run(burst()))
        assert 200 in statuses and 429 in statuses and set(statuses) == {200, 429}
        assert state.queued == 0
    llm.check_integrity()


def test_request_timeout_is_408_and_frees_blocks():
    llm = FakeAsyncLLM(step_time=0.05)
    with running_server(llm, ServerSettings(request_timeout=0.3)) as (base, _):
        err = _error(_post(base, "/v1/completions", {"prompt": "slow", "max_tokens": 50}), 408)
        assert "request-timeout" in err["message"]
        with httpx2.stream("POST", base + "/v1/completions", json={"prompt": "slow", "max_tokens": 50, "stream": True},
                           timeout=30) as r:
            lines = [line for line in r.iter_lines() if line]
        assert '"code": 408' in lines[-2] and lines[-1] == "data: [DONE]"
        assert llm.stats().num_blocks_free == llm.num_blocks
    llm.check_integrity()


class _BrokenLLM(FakeAsyncLLM):
    async def generate(self, prompt, params, request_id, priority=0):
        raise RuntimeError("secret internal detail")
        yield  # an async generator, like the real one


def test_engine_failure_is_500_without_traceback():
    with running_server(_BrokenLLM()) as (base, _):
        err = _error(_post(base, "/v1/completions", {"prompt": "x"}), 500)
        assert "secret" not in err["message"]


def test_null_fields_take_their_defaults(url):
    body = {"prompt": "x", "temperature": None, "max_tokens": None, "stop": None, "seed": None, "n": None}
    r = _post(url, "/v1/completions", body)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16
    chat = {"messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "yo", "tool_calls": None, "refusal": None}], "max_tokens": 2}
    assert _post(url, "/v1/chat/completions", chat).status_code == 200


def test_port_in_use_is_one_sentence():
    from quantlab.engine.server import ServeError, serve

    sock = free_socket()
    sock.listen()
    try:
        with pytest.raises(ServeError, match=f"cannot listen on 127.0.0.1:{sock.getsockname()[1]}"):
            serve(FakeAsyncLLM(), ServerSettings(port=sock.getsockname()[1]))
    finally:
        sock.close()


def _raise_exception(message):
    from jinja2 import TemplateError

    raise TemplateError(message)


class _StrictTemplateLLM(FakeAsyncLLM):
    """A chat template that refuses conversations not opening with the user, as many real ones do."""

    def apply_chat_template(self, messages):
        from jinja2 import Environment

        env = Environment()
        env.globals["raise_exception"] = _raise_exception
        template = "{% if messages[0].role != 'user' %}{{ raise_exception('roles must start with user') }}{% endif %}"
        return env.from_string(template).render(messages=messages)


def test_chat_template_refusal_is_400():
    with running_server(_StrictTemplateLLM()) as (base, _):
        err = _error(_post(base, "/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x"}]}), 400)
        assert "roles must start with user" in err["message"] and err["param"] == "messages"
