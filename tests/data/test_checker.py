import json

import numpy as np
import pytest
import torch

from dalle_ar.data import evaluate, shapes


def _blur(img: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur, edges replicated: a stand-in for a VQ reconstruction."""
    f = np.pad(img.astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    k = (0.25, 0.5, 0.25)
    h, w = img.shape[:2]
    g = sum(k[i] * f[i : i + h] for i in range(3))
    g = sum(k[j] * g[:, j : j + w] for j in range(3))
    return (g + 0.5).astype(np.uint8)


def _one(color="red", shape="circle", size="small", row=0, col=0):
    obj = {"color": color, "shape": shape, "size": size, "row": row, "col": col}
    return {"objects": [obj], "relation": None, "held_out": False, "split": "eval"}


def test_ground_truth_eval_renders_read_back_exactly():
    data = list(shapes.generate(300, seed=11, split="eval"))
    res = evaluate.score_batch([d[0] for d in data], [d[2] for d in data])
    assert res["exact"] == 1.0 and res["n"] == 300
    assert res["n_held_out"] > 50 and res["n_seen"] > 50


def test_blurred_renders_still_read_back():
    data = list(shapes.generate(200, seed=12, split="eval"))
    res = evaluate.score_batch([_blur(d[0]) for d in data], [d[2] for d in data])
    assert res["exact"] >= 0.98


@pytest.mark.parametrize("size", [24, 64])
def test_other_canvas_sizes(size):
    data = list(shapes.generate(60, seed=13, split="train", size=size))
    assert evaluate.score_batch([d[0] for d in data], [d[2] for d in data])["exact"] == 1.0


def test_read_scene_reports_every_attribute():
    spec = _one("blue", "triangle", "large", 2, 1)
    (obj,) = evaluate.read_scene(shapes.render(spec))
    assert {k: obj[k] for k in ("color", "shape", "size", "row", "col")} == spec["objects"][0]


def test_shape_features_do_not_change_under_blur():
    for shape in shapes.SHAPES:
        m = np.pad(shapes.shape_mask(shape, 10), 3).astype(np.float64)
        img = np.repeat(m[..., None], 3, axis=2)
        blurred = _blur((img * 200).astype(np.uint8)).astype(np.float64)[..., 0] / 200
        a, b = evaluate.shape_features(m), evaluate.shape_features(blurred)
        assert np.allclose(a[:3], b[:3], rtol=0.01, atol=0.02), (shape, a, b)


def test_wrong_colour_is_caught_and_only_colour():
    img = shapes.render(_one("red", "circle"))
    res = evaluate.score(img, _one("pink", "circle"))
    assert res["color"] is False and res["exact"] is False
    assert res["shape"] and res["size"] and res["position"] and res["count"]


def test_wrong_shape_size_and_cell_are_caught():
    img = shapes.render(_one("green", "square", "large", 1, 1))
    assert evaluate.score(img, _one("green", "diamond", "large", 1, 1))["shape"] is False
    assert evaluate.score(img, _one("green", "square", "small", 1, 1))["size"] is False
    assert evaluate.score(img, _one("green", "square", "large", 1, 2))["position"] is False


def test_blank_image_fails_count():
    blank = np.full((32, 32, 3), shapes.BACKGROUND_RGB, np.uint8)
    res = evaluate.score(blank, _one())
    assert res["count"] is False and res["exact"] is False and res["color"] is False


def test_relation_is_scored_and_decides_exact():
    a = {"color": "red", "shape": "square", "size": "small", "row": 1, "col": 0}
    b = {"color": "blue", "shape": "circle", "size": "large", "row": 1, "col": 2}
    spec = {"objects": [a, b], "relation": "left of"}
    img = shapes.render(spec)
    assert evaluate.score(img, spec)["exact"] is True
    # the same image read against the opposite claim: colours etc. match, the relation not
    res = evaluate.score(img, {**spec, "relation": "right of"})
    assert res["relation"] is False and res["exact"] is False and res["color"] is True


def test_accepts_float_chw_tensors():
    spec = _one("yellow", "diamond", "large", 0, 2)
    t = torch.from_numpy(shapes.render(spec)).permute(2, 0, 1).float() / 255
    assert evaluate.score(t, spec)["exact"] is True


def test_score_batch_is_jsonable_and_rejects_bad_input():
    data = list(shapes.generate(4, seed=0, split="eval"))
    res = evaluate.score_batch([d[0] for d in data], [d[2] for d in data])
    assert json.loads(json.dumps(res)) == res
    assert set(evaluate.ATTRIBUTES) <= set(res)
    with pytest.raises(ValueError, match="spec"):
        evaluate.score_batch([data[0][0]], [])
    with pytest.raises(ValueError, match="RGB"):
        evaluate.read_scene(np.zeros((32, 30), np.uint8))
