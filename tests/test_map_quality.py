"""Map quality (bench/map_quality.py) on tiny constructed maps, and the digit boxes of
digits-on-photos (osr_data/composite.py) it is scored against."""
import numpy as np
import pytest

from backmix.bench.map_quality import cell_overlap, score_maps, top_k_weights


def test_cell_overlap_is_the_share_of_each_cell_inside_the_box():
    # 4 x 4 image, 2 x 2 grid: cells of 2 x 2 pixels.
    overlap = cell_overlap(np.array([[0, 0, 2, 2], [1, 1, 2, 2], [0, 1, 4, 3]]), image_size=4, grid=2)
    assert overlap.tolist() == [[[1.0, 0.0], [0.0, 0.0]],
                                [[0.25, 0.25], [0.25, 0.25]],
                                [[0.5, 1.0], [0.5, 1.0]]]


def test_top_k_weights_share_tied_places_evenly():
    maps = np.array([[[0.875, 0.5], [0.5, 0.125]],      # k = 2: one above, two tied for one place
                     [[0.5, 0.5], [0.5, 0.5]],          # all tied (generation 0)
                     [[0.25, 0.75], [0.5, 0.125]]])     # no tie
    assert top_k_weights(maps, 0.5).tolist() == [[[1.0, 0.5], [0.5, 0.0]],
                                                  [[0.5, 0.5], [0.5, 0.5]],
                                                  [[0.0, 1.0], [1.0, 0.0]]]


def test_scores_on_the_box_off_it_and_at_chance():
    boxes = np.array([[0, 0, 2, 2]] * 3)                 # the top-left cell of a 2 x 2 grid
    maps = np.array([[[0.875, 0.125], [0.125, 0.125]],  # k = 1: the top cell is the box
                     [[0.125, 0.875], [0.125, 0.125]],  # the top cell is background
                     [[0.5, 0.5], [0.5, 0.5]]])         # generation 0: chance
    s = score_maps(maps, boxes, image_size=4, top_k_ratio=0.25)
    assert s["precision"].tolist() == [1.0, 0.0, 0.25]
    assert s["recall"].tolist() == [1.0, 0.0, 0.25]
    assert s["chance_precision"].tolist() == [0.25] * 3 and s["chance_recall"].tolist() == [0.25] * 3


def test_partial_box_counts_by_area():
    # Box over the right half of a 4 x 4 image; k = 2 cells: the top-right one and a tie of two
    # for the second place (bottom-left off the box, bottom-right on it).
    maps = np.array([[[0.125, 0.875], [0.5, 0.5]]])
    s = score_maps(maps, np.array([[0, 2, 4, 2]]), image_size=4, top_k_ratio=0.5)
    assert s["precision"].tolist() == [0.75]            # (1 + 0.5) of the 2 cells' area in the box
    assert s["recall"].tolist() == [0.75]               # 1.5 of the box's 2 cells covered
    assert s["chance_precision"].tolist() == [0.5]


def test_composite_returns_the_box_it_drew_the_digit_in():
    from backmix.osr_data.composite import composite
    digit = np.zeros((8, 8))
    digit[3:5, 3:5] = 16                                 # a bright square in the digit's middle
    background = np.full((32, 32, 3), 200, np.uint8)
    image, box = composite(digit, background, np.random.default_rng(3))
    y, x, h, w = box.tolist()
    assert (h, w) == (24, 24) and 0 <= y <= 8 and 0 <= x <= 8
    outside = np.ones((32, 32), bool)
    outside[y:y + h, x:x + w] = False
    assert (image[outside] == 150).all()                 # the dimmed background, untouched
    assert (image[y + 11:y + 13, x + 11:x + 13] == 255).all()   # the strokes, where the box says


def test_digits_on_photos_boxes_are_those_of_each_image():
    from backmix.osr_data.composite import digits_on_photos
    d = digits_on_photos(prior=0.5, seed=0)
    for split in ("train", "test"):
        boxes = d[f"{split}_boxes"]
        assert boxes.shape == (len(d[f"{split}_images"]), 4)
        assert (boxes[:, 2:] == 24).all() and (boxes[:, :2] >= 0).all() and (boxes[:, :2] <= 8).all()
        # The brightest pixel of every image is a stroke: inside its digit's box.
        gray = d[f"{split}_images"].max(axis=-1)
        ys, xs = np.unravel_index(gray.reshape(len(gray), -1).argmax(axis=1), (32, 32))
        assert ((ys >= boxes[:, 0]) & (ys < boxes[:, 0] + 24) & (xs >= boxes[:, 1]) & (xs < boxes[:, 1] + 24)).all()
    assert len(np.unique(d["train_boxes"][:, :2], axis=0)) > 50   # placed at random, not at one place


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_uniform_maps_score_chance_on_any_box(ratio):
    rng = np.random.default_rng(0)
    boxes = np.column_stack([rng.integers(0, 9, (20, 2)), np.full((20, 2), 24)])
    s = score_maps(np.full((20, 8, 8), 0.5, np.float16), boxes, image_size=32, top_k_ratio=ratio)
    np.testing.assert_allclose(s["precision"], s["chance_precision"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(s["chance_precision"], 24 * 24 / 32 ** 2, rtol=0, atol=1e-12)
    np.testing.assert_allclose(s["recall"], ratio, rtol=0, atol=1e-12)


def test_patch_leak_counts_the_object_left_unblanked_under_the_patch():
    from backmix.bench.map_quality import patch_leak
    # 4 x 4 canvas = image, 2 x 2 grid, patch of 2 x 2 (box fraction 0.5): 3 x 3 corners.
    # Object: the top-left cell. Map 1 blanks it (its top cell): nothing leaks. Map 2 blanks another
    # cell: a patch at corner (y, x) holds (2 - y) * (2 - x) object pixels, y, x in 0..2.
    maps = np.array([[[0.875, 0.125], [0.125, 0.125]], [[0.125, 0.875], [0.125, 0.125]]])
    boxes = np.array([[0, 0, 2, 2]] * 2)
    leak = patch_leak(maps, boxes, image_size=4, canvas=4, box_fraction=0.5, top_k_ratio=0.25)
    assert leak.tolist() == [0.0, (2 + 1 + 0) ** 2 / 9 / 4]


def test_patch_leak_scales_the_box_to_the_canvas():
    from backmix.bench.map_quality import patch_leak
    # The whole 2 x 2 image is the object, on an 8 x 8 canvas; nothing blanked is impossible (k >= 1):
    # one of 4 cells blanked, so 3/4 of every patch that lies in the other cells leaks.
    maps = np.array([[[0.875, 0.125], [0.125, 0.125]]])
    leak = patch_leak(maps, np.array([[0, 0, 2, 2]]), image_size=2, canvas=8, box_fraction=0.5, top_k_ratio=0.25)
    # Patch 4 x 4 on an 8 x 8 canvas, 25 corners; blanked = rows 0..3, cols 0..3. A patch at (y, x) holds
    # (4 - y) * (4 - x) blanked pixels for y, x in 0..4: the sum over corners is (4+3+2+1+0)^2 = 100.
    assert leak.tolist() == [1 - 100 / 25 / 16]
