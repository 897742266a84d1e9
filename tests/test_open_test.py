"""The bundled set of unknowns (photo-crops) and --open-test folder names."""
from __future__ import annotations

import numpy as np
import pytest

from backmix.osr_data.errors import BackMixError
from backmix.osr_data.index import ImageIndex
from backmix.osr_data.photo_crops import photo_crops, photo_names
from backmix.osr_data.prepare import prepare
from backmix.trainers.open_test import open_test_indexes, open_test_name


def test_photo_crops_prepare_offline_as_an_image_folder(tmp_path):
    assert prepare("photo-crops", tmp_path / "pc")
    test = ImageIndex.load(tmp_path / "pc" / "test")
    assert len(test) == 16 * 12 and test.classes == tuple(sorted(photo_names()))
    a, labels = photo_crops(seed=0)
    b, _ = photo_crops(seed=0)
    assert np.array_equal(a, b) and a.shape == (192, 32, 32, 3) and np.bincount(labels).tolist() == [12] * 16
    # no digit on them: dimmed as digits-on-photos dims its backgrounds, so nothing reaches white
    assert a.max() <= round(255 * 0.75)
    assert open_test_name(tmp_path / "pc" / "test") == "pc/test" and open_test_name(tmp_path / "pc") == "pc"
    assert list(open_test_indexes([str(tmp_path / "pc" / "test")])) == ["pc/test"]
    with pytest.raises(BackMixError, match="two --open-test folders are both named 'pc/test'"):
        open_test_indexes([str(tmp_path / "pc" / "test")] * 2)
