"""Shards as img2dataset writes them, for the tests of your own data (`dalle-ar data shards`,
the main job's `data=shards`):

    from _img2dataset import write_img2dataset
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

# (shard, record) -> how that record is broken, and the reason a reader skips it for
BREAKS = {(0, 3): ("a corrupt picture", "bad_image"), (1, 5): ("no caption", "missing_caption"),
          (1, 7): ("JSON that does not parse", "bad_meta"),
          (0, 6): ("JSON that is not an object", "bad_meta")}  # fmt: skip


def write_img2dataset(
    folder: Path, n: int = 10, pictures: Iterable[tuple[np.ndarray, str]] | None = None
) -> tuple[int, Counter]:
    """Two shards `folder/0000{0,1}.tar` of `n` records each, KEY.jpg, KEY.txt and KEY.json
    adjacent per record; the records of `BREAKS` (those below `n`) are broken as named there.
    `pictures`: (uint8 image (H, W, 3), caption) pairs to use in turn (default: flat 24x40
    greys captioned "photo KEY"). Returns the count of sound records and the skips expected, by
    reason."""
    folder.mkdir()
    given = iter(pictures) if pictures is not None else None
    skips: Counter = Counter()
    for s in range(2):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(n):
                key = f"{s:05d}{i:04d}"
                img, cap = next(given) if given else (np.full((24, 40, 3), 20 * i % 256, np.uint8),
                                                      f"photo {key}")  # fmt: skip
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, "JPEG", quality=95)
                meta = json.dumps({"url": f"http://x/{key}", "key": key}).encode()
                members = {"jpg": buf.getvalue(), "txt": cap.encode(), "json": meta}
                broken, reason = BREAKS.get((s, i), (None, None))
                if broken == "a corrupt picture":
                    members["jpg"] = b"not a jpeg"
                elif broken == "no caption":
                    del members["txt"]
                elif broken == "JSON that does not parse":
                    members["json"] = b"{broken"
                elif broken == "JSON that is not an object":
                    members["json"] = b"[1, 2]"
                if reason:
                    skips[reason] += 1
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return 2 * n - sum(skips.values()), skips
