"""index.arrow, the binary copy of index.csv: loads equal to the CSV, is never trusted stale or damaged."""
import os
import re
import shutil

import numpy as np
import pytest

from backmix.osr_data.errors import BackMixError
from backmix.osr_data.index import INDEX_NAME, ImageIndex
from backmix.osr_data.index_paths import IndexPaths
from backmix.osr_data.file_digest import file_digest
from backmix.osr_data.index_sidecar import SIDECAR_NAME, write_sidecar
from backmix.osr_data.untrusted_paths import first_row_outside


@pytest.fixture
def root(tiny_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(tiny_root, root, ignore=shutil.ignore_patterns(".backmix", SIDECAR_NAME))
    return root


def columns(index):
    return (list(index.paths), index.labels.tolist(), index.sizes.tolist(), index.mtimes.tolist(), index.classes)


def csv_only(root):
    """The index as read from index.csv alone (what the copy must equal)."""
    return ImageIndex._read(root, root / INDEX_NAME, (root / INDEX_NAME).read_bytes())


def from_the_copy_only(monkeypatch):
    """Make reading index.csv fail: a load that succeeds came from index.arrow."""
    def no_csv(*args):
        raise AssertionError("index.csv was parsed")
    monkeypatch.setattr(ImageIndex, "_read", classmethod(no_csv))


def test_the_first_load_writes_the_copy_and_the_next_loads_equal_the_csv(root, monkeypatch):
    assert not (root / SIDECAR_NAME).exists()
    first = ImageIndex.load(root)
    assert (root / SIDECAR_NAME).is_file()
    expected = csv_only(root)
    from_the_copy_only(monkeypatch)
    again = ImageIndex.load(root)
    assert columns(again) == columns(first) == columns(expected)
    assert again.labels.dtype == again.sizes.dtype == again.mtimes.dtype == np.int64
    assert again.paths == expected.paths and again.fingerprint() == expected.fingerprint()


def test_writing_the_index_writes_its_copy(root, monkeypatch):
    (root / INDEX_NAME).unlink()
    scanned = ImageIndex.load(root)                 # scans, writes index.csv and index.arrow
    from_the_copy_only(monkeypatch)
    assert columns(ImageIndex.load(root)) == columns(scanned)


def test_an_index_file_of_an_earlier_layout_is_refused_beside_a_copy_of_the_current_one(root, monkeypatch):
    current = columns(ImageIndex.load(root))             # the copy of the current index.csv is beside it
    rows = (root / INDEX_NAME).read_text().splitlines()
    (root / INDEX_NAME).write_text("\n".join(",".join(r.split(",")[:2]) for r in rows) + "\n")
    with pytest.raises(BackMixError, match="was written by an earlier backmix \\(no size and mtime columns\\): "
                                           "delete it; the next `backmix` command that reads the folder rewrites it$"):
        ImageIndex.load(root)
    (root / INDEX_NAME).unlink()
    assert columns(ImageIndex.load(root)) == current and (root / INDEX_NAME).read_text().splitlines() == rows
    from_the_copy_only(monkeypatch)
    assert columns(ImageIndex.load(root)) == current


def test_an_edit_with_the_same_size_and_mtime_makes_the_copy_stale(root):
    ImageIndex.load(root)
    index_file = root / INDEX_NAME
    st = index_file.stat()
    lines = index_file.read_text().splitlines()
    path, label, size, mtime = lines[5].split(",")
    other = str(int(mtime) + 1) if not mtime.endswith("9") else str(int(mtime) - 1)   # same length
    lines[5] = ",".join([path, label, size, other])
    index_file.write_text("\n".join(lines) + "\n")
    os.utime(index_file, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert index_file.stat().st_size == st.st_size
    index = ImageIndex.load(root)
    assert index.mtimes[4] == int(other) and columns(index) == columns(csv_only(root))


def test_a_stale_copy_does_not_hide_a_hand_edited_label(root):
    ImageIndex.load(root)
    lines = (root / INDEX_NAME).read_text().splitlines()
    path, _, size, mtime = lines[12].split(",")
    lines[12] = ",".join([path, "2", size, mtime])
    (root / INDEX_NAME).write_text("\n".join(lines) + "\n")
    with pytest.raises(BackMixError, match=r"index.csv line 13: dog/000011.png has label 2, but its folder dog/ "
                                        r"is class 1"):
        ImageIndex.load(root)


def test_a_copy_made_for_another_csv_is_not_used(root):
    """The copy of an earlier index.csv of the folder (same names, other mtimes) put back beside it."""
    ImageIndex.load(root)
    kept = root.parent / "kept.arrow"
    shutil.copy(root / SIDECAR_NAME, kept)
    for image in root.glob("cat/*.png"):
        os.utime(image, ns=(0, 10 ** 18))
    (root / INDEX_NAME).unlink()
    ImageIndex.load(root)                           # rescanned: index.csv with the new mtimes
    shutil.copy(kept, root / SIDECAR_NAME)
    assert ImageIndex.load(root).mtimes[:8].tolist() == [10 ** 18] * 8


def _forged(root, *, paths=None, labels=None, classes=None, fingerprint=None):
    """A copy that claims to be made from root's index.csv, its fingerprint that of its columns unless
    ``fingerprint`` is given."""
    good = csv_only(root)
    forged = ImageIndex(root, IndexPaths.from_strings(paths or list(good.paths)),
                        good.labels if labels is None else np.asarray(labels, np.int64),
                        classes or good.classes, good.sizes, good.mtimes)
    forged._fingerprint = fingerprint
    write_sidecar(forged, file_digest(root / INDEX_NAME))


DAMAGE = {
    "garbage": (lambda r: (r / SIDECAR_NAME).write_bytes(bytes(range(256)) * 8), "damaged"),
    "empty": (lambda r: (r / SIDECAR_NAME).write_bytes(b""), "damaged"),
    "truncated": (lambda r: (r / SIDECAR_NAME).write_bytes((r / SIDECAR_NAME).read_bytes()[:300]), "damaged"),
    "columns that do not hash to its fingerprint": (lambda r: _forged(r, fingerprint="0" * 64),
                                                     "do not hash to the fingerprint"),
    "a path outside the folder": (lambda r: _forged(r, paths=["../escape.png"] + [f"cat/{i:06d}.png" for i in
                                                                                  range(1, 24)]),
                                  "a path is outside the data folder"),
    "a label out of range": (lambda r: _forged(r, labels=[7] * 24), "a label is not a class position"),
    "unsorted classes": (lambda r: _forged(r, classes=("dog", "cat", "fox")), "its class list is not"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_copy_is_one_line_and_rebuilt_from_the_csv(root, caplog, case, monkeypatch):
    ImageIndex.load(root)
    damage, reason = DAMAGE[case]
    damage(root)
    with caplog.at_level("WARNING", logger="backmix"):
        index = ImageIndex.load(root)
    assert columns(index) == columns(csv_only(root))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith(f"{root / SIDECAR_NAME} is damaged") and reason in warnings[0]
    caplog.clear()
    from_the_copy_only(monkeypatch)                 # written again: the next load uses it, silently
    with caplog.at_level("WARNING", logger="backmix"):
        assert columns(ImageIndex.load(root)) == columns(index)
    assert not caplog.records


def test_any_byte_flipped_loads_the_csv_s_rows_and_never_raises(root):
    """Every 5th byte of the copy flipped in turn: each load equals the CSV (the damage found and the
    copy rewritten, or the byte was padding), and none raises."""
    ImageIndex.load(root)
    expected, intact = columns(csv_only(root)), (root / SIDECAR_NAME).read_bytes()
    for at in range(0, len(intact), 5):
        damaged = bytearray(intact)
        damaged[at] ^= 0xFF
        (root / SIDECAR_NAME).write_bytes(bytes(damaged))
        assert columns(ImageIndex.load(root)) == expected, at


def test_a_copy_of_another_format_version_is_replaced(root, monkeypatch):
    import backmix.osr_data.index_sidecar as sidecar
    monkeypatch.setattr(sidecar, "FORMAT", "backmix-index/0")
    ImageIndex.load(root)
    monkeypatch.undo()
    before = (root / SIDECAR_NAME).read_bytes()
    index = ImageIndex.load(root)
    assert (root / SIDECAR_NAME).read_bytes() != before and columns(index) == columns(csv_only(root))


PATTERN = re.compile(r"(^|/)\.\.(/|$)")


def test_rows_outside_the_folder_are_found_exactly_as_a_regular_expression_finds_them():
    rng = np.random.default_rng(0)
    alphabet = np.array(["a", ".", "/", "é", "b"])
    cases = [["a/b.png"], ["a/..", "b"], ["x/y", "../a"], ["a/...", "a/..b", "b../c", "..."], ["a/b", "/abs"],
             ["", "a/b", "..", "x"], ["é/..", "x"], ["a/b/..", "c"], ["a/b.", "./c", "../"]]
    cases += [["".join(rng.choice(alphabet, rng.integers(0, 7))) for _ in range(rng.integers(1, 6))]
              for _ in range(2000)]
    for rows in cases:
        expected = next((i for i, p in enumerate(rows) if p.startswith("/") or PATTERN.search(p)), None)
        assert first_row_outside(IndexPaths.from_strings(rows)) == expected, rows
