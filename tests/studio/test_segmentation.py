"""The segmentation client against a stand-in SAM service on 127.0.0.1, and with the service down."""

import asyncio
import io
import json

import pytest
from PIL import Image
from sam_server import running_segmenter

from flux2.studio.segmentation import SegmentationClient, SegmentationError


def image_bytes(w: int = 96, h: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (w, h), "gray").save(buffer, format="PNG")
    return buffer.getvalue()


def test_points_text_and_detection_with_json_fields():
    with running_segmenter() as sam:
        client = SegmentationClient(sam.url, timeout_s=5)
        health = asyncio.run(client.health())
        mask = Image.open(io.BytesIO(asyncio.run(client.mask_from_points(image_bytes(), [[48, 32]], [1]))))
        text_mask = asyncio.run(client.mask_from_text(image_bytes(), "the left half"))
        found = asyncio.run(client.detect(image_bytes(), "cat"))
    assert health.online and health.latency_ms is not None
    assert mask.mode == "L" and mask.getpixel((48, 32)) == 255 and mask.getpixel((0, 0)) == 0
    assert Image.open(io.BytesIO(text_mask)).getpixel((10, 10)) == 255
    assert found["count"] == 1 and found["objects"][0]["label"] == "cat"
    path, fields = sam.requests[0]
    assert path == "/predict/mask" and json.loads(fields["points"]) == [[48, 32]] and fields["labels"] == "[1]"


def test_a_service_that_is_down_is_reported_not_raised_from_deep_inside():
    with running_segmenter() as sam:
        url = sam.url
    client = SegmentationClient(url, timeout_s=2)  # the server is gone: nothing listens there now
    health = asyncio.run(client.health())
    assert not health.online and health.status.startswith("unreachable")
    with pytest.raises(SegmentationError, match="is not reachable") as err:
        asyncio.run(client.mask_from_points(image_bytes(), [[1, 1]], [1]))
    assert err.value.unavailable
