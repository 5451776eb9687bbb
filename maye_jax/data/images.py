"""The images of a record, read as transformers' processors read them.

Every path that turns a record into model inputs (training, SFT, evaluation, scoring) gets its
pixels from one `ImageSource`: an image file named by the data (jsonl, or a `path` in a parquet
or `save_to_disk` row without bytes), or image bytes embedded in a parquet / Arrow file.

- When the data is prepared, only each image's header is read (`ImageSource.read_header`:
  format, size, mode): enough to refuse bytes that are not an image, and to count the prompt's
  image tokens from the size (`Record.image_sizes`). No pixels are decoded then.
- When a batch needs the pixels, `ImageSource.decode` decodes the image in its stored mode
  (RGBA, LA, P with transparency, L, CMYK, 16-bit, ...), and `to_rgb` converts it as
  transformers' `convert_to_rgb` does (both of its image-processor backends apply it to a PIL
  image): transparency composited onto white, every other mode through PIL's own conversion.
  Converting to RGB any earlier would drop the alpha channel that transformers composites.

Embedded bytes stay in their Arrow buffers (memory-mapped for a `save_to_disk` folder) until a
decode copies one image out. This module imports no JAX.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any, NamedTuple

from PIL import Image, UnidentifiedImageError

from maye_jax.errors import UserError


class ImageError(UserError, ValueError):
    """An image that cannot be read; the message names where it is (file:row, image k)."""


class ImageSize(NamedTuple):
    """An image's stored size in pixels, before any resize (PIL's order: width, height)."""

    width: int
    height: int


# Full decodes in this process (pixels, not headers): what the tests count during preparation.
_decodes = 0


def decode_count() -> int:
    """How many images this process has decoded in full so far."""
    return _decodes


@dataclasses.dataclass(frozen=True)
class EmbeddedBytes:
    """Image bytes embedded in a data file: item `index` of an Arrow binary array (no copy is
    made until `read`), or plain bytes."""

    array: Any = dataclasses.field(repr=False)  # pyarrow BinaryArray / LargeBinaryArray, or bytes
    index: int = 0

    def read(self) -> bytes:
        if isinstance(self.array, bytes):
            return self.array
        return self.array[self.index].as_py()


@dataclasses.dataclass(frozen=True, slots=True)
class ImageSource:
    """One image of a record: a file (`path`) or embedded bytes (`embedded`), with its header
    (`format`, `size`, `mode`) read when the data was prepared. `where` names it in messages
    (`data.parquet:row 17: image 2`)."""

    where: str
    format: str
    size: ImageSize
    mode: str
    path: str | None = None
    embedded: EmbeddedBytes | None = None

    @classmethod
    def read_header(
        cls, where: str, *, path: str | None = None, embedded: EmbeddedBytes | None = None
    ) -> ImageSource:
        """The source with its header read (PIL reads no pixels to open an image); raises
        ImageError naming `where` when the file is missing or its bytes are not an image."""
        if (path is None) == (embedded is None):
            raise ValueError("an image source is a path or embedded bytes, not both")
        try:
            with _open(path, embedded) as image:
                return cls(
                    where, image.format or "", ImageSize(*image.size), image.mode, path, embedded
                )
        except FileNotFoundError:
            raise ImageError(f"{where}: image file {path} not found") from None
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as error:
            raise ImageError(f"{where}: not an image ({_reason(error)})") from None

    def decode(self) -> Image.Image:
        """The image's pixels, decoded in its stored mode (convert with `to_rgb`)."""
        global _decodes
        try:
            with _open(self.path, self.embedded) as image:
                image.load()
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as error:
            raise ImageError(
                f"{self.where}: the image does not decode ({_reason(error)})"
            ) from None
        _decodes += 1
        return image


def _open(path: str | None, embedded: EmbeddedBytes | None) -> Image.Image:
    if path is not None:
        return Image.open(path)
    return Image.open(io.BytesIO(embedded.read()))


def _reason(error: Exception) -> str:
    text = str(error).split("\n")[0]
    return text if len(text) < 160 else text[:157] + "..."


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as transformers' `convert_to_rgb` makes it: an image with transparency (an alpha
    band, or a `transparency` entry: P / L / RGB with a transparent colour) is composited onto
    opaque white; any other mode goes through PIL's `convert("RGB")`."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
