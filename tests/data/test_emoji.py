import collections
import json

import numpy as np
import pytest

from dalle_ar.data import emoji


@pytest.fixture(scope="module")
def pairs():
    return emoji.load_pairs()


@pytest.mark.parametrize(
    ("name", "code", "expected"),
    [
        (":woman_medium_skin_tone:", "1f469-1f3fd", "woman: medium skin tone"),
        (":man_feeding_baby_medium-dark_skin_tone:", "", "man feeding baby: medium-dark skin tone"),
        (
            ":people_wrestling_medium-light_skin_tone_light_skin_tone:",
            "",
            "people wrestling: medium-light skin tone, light skin tone",
        ),
        (":grinning_face:", "1f600", "grinning face"),
        (":Andorra:", "1f1e6-1f1e9", "flag: Andorra"),
        (":dark_sunglasses:", "1f576", "dark sunglasses"),
    ],
)
def test_caption_from_name(name, code, expected):
    assert emoji.caption_from_name(name, code) == expected


def test_base_key_drops_skin_tones_and_variation_selectors():
    assert emoji.base_key("1f469-1f3fd-200d-1f4bb") == "1f469-200d-1f4bb"
    assert emoji.base_key("1f9dc-1f3fd-200d-2640-fe0f") == "1f9dc-200d-2640"
    assert emoji.base_key("1f600") == "1f600"


def test_at_least_3000_named_pictures(pairs):
    assert len(pairs) >= 3000
    assert len({p.code for p in pairs}) == len(pairs)
    assert all(p.caption and not p.caption.startswith(":") for p in pairs)
    assert all("_" not in p.caption for p in pairs)


def test_split_keeps_every_variant_of_a_base_together(pairs):
    sides = collections.defaultdict(set)
    for p in pairs:
        sides[p.base_key].add(emoji.split_of(p.base_key))
    assert all(len(s) == 1 for s in sides.values())
    toned = [k for k in sides if sum(q.base_key == k for q in pairs) >= 5]
    assert len(toned) > 100  # skin-tone families exist and stay whole
    sizes = emoji.split_sizes(pairs)
    assert sizes["train"] + sizes["eval"] == len(pairs)
    assert 0.05 < sizes["eval_bases"] / (sizes["train_bases"] + sizes["eval_bases"]) < 0.15


def test_split_is_a_stable_hash():
    assert emoji.split_of("1f600") == emoji.split_of("1f600")
    assert {emoji.split_of(f"k{i}", 0.5) for i in range(50)} == {"train", "eval"}


def test_load_image_composites_on_grey(pairs):
    img = emoji.load_image(pairs[0])
    assert img.mode == "RGB" and img.size == (72, 72)
    assert img.getpixel((0, 0)) == (128, 128, 128)  # a transparent corner
    assert np.asarray(img).std() > 10  # something is drawn
    assert emoji.load_image(pairs[0], size=32).size == (32, 32)


def test_meta_is_jsonable(pairs):
    m = pairs[0].meta()
    assert json.loads(json.dumps(m)) == m and m["base"] == pairs[0].base_key
