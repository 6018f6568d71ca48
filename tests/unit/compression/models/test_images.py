from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from compression.models.images import ImagePreprocessor
from compression.models.settings import PreprocessingSettings
from protos.errors import InvalidArgument


def encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def test_rgb_resize_crop_normalise() -> None:
    settings = PreprocessingSettings(channels=3, resize=8, crop=4, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    image = np.zeros((16, 32, 3), np.uint8)
    image[..., 0] = 255
    out = ImagePreprocessor(settings, max_pixels=10_000)(encode(image, "PNG"))
    assert out.shape == (3, 4, 4) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], 1.0, atol=1e-6)
    np.testing.assert_allclose(out[1:], -1.0, atol=1e-6)


def test_grayscale_conversion_of_jpeg() -> None:
    settings = PreprocessingSettings(channels=1, resize=28, crop=28, mean=(0.0,), std=(1.0,))
    rgb = np.full((56, 56, 3), 128, np.uint8)
    out = ImagePreprocessor(settings, max_pixels=10_000)(encode(rgb, "JPEG"))
    assert out.shape == (1, 28, 28)
    assert abs(float(out.mean()) - 128 / 255) < 0.02


def test_pixel_limit_and_disallowed_format() -> None:
    settings = PreprocessingSettings(channels=1, resize=28, crop=28, mean=(0.0,), std=(1.0,))
    preprocess = ImagePreprocessor(settings, max_pixels=100)
    with pytest.raises(InvalidArgument, match="more than the limit of 100"):
        preprocess(encode(np.zeros((20, 20), np.uint8), "PNG"), 3)
    with pytest.raises(InvalidArgument, match="image 0 is a BMP image; this server accepts JPEG, PNG"):
        preprocess(encode(np.zeros((5, 5), np.uint8), "BMP"))
    with pytest.raises(InvalidArgument, match="image 0 is not a JPEG or PNG image"):
        preprocess(b"\x00\x01 not an image")
