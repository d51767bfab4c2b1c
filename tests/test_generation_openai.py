"""The openai backend against a scripted OpenAI-compatible server on loopback (no model).

The server answers each chat completion with a text that echoes what the backend sent (seed,
sampling settings, images), and can be told to fail, so retries, backoff, the model check, the
key handling and the bounded concurrency are checked here in milliseconds; the same backend
against a real ``vllm serve`` is in test_generation_openai_vllm.py.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fixtures_images import noise_jpeg, truncated_jpeg
from PIL import Image

from megapairs_dagster.synthesis.generation.backends import (
    BackendSettings,
    make_describer,
    make_instructor,
)
from megapairs_dagster.synthesis.generation.base import (
    DescriptionRequest,
    InstructionRequest,
    PairInput,
)
from megapairs_dagster.synthesis.generation.errors import BackendUnavailable
from megapairs_dagster.synthesis.generation.openai_backend import api_root
from megapairs_dagster.synthesis.generation.parsing import BACKEND_ERROR
from megapairs_dagster.synthesis.generation.run import generate_instructions

MODEL = "tiny-llm"


class ScriptedServer:
    """A ThreadingHTTPServer on 127.0.0.1 whose answers a test scripts."""

    def __init__(self, models=(MODEL,), delay_s: float = 0.0):
        self.models = list(models)
        self.delay_s = delay_s
        self.failures: list[int] = []  # status codes to answer, one per request, before success
        self.always: int | None = None  # a status code to answer forever
        self.refused: str | None = None  # answer 400 to every request whose body contains this
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                with server.lock:
                    server.headers.append(dict(self.headers))
                if self.path == "/v1/models":
                    self._answer(200, {"data": [{"id": m, "object": "model"} for m in server.models]})
                else:
                    self._answer(404, {"error": "not found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.bodies.append(body)
                    server.headers.append(dict(self.headers))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    status = server.always or (server.failures.pop(0) if server.failures else 200)
                    if server.refused and server.refused in json.dumps(body):
                        status = 400
                try:
                    time.sleep(server.delay_s)
                    if status != 200:
                        self._answer(status, {"error": f"scripted {status}"})
                        return
                    self._answer(200, {"choices": [{"message": {"content": _echo(body)}}]})
                finally:
                    with server.lock:
                        server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _echo(body: dict) -> str:
    content = body["messages"][0]["content"]
    if isinstance(content, str):
        return f"seed={body['seed']} text={content}"
    images = [part["image_url"]["url"] for part in content if part["type"] == "image_url"]
    text = [part["text"] for part in content if part["type"] == "text"]
    return f"seed={body['seed']} images={len(images)} text={text[0]}"


@pytest.fixture
def server():
    scripted = ScriptedServer()
    yield scripted
    scripted.close()


def settings(url: str, **changes) -> BackendSettings:
    values = {
        "backend": "openai", "description_model": MODEL, "instruction_model": MODEL,
        "endpoint_url": url, "temperature": 0.0, "max_new_tokens": 17, "retry_backoff_s": 0.0,
        "max_retries": 2, "request_timeout_s": 5.0,
    }
    return BackendSettings(**{**values, **changes})


def pair(index: int, *, broken: bool = False) -> PairInput:
    return PairInput(
        pair_id=f"{index}-{index + 100}",
        query_jpeg=truncated_jpeg() if broken else noise_jpeg((40, 32), seed=index),
        target_jpeg=noise_jpeg((32, 48), seed=1000 + index),
        query_caption="a red bicycle", target_caption="a blue bicycle",
    )


def instruction_requests(count: int) -> list[InstructionRequest]:
    return [InstructionRequest(pair(i), f"description {i}", (), seed=100 + i) for i in range(count)]


def test_requests_carry_the_prompt_seed_and_sampling_settings_and_answers_keep_their_order(server):
    instructor = make_instructor(settings(server.url, max_concurrency=4))
    requests = instruction_requests(10)
    outputs = instructor.instruct(requests)
    assert [o.split(" ")[0] for o in outputs] == [f"seed={100 + i}" for i in range(10)]
    assert all(f"description {i}" in outputs[i] for i in range(10))
    body = server.bodies[0]
    assert body["model"] == MODEL
    assert (body["max_tokens"], body["temperature"], body["top_p"]) == (17, 0.0, 1.0)
    assert body["messages"][0]["role"] == "user"
    # The identity (part of the chunks' config hash) holds no address: a managed server's
    # port changes from run to run.
    assert instructor.identity["backend"] == "openai"
    assert instructor.identity["model"] == MODEL
    assert "127.0.0.1" not in json.dumps(instructor.identity)


def test_the_description_step_sends_the_query_then_the_target_image_as_data_urls(server):
    describer = make_describer(settings(server.url))
    pairs = [pair(0), pair(1)]
    outputs = describer.describe([DescriptionRequest(p, 70, seed=i) for i, p in enumerate(pairs)])
    assert outputs[0].startswith("seed=0 images=2 text=")
    assert "70 words" in outputs[0]  # the description prompt rendered with the word budget
    content = next(b for b in server.bodies if b["seed"] == 0)["messages"][0]["content"]
    urls = [part["image_url"]["url"] for part in content if part["type"] == "image_url"]
    assert content[-1]["type"] == "text"
    prefix = "data:image/jpeg;base64,"
    assert all(url.startswith(prefix) for url in urls)
    sent = [base64.b64decode(url[len(prefix):]) for url in urls]
    assert sent == [pairs[0].query_jpeg, pairs[0].target_jpeg]


def test_images_larger_than_image_max_side_are_sent_scaled_down(server):
    describer = make_describer(settings(server.url, image_max_side=40))
    describer.describe([DescriptionRequest(pair(0), 70, seed=0)])  # 40x32 and 32x48 images
    content = server.bodies[0]["messages"][0]["content"]
    query, target = (part["image_url"]["url"] for part in content if part["type"] == "image_url")
    # The query fits (sent as stored); the target is scaled to 27x40, as lossless PNG.
    assert base64.b64decode(query.split(",", 1)[1]) == pair(0).query_jpeg
    assert target.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(target.split(",", 1)[1]))) as image:
        assert image.size == (27, 40)
    assert describer.identity["settings"]["image_max_side"] == 40


def test_a_broken_image_fails_its_batch_before_anything_is_sent(server):
    describer = make_describer(settings(server.url))
    with pytest.raises(ValueError, match="pair 1-101: cannot decode the query image"):
        describer.describe([DescriptionRequest(pair(0), 70, 0), DescriptionRequest(pair(1, broken=True), 70, 1)])
    assert server.bodies == []


def test_a_model_the_endpoint_does_not_serve_fails_before_any_work(server):
    with pytest.raises(ValueError) as error:
        make_instructor(settings(server.url, instruction_model="other-llm"))
    message = str(error.value)
    assert api_root(server.url) in message and "other-llm" in message and MODEL in message
    assert server.bodies == []


def test_429_and_5xx_are_retried_with_exponential_backoff(server):
    sleeps: list[float] = []
    from megapairs_dagster.synthesis.generation.openai_backend import OpenAIInstructor

    instructor = OpenAIInstructor(
        MODEL, endpoint_url=server.url, render_prompt=lambda r: r.description,
        temperature=0.0, max_retries=3, retry_backoff_s=0.5, sleep=sleeps.append,
    )
    server.failures = [429, 503, 500]
    assert instructor.instruct(instruction_requests(1)) == ["seed=100 text=description 0"]
    assert sleeps == [0.5, 1.0, 2.0]
    assert len(server.bodies) == 4


def test_after_its_retries_the_backend_raises_naming_the_endpoint(server):
    instructor = make_instructor(settings(server.url, max_retries=2))
    server.always = 503
    with pytest.raises(BackendUnavailable, match=f"{api_root(server.url)} failed 3 times"):
        instructor.instruct(instruction_requests(1))
    assert len(server.bodies) == 3


def test_an_endpoint_that_is_gone_raises_naming_it():
    dead = ScriptedServer()
    url = dead.url
    dead.close()  # nothing listens on the port any more
    with pytest.raises(BackendUnavailable, match=f"{api_root(url)} failed 2 times.*Connection"):
        make_instructor(settings(url, max_retries=1))


def test_the_driver_fails_the_step_when_the_endpoint_is_gone_but_rejects_a_bad_request(server):
    instructor = make_instructor(settings(server.url, max_retries=1))
    described = [(pair(i), f"description {i}") for i in range(4)]
    server.refused = "description 0"  # one request the server refuses: only its pair is rejected
    rows, rejects = generate_instructions(
        described, instructor, demonstrations=(), seed=0, max_attempts=1, batch_size=2
    )
    backend_errors = rejects[rejects["reason"] == BACKEND_ERROR]
    assert list(backend_errors["pair_id"]) == ["0-100"]
    assert "HTTP 400" in backend_errors["detail"].iloc[0]
    # Its batch-mate was sent again on its own and answered.
    assert {"1-101", "2-102", "3-103"} <= set(rows["pair_id"]) | set(rejects["pair_id"])
    assert "1-101" not in set(backend_errors["pair_id"])
    server.always = 502
    with pytest.raises(BackendUnavailable):
        generate_instructions(described, instructor, demonstrations=(), seed=0, batch_size=2)


def test_concurrency_is_bounded_by_max_concurrency():
    server = ScriptedServer(delay_s=0.05)
    try:
        instructor = make_instructor(settings(server.url, max_concurrency=3))
        instructor.instruct(instruction_requests(12))
        assert server.max_in_flight == 3
    finally:
        server.close()


def test_the_api_key_comes_from_the_named_environment_variable_only(server, monkeypatch):
    monkeypatch.delenv("MEGAPAIRS_TEST_KEY", raising=False)
    with pytest.raises(ValueError, match="MEGAPAIRS_TEST_KEY.*not set"):
        make_instructor(settings(server.url, api_key_env="MEGAPAIRS_TEST_KEY"))
    monkeypatch.setenv("MEGAPAIRS_TEST_KEY", "sk-secret-123")
    instructor = make_instructor(settings(server.url, api_key_env="MEGAPAIRS_TEST_KEY"))
    instructor.instruct(instruction_requests(1))
    assert {h.get("Authorization") for h in server.headers} == {"Bearer sk-secret-123"}
    assert "sk-secret" not in json.dumps(instructor.identity)
    server.always = 500
    with pytest.raises(BackendUnavailable) as error:
        instructor.instruct(instruction_requests(1))
    assert "sk-secret" not in str(error.value)


def test_the_openai_backend_needs_an_endpoint():
    with pytest.raises(ValueError, match="needs an endpoint"):
        make_instructor(settings(None))
