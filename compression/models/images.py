"""Encoded image bytes -> the model's normalised input rows, as the deploy config's preprocessing says."""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from compression.models.settings import PreprocessingSettings
from protos.errors import InvalidArgument

ALLOWED_FORMATS = ("JPEG", "PNG")
"""The default of ``server.allowed_image_formats``."""
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)


def sniff_format(data: bytes) -> str | None:
    """The image format ``data`` claims by its first bytes (for error messages), or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for signature, name in _SIGNATURES if data.startswith(signature)), None)


class ImagePreprocessor:
    """Decodes images of the allowed formats and applies resize, centre crop and normalisation. Thread-safe."""

    def __init__(
        self, settings: PreprocessingSettings, max_pixels: int, allowed_formats: Sequence[str] = ALLOWED_FORMATS
    ) -> None:
        self._settings = settings
        self._max_pixels = max_pixels
        self._formats = tuple(allowed_formats)
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
        claimed = sniff_format(data)
        if claimed is not None and claimed not in self._formats:
            raise InvalidArgument(
                f"image {index} is a {claimed} image; this server accepts {', '.join(self._formats)} "
                "(server.allowed_image_formats)"
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data), formats=self._formats)
                width, height = image.size
                if width * height > self._max_pixels:
                    raise InvalidArgument(
                        f"image {index} is {width}x{height} = {width * height} pixels, more than the "
                        f"limit of {self._max_pixels}"
                    )
                resized = self._resized_size(width, height)
                if resized[0] * resized[1] > self._max_pixels:  # a 1 x 10^7 strip would grow 28x28-fold
                    raise InvalidArgument(
                        f"image {index} is {width}x{height}: resized to a shorter side of {self._settings.resize} "
                        f"it would have {resized[0] * resized[1]} pixels, more than the limit of {self._max_pixels}"
                    )
                if image.format == "JPEG":
                    # NOTE: lets libjpeg decode at a reduced scale when the target is much smaller.
                    image.draft(self._mode, (self._settings.resize, self._settings.resize))
                image.load()
                return image.convert(self._mode) if image.mode != self._mode else image
        except InvalidArgument:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise InvalidArgument(f"image {index} has more pixels than the limit of {self._max_pixels}: {exc}") from exc
        except UnidentifiedImageError:
            if claimed is not None:
                raise InvalidArgument(f"image {index} is a corrupt {claimed} image ({len(data)} bytes)") from None
            raise InvalidArgument(
                f"image {index} is not a {' or '.join(self._formats)} image ({len(data)} bytes)"
            ) from None
        except Exception as exc:  # noqa: BLE001 - decoders raise many types on hostile input; all are the input's fault
            raise InvalidArgument(f"image {index} cannot be decoded (corrupt or truncated): {exc}") from None

    def _resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) once the shorter side is resized to ``resize`` (never below ``crop``)."""
        crop = self._settings.crop
        scale = self._settings.resize / max(1, min(width, height))
        return (max(crop, round(width * scale)), max(crop, round(height * scale)))

    def _resize_and_crop(self, image: Image.Image) -> Image.Image:
        crop = self._settings.crop
        new_size = self._resized_size(*image.size)
        if new_size != image.size:
            image = image.resize(new_size, Image.Resampling.BILINEAR)
        left = (new_size[0] - crop) // 2
        top = (new_size[1] - crop) // 2
        if (left, top) == (0, 0) and new_size == (crop, crop):
            return image
        return image.crop((left, top, left + crop, top + crop))
