"""The OpenAI-compatible HTTP backend against a scripted server on 127.0.0.1: retries, back-off,
4xx errors, time-outs, bounded concurrency, partial failures. (The real llama.cpp server is in
test_generation_llama_server.py.)"""
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from megatron_longpo.generation.backends import GenerationError, OpenAIChatBackend, RequestError, SamplingParams
from megatron_longpo.generation.factory import BackendConfig, build_backend


class Scripted:
    """A chat-completions server whose answers are decided by `respond(body, n)` -> (status, payload, headers)."""

    def __init__(self, respond, delay=0.0):
        self.respond = respond
        self.delay = delay
        self.bodies: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, status, payload, headers=()):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/v1/models":
                    self._send(200, {"data": [{"id": "scripted-model"}]})
                else:
                    self._send(404, {"error": "no such path"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.bodies.append(body)
                    n = len(outer.bodies)
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                try:
                    if outer.delay:
                        time.sleep(outer.delay)
                    status, payload, headers = outer.respond(body, n)
                finally:
                    with outer.lock:  # before answering: the client's next request comes after
                        outer.in_flight -= 1
                self._send(status, payload, headers)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # a client that timed out and hung up (the time-out test) is expected

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def ok(text):
    return 200, {"choices": [{"message": {"role": "assistant", "content": text}}],
                 "usage": {"prompt_tokens": 3, "completion_tokens": 2}}, ()


def conv(text):
    return [{"role": "user", "content": text}]


def backend(url, **kw):
    kw.setdefault("backoff_base", 0.01)
    kw.setdefault("timeout", 10)
    return OpenAIChatBackend(url, **kw)


def test_request_body_model_seeds_and_stop():
    with Scripted(lambda body, n: ok(f"answer STOP tail {body['seed']}")) as srv:
        be = backend(srv.url.removesuffix("/v1"))  # a base URL without /v1 works too
        out = be.chat([conv("q1"), conv("q2")], SamplingParams(max_new_tokens=7, temperature=0.5, top_p=0.9,
                                                                n=3, seed=10, stop=("STOP",)))
    assert out == [["answer "] * 3] * 2  # cut at the stop string
    assert len(srv.bodies) == 6
    b = srv.bodies[0]
    assert b["model"] == "scripted-model"  # the first model the server lists
    assert (b["max_tokens"], b["temperature"], b["top_p"], b["n"], b["stop"]) == (7, 0.5, 0.9, 1, ["STOP"])
    assert sorted(x["seed"] for x in srv.bodies) == [10, 10, 11, 11, 12, 12]  # seed + sample index
    assert be.stats.requests == 6 + 1 and be.stats.completion_tokens == 12  # + GET /v1/models


def test_5xx_429_and_connection_drops_are_retried():
    def respond(body, n):
        if n == 1:
            return 503, {"error": "loading model"}, ()
        if n == 2:
            return 429, {"error": "busy"}, (("Retry-After", "0"),)
        return ok("fine")

    with Scripted(respond) as srv:
        be = backend(srv.url, model="m", max_retries=3)
        assert be.chat([conv("q")], SamplingParams()) == [["fine"]]
    assert be.stats.retries == 2 and be.stats.requests == 3 and be.stats.failed == 0


def test_4xx_fails_at_once_with_the_server_message():
    def respond(body, n):
        if "BAD" in body["messages"][0]["content"]:
            return 400, {"error": {"message": "prompt exceeds the context window"}}, ()
        return ok("good")

    with Scripted(respond) as srv:
        be = backend(srv.url, model="m", max_retries=5)
        with pytest.raises(GenerationError) as ei:
            be.chat([conv("fine"), conv("BAD one"), conv("fine too")], SamplingParams())
    err = ei.value
    assert err.partial == [["good"], None, ["good"]]  # the other conversations are kept
    assert set(err.errors) == {1}
    e = err.errors[1]
    assert isinstance(e, RequestError) and e.status == 400
    assert "HTTP 400" in str(e) and "prompt exceeds the context window" in str(e)
    assert be.stats.retries == 0 and be.stats.failed == 1


def test_unreachable_server_gives_up_with_a_clear_message():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    be = backend(f"http://127.0.0.1:{port}/v1", model="m", max_retries=2)
    t0 = time.monotonic()
    with pytest.raises(GenerationError) as ei:
        be.chat([conv("q")], SamplingParams())
    msg = str(ei.value.errors[0])
    assert "gave up after 3 attempts" in msg and "is the server" in msg and str(port) in msg
    assert be.stats.retries == 2 and time.monotonic() - t0 < 5


def test_time_out_is_retried():
    calls = []

    def respond(body, n):
        calls.append(n)
        if n == 1:
            time.sleep(1.5)  # longer than the client's time-out
        return ok("late but fine")

    with Scripted(respond) as srv:
        be = backend(srv.url, model="m", timeout=0.5, max_retries=2)
        assert be.chat([conv("q")], SamplingParams()) == [["late but fine"]]
    assert be.stats.retries == 1


def test_concurrency_is_bounded():
    with Scripted(lambda body, n: ok("x"), delay=0.1) as srv:
        be = backend(srv.url, model="m", concurrency=3)
        out = be.chat([conv(f"q{i}") for i in range(12)], SamplingParams(n=1))
    assert out == [["x"]] * 12
    assert 2 <= srv.max_in_flight <= 3


def test_backend_config_errors():
    with pytest.raises(ValueError, match="--base-url"):
        build_backend(BackendConfig(kind="openai"))
    with pytest.raises(ValueError, match="start it with the extended checkpoint"):
        build_backend(BackendConfig(kind="openai", base_url="http://127.0.0.1:1/v1", rope_theta=1e6))
    with pytest.raises(ValueError, match="--model"):
        build_backend(BackendConfig(kind="transformers"))
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
