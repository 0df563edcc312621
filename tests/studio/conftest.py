"""Fixtures the studio tests share."""

import pytest
from sam_server import running_segmenter


@pytest.fixture(scope="module")
def sam():
    """The segmentation service's stand-in, on loopback, for one test module."""
    with running_segmenter() as segmenter:
        yield segmenter
