"""The data stage: bundled data, the index, splits, and clear errors for bad input."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from backmix.osr_data import BackMixError, ImageIndex, random_splits, resolve_split
from backmix.osr_data.prepare import DATASETS, prepare


def test_bundled_digits_are_all_written_in_imagenet_layout(digits_root):
    train, test = ImageIndex.load(digits_root / "train"), ImageIndex.load(digits_root / "test")
    assert len(train) + len(test) == 1797
    assert train.classes == test.classes == tuple(f"digit_{d}" for d in range(10))
    assert np.array_equal(np.bincount(train.labels) + np.bincount(test.labels),
                          [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])
    for i in (0, 500, len(train) - 1):
        assert train.paths[i].split("/")[0] == train.classes[train.labels[i]]
        assert (digits_root / "train" / train.paths[i]).is_file()


def test_index_file_is_fixed_order_and_matches_a_fresh_scan(digits_root):
    loaded = ImageIndex.load(digits_root / "train")
    scanned = ImageIndex.scan(digits_root / "train")
    assert loaded.paths == scanned.paths and np.array_equal(loaded.labels, scanned.labels)
    assert loaded.fingerprint() == scanned.fingerprint()
    assert list(loaded.paths) == sorted(loaded.paths)


def test_any_folder_in_the_layout_works(tiny_root):
    index = ImageIndex.load(tiny_root)
    assert index.classes == ("cat", "dog", "fox") and len(index) == 24
    assert (tiny_root / "index.csv").exists()


def test_prepare_again_is_a_no_op(digits_root):
    assert prepare("digits", digits_root) is False


def test_missing_and_empty_folders_are_named(tmp_path):
    with pytest.raises(BackMixError, match=f"{tmp_path / 'nope'} does not exist"):
        ImageIndex.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackMixError, match="is empty"):
        ImageIndex.load(tmp_path / "empty")


def test_a_failed_prepare_leaves_nothing_behind(tmp_path, monkeypatch):
    def half_then_fail(out, **_):
        (out / "train").mkdir(parents=True)
        (out / "train" / "x.png").write_bytes(b"123")
        raise RuntimeError("disk full")

    monkeypatch.setitem(DATASETS, "broken", half_then_fail)
    with pytest.raises(RuntimeError):
        prepare("broken", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_random_splits_follow_the_protocol_and_are_seeded():
    classes = tuple(f"c{i}" for i in range(10))
    splits = random_splits(classes, seed=0)
    assert len(splits) == 5
    for s in splits:
        assert len(s.known) == 6 and len(s.unknown) == 4 and set(s.known) | set(s.unknown) == set(classes)
        assert list(s.known) == sorted(s.known, key=classes.index)     # label order of the closed-set head
    assert [s.known for s in random_splits(classes, seed=0)] == [s.known for s in splits]
    assert [s.known for s in random_splits(classes, seed=1)] != [s.known for s in splits]
    assert resolve_split(classes, "2") == splits[2]


@pytest.mark.parametrize("n_classes", [10, 20, 1000])
def test_random_splits_are_distinct_and_deterministic(n_classes):
    classes = tuple(f"c{i}" for i in range(n_classes))
    for seed in range(20 if n_classes == 10 else 3):   # seed 0 drew split 3 == split 0 before the fix
        splits = random_splits(classes, seed=seed)
        assert len({s.known for s in splits}) == 5
        assert splits == random_splits(classes, seed=seed)
        for s in splits:
            assert len(s.known) == round(0.6 * n_classes) and not set(s.known) & set(s.unknown)
            assert len(s.known) + len(s.unknown) == n_classes


def test_random_splits_can_use_every_possible_known_set():
    classes = ("a", "b", "c", "d")                      # 4 choose 2 = 6 known sets, all of them asked for
    splits = random_splits(classes, n_splits=6, n_known=2, seed=3)
    assert sorted(s.known for s in splits) == [("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"),
                                               ("c", "d")]


def test_impossible_distinct_splits_are_refused():
    with pytest.raises(BackMixError, match="5 distinct splits of 3 classes with 2 known do not exist"):
        random_splits(("a", "b", "c"), n_splits=5)
    with pytest.raises(BackMixError, match="at least 1"):
        random_splits(("a", "b", "c"), n_splits=0)


def python_lines_run(fn, *args, **kw) -> int:
    """Lines of Python executed inside osr_data/splits.py while ``fn`` runs."""
    import sys
    from backmix.osr_data import splits as module
    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        if frame.f_code.co_filename != module.__file__:
            return None
        if event == "line":
            count += 1
        return tracer

    sys.settrace(tracer)
    try:
        fn(*args, **kw)
    finally:
        sys.settrace(None)
    return count


def test_random_splits_do_no_per_class_python_work():
    """O(classes): the Python steps do not grow with the classes (numpy does the O(classes) work).

    The old draw rebuilt a set of the known classes for every class, O(classes^2); here
    1,000 and 10,000 classes must run the very same number of Python lines.
    """
    small = python_lines_run(random_splits, tuple(f"c{i}" for i in range(1000)))
    large = python_lines_run(random_splits, tuple(f"c{i}" for i in range(10_000)))
    assert small == large
    splits = random_splits(tuple(f"c{i}" for i in range(10_000)))
    assert len({s.known for s in splits}) == 5 and all(len(s.known) == 6000 for s in splits)


def test_explicit_split_and_label_map():
    classes = ("a", "b", "c", "d")
    s = resolve_split(classes, "d,b")
    assert s.known == ("b", "d") and s.unknown == ("a", "c")
    assert s.label_map(classes).tolist() == [-1, 0, -1, 1]


@pytest.mark.parametrize("spec, message", [("b,zebra", "class 'zebra', which does not exist"),
                                           ("7", "split 7 does not exist"),
                                           ("a,b,c,d", "not all")])
def test_bad_splits_are_named(spec, message):
    with pytest.raises(BackMixError, match=message):
        resolve_split(("a", "b", "c", "d"), spec)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "backmix", *args], capture_output=True, text=True)


def test_cli_error_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("not a data set")
    r = run_cli("data", "prepare", "--out", str(tmp_path / "junk"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"backmix: error: {tmp_path / 'junk'} exists and is not a prepared data set; pass --force to replace it"]
    assert "Traceback" not in r.stderr


def test_every_subcommand_has_help():
    r = run_cli("--help")
    assert r.returncode == 0 and "data" in r.stdout
    r = run_cli("data", "prepare", "--help")
    assert r.returncode == 0 and "--out" in r.stdout


# --- digits-on-photos: the data set with a fore-background prior ---------------------------------

@pytest.fixture(scope="module")
def on_photos():
    from backmix.osr_data.composite import digits_on_photos
    return digits_on_photos(prior=0.8, seed=0)


def test_on_photos_training_backgrounds_follow_the_prior(on_photos):
    d = on_photos
    own = d["train_photos"] == d["class_photo"][d["train_labels"]]
    n = len(own)
    # Binomial(n, 0.8): 5 standard deviations either side.
    assert abs(own.mean() - 0.8) < 5 * np.sqrt(0.8 * 0.2 / n)
    assert len(set(d["class_photo"].tolist())) == 10   # every class has a photograph of its own


def test_on_photos_test_backgrounds_are_uniform(on_photos):
    from backmix.osr_data.composite import bundled_photos
    d = on_photos
    n_photos = len(bundled_photos())
    counts = np.bincount(d["test_photos"], minlength=n_photos)
    expected = len(d["test_photos"]) / n_photos
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 45.0    # chi-square, 15 dof: p < 1e-4 beyond this
    own = d["test_photos"] == d["class_photo"][d["test_labels"]]
    assert own.mean() < 0.2


def test_on_photos_same_digits_split_as_digits(on_photos):
    from backmix.osr_data.prepare import digits_arrays
    _, ytr, _, yte, _ = digits_arrays()
    assert np.array_equal(on_photos["train_labels"], ytr) and np.array_equal(on_photos["test_labels"], yte)
    assert on_photos["train_images"].shape == (len(ytr), 32, 32, 3)
    assert on_photos["train_images"].dtype == np.uint8


def test_on_photos_rejects_a_prior_outside_0_1(tmp_path):
    from backmix.osr_data.composite import digits_on_photos
    with pytest.raises(BackMixError, match="prior"):
        digits_on_photos(prior=1.5)


# --- the index as columns: identity, staleness, hand edits ----------------------------------------

def copy_of(tiny_root, tmp_path, with_index=True):
    import shutil
    root = tmp_path / "copy"
    shutil.copytree(tiny_root, root, ignore=shutil.ignore_patterns(".backmix", *(() if with_index else ("index.csv",))))
    return root


def test_paths_are_a_sequence_of_str(tiny_root):
    index = ImageIndex.load(tiny_root)
    listed = [f"{('cat', 'dog', 'fox')[i // 8]}/{i:06d}.png" for i in range(24)]
    assert list(index.paths) == listed and index.paths == tuple(listed)
    assert index.paths[-1] == listed[-1] and index.paths[3:6] == listed[3:6]
    assert index.abspath(9) == str(tiny_root / "dog" / "000009.png")
    assert index.labels.dtype == np.int64 and index.labels.tolist() == [0] * 8 + [1] * 8 + [2] * 8
    with pytest.raises(IndexError):
        index.paths[24]


def test_index_file_records_size_and_mtime(tiny_root):
    index = ImageIndex.load(tiny_root)
    header, first = (tiny_root / "index.csv").read_text().splitlines()[:2]
    st = (tiny_root / "cat" / "000000.png").stat()
    assert header == "path,label,size,mtime_ns"
    assert first == f"cat/000000.png,0,{st.st_size},{st.st_mtime_ns}"
    assert index.sizes[0] == st.st_size and index.mtimes[0] == st.st_mtime_ns


@pytest.mark.parametrize("change", ["content", "mtime"])
def test_same_names_other_files_is_another_fingerprint(tiny_root, tmp_path, change):
    import os
    root = copy_of(tiny_root, tmp_path, with_index=False)
    before = ImageIndex.scan(root)
    assert before.fingerprint() == ImageIndex.load(tiny_root).fingerprint()   # copytree keeps size and mtime
    path = root / "dog" / "000010.png"
    st = path.stat()
    if change == "content":
        path.write_bytes(path.read_bytes() + b"\0")
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    after = ImageIndex.scan(root)
    assert after.paths == before.paths and np.array_equal(after.labels, before.labels)
    assert after.fingerprint() != before.fingerprint()


def test_a_cache_for_one_data_set_is_refused_for_another_with_the_same_names(tiny_root, tmp_path):
    from backmix.cam_cache.store import ForegroundCache, init_cache
    root = copy_of(tiny_root, tmp_path, with_index=False)
    (root / "fox" / "000020.png").write_bytes((root / "fox" / "000021.png").read_bytes())
    init_cache(tmp_path / "cache", ImageIndex.load(tiny_root))
    with pytest.raises(BackMixError, match="built for another data set"):
        ForegroundCache(tmp_path / "cache", index=ImageIndex.load(root))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_file_overwritten_after_indexing_stops_the_loader(tiny_root, tmp_path, num_workers):
    from backmix.pipeline import LoaderConfig, ReferenceLoader
    root = copy_of(tiny_root, tmp_path)
    index = ImageIndex.load(root)
    (root / "fox" / "000017.png").write_bytes((root / "fox" / "000018.png").read_bytes())
    loader = ReferenceLoader(index, LoaderConfig(batch_size=8, canvas=40, crop=32, num_workers=num_workers,
                                                 device="cpu", on_error="skip"))
    with pytest.raises(BackMixError, match=r"fox/000017.png changed after .*index.csv was written") as e:
        list(loader)
    assert "\n" not in str(e.value)


def test_an_index_file_of_an_earlier_layout_is_refused_in_one_line(tiny_root, tmp_path):
    root = copy_of(tiny_root, tmp_path)
    rows = (root / "index.csv").read_text().splitlines()
    (root / "index.csv").write_text("\n".join(",".join(r.split(",")[:2]) for r in rows) + "\n")
    assert (root / "index.csv").read_text().startswith("path,label\ncat/000000.png,0\n")
    with pytest.raises(BackMixError, match=r"index.csv was written by an earlier backmix \(no size and mtime "
                                           r"columns\): delete it; the next `backmix` command that reads the "
                                           r"folder rewrites it$"):
        ImageIndex.load(root)
    (root / "index.csv").unlink()
    assert ImageIndex.load(root).fingerprint() == ImageIndex.load(tiny_root).fingerprint()
    assert (root / "index.csv").read_text().splitlines() == rows


def _add_class(root, name="zebra"):
    (root / name).mkdir()
    (root / name / "a.png").write_bytes((root / "cat" / "000000.png").read_bytes())


def _relabel(root):
    lines = (root / "index.csv").read_text().splitlines()
    path, _, size, mtime = lines[12].split(",")
    lines[12] = ",".join([path, "2", size, mtime])
    (root / "index.csv").write_text("\n".join(lines) + "\n")


STALE = {
    "missing file": (lambda r: (r / "dog" / "000011.png").unlink(),
                     r"image .*dog/000011.png is listed in .*index.csv but does not exist; delete"),
    "new image": (lambda r: (r / "cat" / "new.png").write_bytes(b"x"),
                  r"index.csv was written before cat/new.png appeared; delete it to re-index"),
    "new class": (_add_class, r"index.csv was written before zebra/ appeared; delete it to re-index"),
    "class folder gone": (lambda r: __import__("shutil").rmtree(r / "fox"),
                          r"class folder .*fox listed in .*index.csv does not exist"),
    "relabelled row": (_relabel, r"index.csv line 13: dog/000011.png has label 2, but its folder dog/ is class 1"),
    "row without folder": (lambda r: (r / "index.csv").write_text("path,label,size,mtime_ns\nx.png,0,1,1\n"),
                           r"index.csv line 2: path 'x.png' names no class folder"),
    "malformed row": (lambda r: (r / "index.csv").write_text("path,label,size,mtime_ns\ncat/a.png,zero,1,1\n"),
                      r"index.csv has a malformed row"),
    "not an index": (lambda r: (r / "index.csv").write_text("file,class\n"), r"is not an index file"),
    "no rows": (lambda r: (r / "index.csv").write_text("path,label,size,mtime_ns\n"), r"lists no images"),
}


@pytest.mark.parametrize("case", sorted(STALE))
def test_a_stale_or_edited_index_is_named_when_loaded(tiny_root, tmp_path, case):
    change, message = STALE[case]
    root = copy_of(tiny_root, tmp_path)
    change(root)
    with pytest.raises(BackMixError, match=message) as e:
        ImageIndex.load(root)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("content", [(), ("scan.tif", "notes.txt")])
def test_a_class_folder_without_images_is_refused_by_name(tiny_root, tmp_path, content):
    root = copy_of(tiny_root, tmp_path, with_index=False)
    (root / "empty_class").mkdir()
    for name in content:
        (root / "empty_class" / name).write_bytes(b"x")
    with pytest.raises(BackMixError, match=f"class folder {root / 'empty_class'} holds no images"):
        ImageIndex.load(root)
    assert not (root / "index.csv").exists()
    # An index written before the empty folder appeared refuses it too.
    root2 = copy_of(tiny_root, tmp_path / "2")
    (root2 / "empty_class").mkdir()
    with pytest.raises(BackMixError, match="empty_class holds no images"):
        ImageIndex.load(root2)


def test_a_prepared_root_says_which_folder_to_pass(digits_root, tmp_path):
    with pytest.raises(BackMixError, match=f"{digits_root} holds train/ and test/: pass {digits_root / 'train'}"):
        ImageIndex.load(digits_root)
    r = run_cli("cache", "init", "--data", str(digits_root), "--cache", str(tmp_path / "c"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"backmix: error: {digits_root} holds train/ and test/: pass {digits_root / 'train'}"]


# --- decoding --------------------------------------------------------------------------------------

def write_png16(path, pixels: np.ndarray) -> None:
    """A 16-bit PNG written by hand (PIL writes only grey ones): grey, grey+alpha, RGB or RGBA."""
    import struct
    import zlib
    h, w = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    raw = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16_bit_png_decodes_scaled_to_8_bit(tmp_path, channels):
    from backmix.osr_data import decode_rgb
    rng = np.random.default_rng(channels)
    pixels = rng.integers(0, 65536, (5, 7, channels), dtype=np.uint16)
    pixels[0, 0] = 65535
    pixels[0, 1] = 128                                   # round(128 / 257) = 0, round(129 / 257) = 1
    pixels[0, 2] = 129
    write_png16(tmp_path / "deep.png", pixels[..., 0] if channels == 1 else pixels)
    image = decode_rgb(str(tmp_path / "deep.png"))
    colour = pixels[..., :3] if channels >= 3 else np.repeat(pixels[..., :1], 3, axis=-1)
    want = np.floor(colour / 257.0 + 0.5).astype(np.uint8)
    assert image.dtype == torch.uint8 and np.array_equal(image.permute(1, 2, 0).numpy(), want)


# --- prepare: the destination, the mode, leftovers ------------------------------------------------

@pytest.mark.parametrize("where, message", [
    ("file", "--out {out} is a file, not a folder"),
    ("under a file", "cannot write {out}: {parent} is a file, not a folder"),
    ("not writable", "cannot write {out}: Permission denied"),
])
def test_prepare_checks_the_destination_first(tmp_path, monkeypatch, where, message):
    import os
    built = []
    monkeypatch.setitem(DATASETS, "counting", lambda out, **_: built.append(out))
    (tmp_path / "f").write_text("a file")
    out = {"file": tmp_path / "f", "under a file": tmp_path / "f" / "out",
           "not writable": tmp_path / "ro" / "out"}[where]
    if where == "not writable":
        real_mkdir = os.mkdir

        def refuse(path, *a, **kw):                  # EACCES: root ignores a chmod'ed parent
            if str(path).startswith(str(tmp_path / "ro")):
                raise PermissionError(13, "Permission denied", str(path))
            return real_mkdir(path, *a, **kw)
        monkeypatch.setattr(os, "mkdir", refuse)
    with pytest.raises(BackMixError, match=message.format(out=out, parent=tmp_path / "f")) as e:
        prepare("counting", out)
    assert built == [] and "\n" not in str(e.value)


def test_prepared_folder_follows_the_umask(tmp_path):
    import os
    old = os.umask(0o027)
    try:
        prepare("digits", tmp_path / "d")
    finally:
        os.umask(old)
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "d" / "train" / "digit_3").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "d" / "train" / "index.csv").stat().st_mode & 0o777 == 0o640


def test_a_killed_prepare_leaves_a_temp_folder_the_next_run_removes(tmp_path, monkeypatch):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    abandoned = tmp_path / f".out.tmp-{dead.pid}-0badc0de"
    (abandoned / "train").mkdir(parents=True)
    running = tmp_path / ".out.tmp-1-12345678"          # pid 1 exists: another prepare may be writing it
    running.mkdir()
    unrelated = tmp_path / ".out.backup"
    unrelated.mkdir()
    monkeypatch.setitem(DATASETS, "one-file", lambda out, **_: (out / "x").write_text("x"))
    prepare("one-file", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.backup", running.name, "out"]


# --- the reference loader's workers ----------------------------------------------------------------

def test_persistent_workers_receive_each_epochs_order(tiny_root):
    from backmix.pipeline import LoaderConfig, ReferenceLoader
    index = ImageIndex.load(tiny_root)

    def loader(workers):
        return ReferenceLoader(index, LoaderConfig(batch_size=8, canvas=40, crop=32, num_workers=workers,
                                                   device="cpu", seed=0))
    pooled, inline = loader(1), loader(0)
    orders, workers = [], []
    for epoch in (0, 1):
        pooled.set_epoch(epoch)
        inline.set_epoch(epoch)
        a, b = list(pooled), list(inline)
        assert len(a) == len(b) == 3
        assert all(torch.equal(x.indices, y.indices) and torch.equal(x.mixed, y.mixed) for x, y in zip(a, b))
        orders.append(torch.cat([x.indices for x in a]).tolist())
        workers.append([w.pid for w in pooled.source._loader._iterator._workers])
    assert orders[0] != orders[1]                # the second epoch's order reached the same worker
    assert workers[0] == workers[1]


def test_a_prepared_root_names_its_train_folder_and_an_image_folder_itself(digits_root, tiny_root):
    from backmix.osr_data.index import train_folder
    assert train_folder(digits_root) == digits_root / "train"
    assert train_folder(str(digits_root / "train")) == digits_root / "train"
    assert train_folder(tiny_root) == tiny_root
