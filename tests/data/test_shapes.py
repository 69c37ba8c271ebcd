import json
import random
import re
from collections import Counter

import numpy as np
import pytest

from dalle_ar.data import shapes


def test_generate_is_deterministic_and_seed_dependent():
    a = list(shapes.generate(20, seed=3, split="train"))
    b = list(shapes.generate(20, seed=3, split="train"))
    c = list(shapes.generate(20, seed=4, split="train"))
    assert all(np.array_equal(x[0], y[0]) and x[1:] == y[1:] for x, y in zip(a, b))
    assert [x[1] for x in a] != [x[1] for x in c]


def test_image_dtype_shape_and_spec_is_jsonable():
    for img, cap, spec in shapes.generate(10, seed=0, split="eval", size=48):
        assert img.dtype == np.uint8 and img.shape == (48, 48, 3)
        assert isinstance(cap, str) and cap
        assert json.loads(json.dumps(spec)) == spec


def test_attribute_space_meets_the_spec():
    assert len(shapes.COLORS) >= 6 and len(shapes.SHAPES) >= 4 and len(shapes.SIZES) >= 2
    assert len(shapes.HELD_OUT_COMBOS) >= 1
    for color, shape in shapes.HELD_OUT_COMBOS:
        assert color in shapes.COLORS and shape in shapes.SHAPES


def test_train_split_never_contains_held_out_combos():
    rng = random.Random(0)
    for _ in range(2000):
        spec = shapes.sample_spec(rng, "train")
        assert not spec["held_out"]
        assert all((o["color"], o["shape"]) not in shapes.HELD_OUT_COMBOS for o in spec["objects"])


def test_eval_split_mixes_seen_and_held_out_scenes():
    rng = random.Random(0)
    specs = [shapes.sample_spec(rng, "eval") for _ in range(400)]
    held = [s["held_out"] for s in specs]
    assert 0.3 < np.mean(held) < 0.7
    for s in specs:
        flags = [(o["color"], o["shape"]) in shapes.HELD_OUT_COMBOS for o in s["objects"]]
        assert [o["held_out"] for o in s["objects"]] == flags and s["held_out"] == any(flags)


def test_relations_hold_geometrically():
    rng = random.Random(1)
    seen = set()
    for _ in range(500):
        spec = shapes.sample_spec(rng, "train")
        if spec["relation"] is None:
            assert len(spec["objects"]) == 1
            continue
        a, b = spec["objects"]
        seen.add(spec["relation"])
        assert (a["row"], a["col"]) != (b["row"], b["col"])
        assert {
            "left of": a["col"] < b["col"],
            "right of": a["col"] > b["col"],
            "above": a["row"] < b["row"],
            "below": a["row"] > b["row"],
        }[spec["relation"]]
    assert seen == set(shapes.RELATIONS)


def test_captions_are_paraphrased_and_name_the_attributes():
    spec = {
        "objects": [
            {
                "color": "red",
                "shape": "circle",
                "size": "small",
                "row": 0,
                "col": 0,
                "held_out": False,
            }
        ],
        "relation": None,
        "held_out": False,
        "split": "train",
    }
    rng = random.Random(0)
    caps = {shapes.caption(spec, rng) for _ in range(60)}
    assert len(caps) >= 8
    for c in caps:
        assert "red" in c and "circle" in c and ("top" in c or "upper" in c) and "left" in c


def test_render_draws_exact_colours_in_the_right_cell_without_overlap():
    spec = {
        "objects": [
            {"color": "blue", "shape": "square", "size": "large", "row": 1, "col": 1},
            {"color": "green", "shape": "square", "size": "large", "row": 1, "col": 2},
        ],
        "relation": "left of",
    }
    img = shapes.render(spec, 32)
    blue = np.all(img == shapes.COLORS["blue"], axis=-1)
    green = np.all(img == shapes.COLORS["green"], axis=-1)
    assert blue.sum() == 100 and green.sum() == 100
    ys, xs = np.nonzero(blue)
    assert 10 <= xs.min() and xs.max() <= 21 and 10 <= ys.min() and ys.max() <= 21
    # a background column separates neighbouring large objects
    gap = np.nonzero(green)[1].min() - xs.max()
    assert gap >= 2


def test_prompts_for_eval_filters_held_out():
    pairs = shapes.prompts_for_eval(30, seed=0, held_out=True)
    assert len(pairs) == 30 and all(s["held_out"] and s["split"] == "eval" for _, s in pairs)
    assert shapes.prompts_for_eval(5, seed=1) == shapes.prompts_for_eval(5, seed=1)


def test_bad_input_raises_value_error():
    with pytest.raises(ValueError, match="split"):
        shapes.sample_spec(random.Random(0), "test")
    with pytest.raises(ValueError, match="size"):
        shapes.render({"objects": []}, size=4)


def test_composed_prompt_adds_a_colour_and_a_shape_expert_per_object():
    from dalle_ar.prompts import split_prompt

    got = shapes.composed_prompt("a big pink diamond at the top")
    assert split_prompt(got) == (
        "a big pink diamond at the top",
        [("a big diamond at the top", 1.0), ("a big pink at the top", 1.0)],
    )
    words = lambda text: Counter(re.findall(r"[a-z]+", text))  # noqa: E731
    for _, cap, spec in shapes.generate(40, seed=1, split="eval"):
        scene, parts = split_prompt(shapes.composed_prompt(cap))
        assert scene == cap and len(parts) == 2 * len(spec["objects"])
        left_out = Counter()
        for part, weight in parts:  # each part leaves out one word ...
            assert weight == 1.0
            gone = words(cap) - words(part)
            assert sum(gone.values()) == 1 and not words(part) - words(cap)
            left_out += gone
        # ... and together they leave out each object's colour and shape once
        assert left_out == Counter(o[k] for o in spec["objects"] for k in ("color", "shape"))
    assert shapes.composed_prompt("no colours here") == "no colours here"


def test_every_foil_is_false_of_the_image_and_changes_one_attribute():
    """The attribute-binding probe's captions: the shape checker reads the true spec back from
    the rendered image and refuses every foil; a foil differs in the attribute of its kind."""
    from dalle_ar.data.evaluate import score

    rng, kinds = random.Random(0), Counter()
    for _ in range(40):
        spec = shapes.sample_spec(rng, "eval")
        img = shapes.render(spec)
        assert score(img, spec)["exact"]
        caption = shapes.plain_caption(spec)
        for kind, foils in shapes.foils(spec).items():
            for foil in foils:
                kinds[kind] += 1
                assert not score(img, foil)["exact"], (kind, foil)
                other = shapes.plain_caption(foil)
                assert other != caption
        rel = shapes.foils(spec)["relation"]
        assert (
            len(rel)
            == 4
            - sum(  # every relation the two objects do not stand in
                shapes._holds(r, *spec["objects"]) for r in shapes.RELATIONS
            )
            if spec["relation"]
            else rel == []
        )
    assert set(kinds) == set(shapes.FOIL_KINDS)  # 40 scenes meet every kind


def test_hard_negatives_are_false_and_reproducible():
    from dalle_ar.data.evaluate import score

    spec = shapes.sample_spec(random.Random(3), "train")
    a = shapes.hard_negative(spec, random.Random("k"))
    assert a == shapes.hard_negative(spec, random.Random("k")) and a
    img, kinds = shapes.render(spec), set()
    for seed in range(40):  # each a foil's caption: the checker refuses the foil on the image
        foil = shapes.random_foil(spec, random.Random(seed))
        assert not score(img, foil)["exact"]
        kinds |= {k for k, v in shapes.foils(spec).items() if foil in v}
    assert len(kinds) > 1 and score(img, spec)["exact"]


def test_foil_scenes_are_other_pictures_of_seen_pairs_the_checker_reads():
    """A foil scene is a training pair: another picture (no relation foil, which draws the same
    one), every colour-shape pair seen, and its rendered picture read back by the checker as its
    own spec and not as the scene's."""
    from dalle_ar.data.evaluate import score

    rng, kinds = random.Random(0), Counter()
    for _ in range(60):
        spec = shapes.sample_spec(rng, "train")
        foil = shapes.foil_scene(spec, random.Random(repr(spec)))
        assert foil == shapes.foil_scene(spec, random.Random(repr(spec)))  # the rng's draw
        by_kind = shapes.foils(spec)
        kind = next(k for k in shapes.IMAGE_FOIL_KINDS
                    if any(f["objects"] == foil["objects"] for f in by_kind[k]))  # fmt: skip
        kinds[kind] += 1
        assert not foil["held_out"]
        assert not any(shapes.is_held_out(o["color"], o["shape"]) for o in foil["objects"])
        assert not any(o["held_out"] for o in foil["objects"])
        img = shapes.render(foil)
        assert not np.array_equal(img, shapes.render(spec))
        assert score(img, foil)["exact"] and not score(img, spec)["exact"]
    assert set(kinds) == set(shapes.IMAGE_FOIL_KINDS)  # 60 scenes meet every kind
    # a red square's shape foils never make the held-out red triangle
    red = {"objects": [{"color": "red", "shape": "square", "size": "small", "row": 0, "col": 0,
                        "held_out": False}], "relation": None, "held_out": False}  # fmt: skip
    shapes_drawn = {shapes.random_foil(red, random.Random(s), ("shape",), seen_pairs=True)
                    ["objects"][0]["shape"] for s in range(50)}  # fmt: skip
    assert shapes_drawn == {"circle", "diamond"}


def test_count_foils_draw_one_object_twice_and_the_checker_counts_it():
    """Each count foil is the scene plus a copy of one of its objects in a free cell: its
    picture holds every object the spec names, the checker reads one object too many, and a
    caption of the scene is true of none of them."""
    from dalle_ar.data.evaluate import score

    rng = random.Random(3)
    for _ in range(30):
        spec = shapes.sample_spec(rng, "eval")
        objs, got = spec["objects"], shapes.count_foils(spec)
        assert len(got) == len(objs) * (9 - len(objs))  # each object into each free cell
        for foil in got:
            assert foil["objects"][: len(objs)] == objs and len(foil["objects"]) == len(objs) + 1
            extra = foil["objects"][-1]
            assert any(extra == {**o, "row": extra["row"], "col": extra["col"]} for o in objs)
            assert (extra["row"], extra["col"]) not in {(o["row"], o["col"]) for o in objs}
            verdict = score(shapes.render(foil), spec)
            assert not verdict["count"] and not verdict["exact"]
            assert score(shapes.render(foil), foil)["count"]  # the picture holds all of them


def test_describes_reads_a_caption_against_a_picture_as_the_checker_does():
    from dalle_ar.data.evaluate import score

    rng = random.Random(5)
    for _ in range(40):
        scene = shapes.sample_spec(rng, "eval")
        img = shapes.render(scene)
        assert shapes.describes(scene, scene)
        for foils in shapes.foils(scene).values():  # every foil is false of the picture
            assert not any(shapes.describes(f, scene) for f in foils)
        other = shapes.sample_spec(rng, "eval")
        assert shapes.describes(other, scene) == bool(score(img, other)["exact"])
        # the same picture with its objects listed the other way round
        listed = {**scene, "objects": scene["objects"][::-1]}
        assert shapes.describes(scene, listed) and score(shapes.render(listed), scene)["exact"]
