"""Shards as img2dataset writes them, for the tests of your own data (`dalle-ar data shards`,
the main job's `data=shards`):

    from _img2dataset import write_img2dataset
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

FAULTS = {(0, 3): "bad_image", (1, 5): "missing_caption", (1, 7): "bad_meta"}  # (shard, record)


def write_img2dataset(
    folder: Path, n: int = 10, pictures: Iterable[tuple[np.ndarray, str]] | None = None
) -> int:
    """Two shards `folder/0000{0,1}.tar` of `n` records each, KEY.jpg, KEY.txt and KEY.json
    adjacent per record; the records of `FAULTS` are broken as named there (a corrupt picture,
    no caption, JSON that does not parse). `pictures`: (uint8 image (H, W, 3), caption) pairs
    to use in turn (default: flat 24x40 greys captioned "photo KEY"). Returns the count of
    sound records."""
    folder.mkdir()
    given = iter(pictures) if pictures is not None else None
    for s in range(2):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(n):
                key = f"{s:05d}{i:04d}"
                img, cap = next(given) if given else (np.full((24, 40, 3), 20 * i, np.uint8),
                                                      f"photo {key}")  # fmt: skip
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, "JPEG", quality=95)
                meta = json.dumps({"url": f"http://x/{key}", "key": key}).encode()
                members = {"jpg": buf.getvalue(), "txt": cap.encode(), "json": meta}
                fault = FAULTS.get((s, i))
                if fault == "bad_image":
                    members["jpg"] = b"not a jpeg"
                elif fault == "missing_caption":
                    del members["txt"]
                elif fault == "bad_meta":
                    members["json"] = b"{broken"
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return 2 * n - len(FAULTS)
