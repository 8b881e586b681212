"""Reading an image file for a vision-language model: one RGB picture, or one clear error."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from seshu.errors import UserError, first_line


def load_image(path: str | Path) -> Image.Image:
    """The image at `path` as an RGB `PIL.Image`, fully read (the file is closed on return).

    RGB because CLIP's image processors normalise three channels: a greyscale, palette or RGBA file would
    otherwise reach them with one, one or four. Raises `UserError` for a missing file and for a file Pillow
    cannot decode (a text file, truncated or corrupt bytes).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: image file not found")
    try:
        with Image.open(path) as image:
            # convert() decodes every pixel, so a file truncated after a valid header fails here, not later.
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        # Pillow reports a bad header as UnidentifiedImageError, truncated data as OSError, and some broken
        # formats (a malformed PNG chunk) as SyntaxError or ValueError.
        raise UserError(f"{path}: not a readable image ({first_line(exc)})") from None
