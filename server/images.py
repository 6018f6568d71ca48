"""Encoded image bytes -> the model's normalised input rows, as the deploy config's preprocessing says."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from server.errors import InvalidArgument
from server.settings import PreprocessingSettings

ALLOWED_FORMATS = ("JPEG", "PNG")


class ImagePreprocessor:
    """Decodes JPEG/PNG bytes and applies resize, centre crop and normalisation. Thread-safe."""

    def __init__(self, settings: PreprocessingSettings, max_pixels: int) -> None:
        self._settings = settings
        self._max_pixels = max_pixels
        self._mode = "L" if settings.channels == 1 else "RGB"
        # NOTE: (x/255 - mean)/std folded into one multiply-add per pixel.
        std = np.asarray(settings.std, dtype=np.float32)
        self._scale = (1.0 / (255.0 * std)).reshape(-1, 1, 1)
        self._offset = (-np.asarray(settings.mean, dtype=np.float32) / std).reshape(-1, 1, 1)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self._settings.channels, self._settings.crop, self._settings.crop)

    def __call__(self, data: bytes, index: int = 0) -> np.ndarray:
        """One encoded image -> float32 (C, H, W). ``index`` names the image in error messages."""
        image = self._decode(data, index)
        image = self._resize_and_crop(image)
        pixels = np.asarray(image, dtype=np.float32)
        if pixels.ndim == 2:
            pixels = pixels[None]
        else:
            pixels = pixels.transpose(2, 0, 1)
        return pixels * self._scale + self._offset

    def _decode(self, data: bytes, index: int) -> Image.Image:
        if not data:
            raise InvalidArgument(f"image {index} is empty (0 bytes)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
                width, height = image.size
                if width * height > self._max_pixels:
                    raise InvalidArgument(
                        f"image {index} is {width}x{height} = {width * height} pixels, more than the "
                        f"limit of {self._max_pixels}"
                    )
                if image.format == "JPEG":
                    # NOTE: lets libjpeg decode at a reduced scale when the target is much smaller.
                    image.draft(self._mode, (self._settings.resize, self._settings.resize))
                image.load()
        except InvalidArgument:
            raise
        except UnidentifiedImageError:
            raise InvalidArgument(
                f"image {index} is not a {' or '.join(ALLOWED_FORMATS)} image ({len(data)} bytes)"
            ) from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise InvalidArgument(f"image {index} cannot be decoded (corrupt or truncated): {exc}") from None
        return image.convert(self._mode) if image.mode != self._mode else image

    def _resize_and_crop(self, image: Image.Image) -> Image.Image:
        resize, crop = self._settings.resize, self._settings.crop
        width, height = image.size
        scale = resize / min(width, height)
        new_size = (max(crop, round(width * scale)), max(crop, round(height * scale)))
        if new_size != image.size:
            image = image.resize(new_size, Image.Resampling.BILINEAR)
        left = (new_size[0] - crop) // 2
        top = (new_size[1] - crop) // 2
        if (left, top) == (0, 0) and new_size == (crop, crop):
            return image
        return image.crop((left, top, left + crop, top + crop))
