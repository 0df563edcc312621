"""A stand-in OpenAI-compatible chat-completions API: a real HTTP server on loopback with scripted replies."""

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from loopback import serving


@dataclass
class Reply:
    status: int = 200
    body: bytes | dict = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict
    at: float


def completion(content: Any) -> dict:
    message = {"role": "assistant", "content": content}
    return {"id": "gen-1", "object": "chat.completion", "choices": [{"index": 0, "message": message}]}


class ChatServer:
    """Answers POSTs with the scripted replies in order, then with `default`; records every request."""

    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.default = Reply(500, {"error": {"message": "unscripted request"}})
        self.received: list[Received] = []
        self.base_url = ""
        self._lock = threading.Lock()

    def next_reply(self, request: Received) -> Reply:
        with self._lock:
            self.received.append(request)
            return self.replies.pop(0) if self.replies else self.default


class ChatHandler(BaseHTTPRequestHandler):
    server: Any

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        headers = {k.lower(): v for k, v in self.headers.items()}
        request = Received(self.path, headers, json.loads(raw), time.monotonic())
        reply = self.server.chat.next_reply(request)
        time.sleep(reply.delay)
        body = json.dumps(reply.body).encode() if isinstance(reply.body, dict) else reply.body
        try:
            self.send_response(reply.status)
            reply_headers = {"Content-Type": "application/json", **reply.headers, "Content-Length": str(len(body))}
            for name, value in reply_headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up (timeout test)
            pass

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def running_chat_server() -> Iterator[ChatServer]:
    """A real HTTP server on 127.0.0.1 (free port) speaking the chat-completions format, stopped on exit."""
    with serving(ChatHandler) as httpd:
        httpd.chat = ChatServer()
        httpd.chat.base_url = f"{httpd.url}/api/v1"
        yield httpd.chat
