"""Client of the segmentation service (the studio's SAM server): masks from points or text, object detection.

Points and labels go as JSON; nothing a client sends is ever evaluated. Every call has a timeout; a service
that is down or answers nonsense becomes a `SegmentationError` the routes turn into a 502/503.
"""

import json
import time
from dataclasses import dataclass

import httpx

HEALTH_TIMEOUT_S = 3.0


class SegmentationError(Exception):
    """The service failed or could not be reached; `unavailable` tells the two apart."""

    def __init__(self, message: str, unavailable: bool = False):
        super().__init__(message)
        self.unavailable = unavailable


@dataclass(frozen=True)
class Health:
    online: bool
    latency_ms: float | None
    status: str


class SegmentationClient:
    def __init__(self, base_url: str, timeout_s: float = 30.0, transport: httpx.AsyncBaseTransport | None = None):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._transport = transport

    async def health(self) -> Health:
        started = time.monotonic()
        try:
            async with self._client(HEALTH_TIMEOUT_S) as client:
                response = await client.get("/health")
        except httpx.HTTPError as err:
            return Health(False, None, f"unreachable: {type(err).__name__}")
        latency = round((time.monotonic() - started) * 1000, 1)
        return Health(response.is_success, latency, "ok" if response.is_success else f"HTTP {response.status_code}")

    async def mask_from_points(self, image: bytes, points: list[list[float]], labels: list[int]) -> bytes:
        """One best mask (PNG, 0/255) for the foreground `points` [[x, y], ...] with `labels` (1 in, 0 out)."""
        data = {"points": json.dumps(points), "labels": json.dumps(labels), "multimask": "false"}
        return await self._png("/predict/mask", image, data)

    async def mask_from_text(self, image: bytes, text: str, confidence: float = 0.5) -> bytes:
        """The merged mask (PNG) of everything matching `text`; all black when nothing does."""
        return await self._png("/segment/text", image, {"text": text, "confidence": str(confidence)})

    async def detect(self, image: bytes, text: str, confidence: float = 0.5) -> dict:
        """`{objects: [{id, mask, bbox, score, label}], count, prompt}` as the service reports it."""
        response = await self._post("/detect", image, {"text": text, "confidence": str(confidence)})
        try:
            found = response.json()
        except ValueError:
            raise SegmentationError("the segmentation service answered /detect with non-JSON") from None
        if not isinstance(found, dict) or not isinstance(found.get("objects"), list):
            raise SegmentationError("the segmentation service's /detect answer has no `objects` list")
        return found

    async def _png(self, path: str, image: bytes, data: dict) -> bytes:
        response = await self._post(path, image, data)
        if not response.content.startswith(b"\x89PNG"):
            raise SegmentationError(f"the segmentation service answered {path} with something other than a PNG")
        return response.content

    async def _post(self, path: str, image: bytes, data: dict) -> httpx.Response:
        try:
            async with self._client(self.timeout_s) as client:
                response = await client.post(path, files={"image": ("image.png", image)}, data=data)
        except httpx.TimeoutException as err:
            raise SegmentationError(f"the segmentation service took over {self.timeout_s} s", True) from err
        except httpx.HTTPError as err:
            what = f"the segmentation service at {self.base_url} is not reachable ({type(err).__name__})"
            raise SegmentationError(what, unavailable=True) from err
        if not response.is_success:
            raise SegmentationError(f"the segmentation service answered {path} with HTTP {response.status_code}")
        return response

    def _client(self, timeout: float) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, timeout=timeout, transport=self._transport)
