"""The ``openai`` backend: both generation steps through an OpenAI-compatible HTTP endpoint.

Any server that speaks the OpenAI API works: ``vllm serve`` (started for the run by
``resources/generation_server.py``, or a cluster Service), or another. Each request is one
user turn of the rendered prompt. The description step sends it to ``/v1/chat/completions``,
preceded by the query and the target image as base64 data URLs; the server applies the
model's chat template. The instruction step's prompt carries the MLLM's description, which may
spell a special token (``</s>``): a chat endpoint would tokenize the rendered turn whole and
end the prompt there. So this step renders the chat template and tokenizes here, with the
model's tokenizer and the ``transformers`` backend's code (``chat_tokens``), and sends the
token ids to ``/v1/completions``. Greedy outputs (``temperature == 0``) thus match the
``transformers`` backend's on the same model; sampled outputs follow the server's own
generator, seeded per request with the request's seed.

Requests go out concurrently (``max_concurrency`` in flight); 429, 5xx, timeouts,
connection errors and answers cut short by a dropped connection are retried with exponential
backoff. After the last retry the backend raises ``BackendUnavailable`` naming the endpoint
and the attempts, which ends the step with every saved chunk kept. Other 4xx answers concern
one request (a prompt too long, say): they raise an ordinary error, which the driver records
as a rejected batch.

HTTP goes through ``requests`` (already a dependency of Dagster's) rather than the ``openai``
client, which is not installed here and would bring ``httpx``; the protocol used is four
JSON fields. The API key is read from the environment variable that ``api_key_env`` names,
and never appears in an identity, a log line or an error.
"""

from __future__ import annotations

import base64
import io
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

import requests

from megapairs_dagster.synthesis.generation.base import DescriptionRequest, InstructionRequest
from megapairs_dagster.synthesis.generation.chat_tokens import chat_prompt_ids
from megapairs_dagster.synthesis.generation.errors import BackendUnavailable
from megapairs_dagster.synthesis.generation.images import (
    check_max_side,
    fit_within,
    open_image,
)

RETRIED_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# The server or the network went away: before or during the answer (ChunkedEncodingError is
# a body cut short, e.g. by a server killed mid-answer; requests does not count it as a
# ConnectionError, and unretried it would reject the pair as if the request were bad).
RETRIED_ERRORS = (
    requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError
)
MAX_BACKOFF_S = 60.0


def api_root(url: str) -> str:
    """``http://host:port`` from a base URL given with or without ``/v1``."""
    root = url.rstrip("/")
    return root.removesuffix("/v1")


class EndpointClient:
    """JSON over HTTP to one endpoint, with retries, backoff and a bounded connection pool."""

    def __init__(
        self,
        url: str,
        *,
        api_key_env: str | None = None,
        timeout_s: float = 600.0,
        max_retries: int = 5,
        backoff_s: float = 1.0,
        pool_size: int = 16,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if max_retries < 0 or backoff_s < 0 or timeout_s <= 0:
            raise ValueError("need max_retries >= 0, retry_backoff_s >= 0 and request_timeout_s > 0")
        self.root = api_root(url)
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.pool_size = pool_size
        self._sleep = sleep
        self._headers = {"Content-Type": "application/json"}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise ValueError(
                    f"generation.api_key_env names {api_key_env!r}, which is not set in the "
                    "environment"
                )
            self._headers["Authorization"] = f"Bearer {key}"
        self._local = threading.local()  # one Session per thread: Session is not thread-safe

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            adapter = requests.adapters.HTTPAdapter(pool_maxsize=self.pool_size, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._local.session = session
        return session

    def request(self, method: str, path: str, body: dict | None = None) -> Any:
        """The decoded JSON answer; ``BackendUnavailable`` once the retries are spent."""
        url = f"{self.root}{path}"
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._sleep(min(self.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S))
            try:
                response = self._session().request(
                    method, url, json=body, headers=self._headers, timeout=self.timeout_s
                )
            except RETRIED_ERRORS as error:
                last = f"{type(error).__name__}: {error}"
                continue
            if response.status_code in RETRIED_STATUS:
                last = f"HTTP {response.status_code}: {response.text[:300]}"
                continue
            if response.status_code >= 400:
                raise RuntimeError(
                    f"{method} {url} answered HTTP {response.status_code}: {response.text[:500]}"
                )
            return response.json()
        raise BackendUnavailable(
            f"generation endpoint {self.root} failed {self.max_retries + 1} times "
            f"({method} {path}); last error: {last}"
        )

    def model_ids(self) -> list[str]:
        return [entry["id"] for entry in self.request("GET", "/v1/models").get("data", [])]


def image_data_url(data: bytes, pair_id: str, role: str, max_side: int | None = None) -> str:
    """A ``data:`` URL of the image as stored once it decodes (``images.open_image``), or,
    when it is larger than ``max_side``, of its scaled-down copy as PNG (lossless)."""
    image = open_image(data, pair_id, role)
    kind = (image.format or "jpeg").lower()
    if max_side is not None and max(image.size) > max_side:
        buffer = io.BytesIO()
        fit_within(image.convert("RGB"), max_side).save(buffer, format="PNG")
        data, kind = buffer.getvalue(), "png"
    return f"data:image/{kind};base64,{base64.b64encode(data).decode('ascii')}"


def load_tokenizer(source: str, *, trust_remote_code: bool = False) -> Any:
    """The instruction model's fast tokenizer (offsets are needed), or an error saying why
    the backend needs it and which setting names it."""
    from transformers import AutoTokenizer

    why = ("the openai backend builds the instruction prompt's token ids itself, so that a "
           "description spelling a special token such as </s> stays text")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{why}, and the instruction model's tokenizer did not load from {source!r} "
            f"({error}). Set generation.instruction_tokenizer to a directory (or hub id) holding "
            "the served model's tokenizer files."
        ) from error
    if not tokenizer.is_fast:
        raise ValueError(f"{why}, which needs a fast tokenizer; {source!r} has a slow one")
    return tokenizer


class _OpenAIBackend:
    backend_name = "openai"
    path = ""  # the endpoint's route
    api = ""  # what the identity says of the requests

    def __init__(
        self,
        model: str,
        *,
        endpoint_url: str,
        render_prompt: Callable,
        max_new_tokens: int = 256,
        temperature: float = 0.7,
        top_p: float = 1.0,
        max_concurrency: int = 16,
        request_timeout_s: float = 600.0,
        max_retries: int = 5,
        retry_backoff_s: float = 1.0,
        api_key_env: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if temperature < 0 or not 0 < top_p <= 1 or max_concurrency < 1 or max_new_tokens < 1:
            raise ValueError(
                "need temperature >= 0, 0 < top_p <= 1, max_concurrency >= 1 and max_new_tokens >= 1"
            )
        self.model = model
        self.render_prompt = render_prompt
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.max_concurrency = max_concurrency
        self.client = EndpointClient(
            endpoint_url, api_key_env=api_key_env, timeout_s=request_timeout_s,
            max_retries=max_retries, backoff_s=retry_backoff_s, pool_size=max_concurrency,
            sleep=sleep,
        )
        served = self.client.model_ids()  # before any work: a wrong model fails the step now
        if model not in served:
            raise ValueError(
                f"generation endpoint {self.client.root} does not serve model {model!r}; "
                f"it serves {served}"
            )
        # The endpoint's address is left out: a managed server gets a new port every run, and
        # the identity is part of the chunks' config hash, which must survive a restart.
        self.identity = {
            "backend": self.backend_name,
            "model": model,
            "settings": {
                "max_new_tokens": max_new_tokens,
                "temperature": temperature,
                "top_p": top_p,
                "sampling": "greedy" if temperature == 0 else "server-side, seeded per request",
                "api": self.api,
            },
        }

    def _prompt(self, request) -> dict:
        """The body's prompt fields for ``request``."""
        raise NotImplementedError

    @staticmethod
    def _text(choice: dict) -> str | None:
        raise NotImplementedError

    def _complete(self, request) -> str:
        body = {
            "model": self.model,
            **self._prompt(request),
            "max_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": request.seed,
            "n": 1,
        }
        answer = self.client.request("POST", self.path, body)
        try:
            return self._text(answer["choices"][0]) or ""
        except (KeyError, IndexError, TypeError) as error:
            raise RuntimeError(
                f"{self.client.root}: unexpected answer from {self.path}: {str(answer)[:300]}"
            ) from error

    def _run(self, requests_: Sequence) -> list[str]:
        """One output per request, in order, with at most ``max_concurrency`` in flight.

        The first failure cancels the requests not yet sent and is raised as is."""
        if not requests_:
            return []
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(requests_))) as pool:
            futures = [pool.submit(self._complete, request) for request in requests_]
            wait(futures, return_when=FIRST_EXCEPTION)
            failed = [future for future in futures if future.done() and future.exception()]
            if failed:
                for future in futures:
                    future.cancel()
                raise failed[0].exception()
            return [future.result() for future in futures]


class OpenAIInstructor(_OpenAIBackend):
    """LLM step: the rendered instruction prompt as one user turn, as token ids."""

    path = "/v1/completions"
    api = "/v1/completions (prompt token ids)"

    def __init__(self, model: str, *, tokenizer: str | None = None,
                 trust_remote_code: bool = False, **options: Any):
        """``tokenizer``: where the served model's tokenizer loads from (default: ``model``,
        a local directory or hub id, as for a server this project starts)."""
        super().__init__(model, **options)
        self.tokenizer = load_tokenizer(tokenizer or model, trust_remote_code=trust_remote_code)

    def encode(self, request: InstructionRequest) -> list[int]:
        """The ids the server gets: the chat template's special tokens as such, the prompt
        (which carries the description) as text even where it spells ``</s>``."""
        return chat_prompt_ids(self.tokenizer, self.render_prompt(request))

    def _prompt(self, request: InstructionRequest) -> dict:
        return {"prompt": self.encode(request)}

    @staticmethod
    def _text(choice: dict) -> str | None:
        return choice["text"]

    def instruct(self, requests_: Sequence[InstructionRequest]) -> list[str]:
        return self._run(requests_)


class OpenAIDescriber(_OpenAIBackend):
    """MLLM step: the query image, the target image, then the prompt, in one user turn."""

    path = "/v1/chat/completions"
    api = path

    def __init__(self, model: str, *, image_max_side: int | None = None, **options: Any):
        """``image_max_side``: images are scaled down to it first, as every describer does."""
        self.image_max_side = check_max_side(image_max_side)
        super().__init__(model, **options)
        self.identity["settings"]["image_max_side"] = image_max_side

    def _prompt(self, request: DescriptionRequest) -> dict:
        return {"messages": [{"role": "user", "content": self._content(request)}]}

    @staticmethod
    def _text(choice: dict) -> str | None:
        return choice["message"]["content"]

    def _content(self, request: DescriptionRequest) -> list[dict]:
        pair = request.pair
        images = [
            image_data_url(pair.query_jpeg, pair.pair_id, "query", self.image_max_side),
            image_data_url(pair.target_jpeg, pair.pair_id, "target", self.image_max_side),
        ]
        return [
            *({"type": "image_url", "image_url": {"url": url}} for url in images),
            {"type": "text", "text": self.render_prompt(request)},
        ]

    def describe(self, requests_: Sequence[DescriptionRequest]) -> list[str]:
        for request in requests_:  # a bad image fails the batch before anything is sent
            self._content(request)
        return self._run(requests_)
