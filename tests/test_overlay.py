"""Overlays a person can read (issue 22 item 7): the top classes with confidences, a legend of
the class colours, captions readable on any colour."""

from __future__ import annotations

import numpy as np

from hpa_kernel.classes import CLASS_NAMES, NUM_CLASSES
from hpa_kernel.formats.overlay import LEGEND_WIDTH, cell_caption, class_palette, render_overlay


def _one_cell(side: int = 160) -> np.ndarray:
    labels = np.zeros((side, side), np.int32)
    labels[10:-10, 10:-10] = 1
    return labels


def test_the_caption_names_the_top_classes_with_their_confidences():
    s = np.zeros(NUM_CLASSES)
    s[[0, 5, 16]] = [0.31, 0.82, 0.05]
    assert cell_caption(s) == [f"{CLASS_NAMES[5][:16]} 0.82", f"{CLASS_NAMES[0][:16]} 0.31"]
    assert cell_caption(np.zeros(NUM_CLASSES)) == []


def test_the_legend_shows_the_colour_of_each_top_class():
    labels = np.zeros((200, 200), np.int32)
    labels[:100], labels[100:] = 1, 2
    scores = np.zeros((2, NUM_CLASSES))
    scores[0, 3], scores[1, 14] = 0.9, 0.7
    out = render_overlay(np.full((200, 200, 4), 0.2, np.float32), labels, np.array([1, 2]), scores)
    assert out.shape == (200, 200 + LEGEND_WIDTH, 3)
    panel = out[:, 200:].reshape(-1, 3)
    palette = class_palette()
    for c in range(NUM_CLASSES):
        assert ((panel == palette[c]).all(axis=1).sum() >= 150) == (c in (3, 14)), c  # a 10x16 swatch


def test_captions_read_on_any_cell_colour():
    """White letters on a dark outline, whatever the image and class colour under them."""
    for c in range(NUM_CLASSES):
        for level in (0.0, 1.0):  # a black and a white composite
            scores = np.zeros((1, NUM_CLASSES))
            scores[0, c] = 0.9
            labels = _one_cell()
            out = render_overlay(np.full((160, 160, 4), level, np.float32), labels, np.array([1]), scores)
            centre = out[60:100, 40:120].reshape(-1, 3).astype(int)
            assert (centre.min(axis=1) >= 230).any(), (c, level)  # the letters
            assert (centre.max(axis=1) <= 30).any(), (c, level)  # their outline
