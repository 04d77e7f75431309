"""A scriptable OpenAI-style chat-completions server on 127.0.0.1, for judge backend tests.

A real ``ThreadingHTTPServer`` on an ephemeral port, run in a thread. Each POST to
``/v1/chat/completions`` is answered by the next scripted ``Reply`` if any is left, else by the
``responder`` function. Every request is recorded (body and headers). Delays wait on an event
that ``stop()`` sets, so shutting down never waits on a sleeping handler.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from bdctl.judges.prompt import ANSWER_A_HEADER, ANSWER_B_HEADER, QUESTION

GOOD = "GOOD"


@dataclass
class Reply:
    """How to answer one request: a chat completion with ``content``, or a raw ``body``."""

    status: int = 200
    content: str | None = "Tie"
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    #: Never answer (until the server stops): a client timeout, whatever the machine's load.
    hang: bool = False


@dataclass
class Recorded:
    """One request as the server saw it."""

    body: dict[str, Any]
    headers: dict[str, str]


def answers_of(body: dict[str, Any]) -> tuple[str, str]:
    """The two answers shown in a judge request, as (A, B)."""
    user = next(message["content"] for message in body["messages"] if message["role"] == "user")
    pattern = (
        re.escape(ANSWER_A_HEADER) + r"\n(.*)\n\n" + re.escape(ANSWER_B_HEADER) + r"\n(.*)\n\n" + re.escape(QUESTION)
    )
    match = re.search(pattern, user, flags=re.S)
    if match is None:
        raise ValueError("request has no answer sections")
    return match.group(1), match.group(2)


def prefer_good(body: dict[str, Any]) -> Reply:
    """A deterministic judge: the answer containing ``GOOD`` wins; both or neither is a tie."""
    answer_a, answer_b = answers_of(body)
    a_good, b_good = GOOD in answer_a, GOOD in answer_b
    if a_good == b_good:
        return Reply(content="Tie")
    return Reply(content="A" if a_good else "B")


class ChatServer:
    """The server; use as a context manager or call ``start()`` / ``stop()``."""

    def __init__(
        self,
        responder: Callable[[dict[str, Any]], Reply] = prefer_good,
        script: Iterable[Reply] = (),
    ) -> None:
        self.responder = responder
        self._script: deque[Reply] = deque(script)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.recorded: list[Recorded] = []
        self._in_flight = 0
        #: The most chat-completion requests that were being handled at the same time.
        self.max_in_flight = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def count(self) -> int:
        """Chat-completion requests received so far."""
        with self._lock:
            return len(self.recorded)

    def push(self, *replies: Reply) -> None:
        """Script the next replies (answered before the responder is asked again)."""
        with self._lock:
            self._script.extend(replies)

    def start(self) -> ChatServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> ChatServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _next_reply(self, body: dict[str, Any], headers: dict[str, str]) -> Reply:
        with self._lock:
            self.recorded.append(Recorded(body=body, headers=headers))
            scripted = self._script.popleft() if self._script else None
        return scripted if scripted is not None else self.responder(body)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                if self.path != "/v1/chat/completions":
                    self._send(404, b'{"error": "not found"}', {})
                    return
                body = json.loads(raw)
                reply = server._next_reply(body, {k.lower(): v for k, v in self.headers.items()})
                with server._lock:
                    server._in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server._in_flight)
                try:
                    if reply.hang:
                        server._stopping.wait()
                        return
                    if reply.delay_s and server._stopping.wait(reply.delay_s):
                        return
                    self._answer(reply, body)
                finally:
                    with server._lock:
                        server._in_flight -= 1

            def _answer(self, reply: Reply, body: dict[str, Any]) -> None:
                payload = reply.body
                if payload is None:
                    payload = json.dumps(
                        {
                            "id": "chatcmpl-test",
                            "object": "chat.completion",
                            "model": body.get("model"),
                            "choices": [
                                {
                                    "index": 0,
                                    "message": {"role": "assistant", "content": reply.content},
                                    "finish_reason": "stop",
                                }
                            ],
                        }
                    ).encode()
                self._send(reply.status, payload, reply.headers)

            def _send(self, status: int, payload: bytes, headers: dict[str, str]) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test): nothing to answer

        return Handler


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
