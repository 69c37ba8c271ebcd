"""Grid captions: written in a font that covers Greek and Cyrillic, and a warning naming the
characters it lacks."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from dalle_ar.grid import NO_CHAR, captioned_grid

TILES = [np.full((8, 8, 3), 255, np.uint8)] * 2


def _caption(text: str) -> np.ndarray:
    return np.asarray(captioned_grid(TILES, text))


@pytest.mark.parametrize("letter", ["α", "Ω", "ж", "Я"])
def test_greek_and_cyrillic_captions_are_drawn_as_letters(letter):
    box = _caption(NO_CHAR)  # a character no font has: the font's "no glyph" box
    assert not np.array_equal(_caption("a"), box)  # the comparison tells a letter from a box
    assert not np.array_equal(_caption(letter), box)


def test_a_character_the_font_lacks_is_named_in_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="dalle_ar.grid"):
        captioned_grid(TILES, "a red 中 circle α")
    warned = [r.getMessage() for r in caplog.records if "no glyph" in r.getMessage()]
    assert len(warned) == 1
    assert warned[0].startswith("the caption font has no glyph for 中:")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dalle_ar.grid"):
        captioned_grid(TILES, "a red circle α ж")
    assert "no glyph" not in caplog.text


def test_a_word_wider_than_the_grid_widens_the_picture_and_is_not_cut():
    from dalle_ar.grid import image_grid

    grid = image_grid(TILES)
    one_line = captioned_grid(TILES, "a")
    word = captioned_grid(TILES, "supercalifragilisticexpialidocious")
    assert word.width > grid.width == one_line.width  # widened, where a short caption is not
    assert word.height == one_line.height  # one line: the word was not broken in two
    caption = np.asarray(word.convert("L"))[: word.height - grid.height]
    assert (caption[:, grid.width :] < 128).any()  # the word goes on past the grid's width
