"""A stand-in for the studio's segmentation (SAM) service on 127.0.0.1: the same routes and formats, masks that
follow simple rules (a square around each point; the left half for any text), and every request recorded."""

import base64
import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler

from loopback import serving
from PIL import Image

SQUARE = 16  # half the side of the square painted around each point


@dataclass
class Segmenter:
    url: str = ""
    requests: list[tuple[str, dict]] = field(default_factory=list)  # (path, form fields other than the image)


def form_fields(handler: BaseHTTPRequestHandler) -> tuple[dict[str, str], Image.Image | None]:
    body = handler.rfile.read(int(handler.headers["Content-Length"]))
    message = BytesParser(policy=HTTP).parsebytes(
        f"Content-Type: {handler.headers['Content-Type']}\r\n\r\n".encode() + body
    )
    fields, image = {}, None
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if name == "image":
            image = Image.open(io.BytesIO(payload))
        else:
            fields[name] = payload.decode()
    return fields, image


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class SegmenterHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self._send(200, b'{"status": "ok"}', "application/json")

    def do_POST(self) -> None:
        fields, image = form_fields(self)
        self.server.segmenter.requests.append((self.path, fields))
        mask = Image.new("L", image.size, 0)
        if self.path == "/predict/mask":
            for x, y in json.loads(fields["points"]):
                mask.paste(255, (int(x) - SQUARE, int(y) - SQUARE, int(x) + SQUARE, int(y) + SQUARE))
            return self._send(200, png(mask), "image/png")
        mask.paste(255, (0, 0, image.width // 2, image.height))
        if self.path == "/segment/text":
            return self._send(200, png(mask), "image/png")
        if self.path == "/detect":
            found = {"id": 0, "mask": base64.b64encode(png(mask)).decode(), "bbox": [0, 0, image.width // 2,
                     image.height], "score": 0.9, "label": fields.get("text", "")}  # fmt: skip
            return self._send(200, json.dumps({"objects": [found], "count": 1, "prompt": fields.get("text")}).encode(),
                              "application/json")  # fmt: skip
        self._send(404, b"{}", "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args) -> None:
        pass


@contextmanager
def running_segmenter() -> Iterator[Segmenter]:
    with serving(SegmenterHandler) as httpd:
        httpd.segmenter = Segmenter(url=httpd.url)
        yield httpd.segmenter
