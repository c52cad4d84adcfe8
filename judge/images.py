"""Images in, PNG data URLs and content hashes out. Accepts PIL images, HxWxC arrays and tensors."""
from __future__ import annotations

import base64
import hashlib
import io
import os
import threading
from collections import OrderedDict

import numpy as np
from PIL import Image


def to_pil(image) -> Image.Image:
    """A PIL RGB image from PIL / numpy (HxWx{1,3,4}, uint8 or float in [0,1]) / torch / a path."""
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as im:
                return im.convert("RGB")
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read image {os.fspath(image)!r}: {e}; check the path and file") from None
    if hasattr(image, "detach"):  # a torch tensor (ComfyUI IMAGE item: HxWxC float in [0,1])
        image = image.detach().cpu().float().numpy()
    array = np.asarray(image)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an HxWxC image with C in (1, 3, 4), got shape {tuple(array.shape)}")
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(array[..., :3]), "RGB")


def image_hash(image: Image.Image) -> str:
    """Content hash of the pixels (not of an encoding), so the same picture always hits the cache."""
    h = hashlib.sha256()
    h.update(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def fit(image: Image.Image, max_side: int | None) -> Image.Image:
    """Downscale so the longer side is at most ``max_side`` (keeps aspect ratio; never upscales)."""
    if not max_side or max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class DataUrlCache:
    """Recently encoded images by content hash: references repeat across a DDPO group and an epoch,
    and PNG-encoding a large image costs ~0.1 s of CPU. Bounded by total size."""

    def __init__(self, max_bytes: int = 64 << 20):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, str] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, digest: str, image: Image.Image) -> str:
        with self._lock:
            url = self._items.get(digest)
            if url is not None:
                self._items.move_to_end(digest)
                return url
        url = png_data_url(image)  # outside the lock: other threads keep encoding
        with self._lock:
            if digest not in self._items and len(url) <= self.max_bytes:
                self._items[digest] = url
                self._size += len(url)
                while self._size > self.max_bytes:
                    _, old = self._items.popitem(last=False)
                    self._size -= len(old)
        return url


DATA_URLS = DataUrlCache()
