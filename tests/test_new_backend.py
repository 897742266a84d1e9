"""A backend that only decodes is one small class and one registry line (tests/helpers.py ``PilSource``):
it gives the reference stream, resumes mid-epoch and treats bad files as every backend does, because
the loader core owns all of that. (tests/test_resume.py runs it with the other backends too.)"""
from __future__ import annotations

import inspect
import shutil

import pytest
import torch

from backmix.osr_data import BackMixError, DecodeError, ImageIndex
from backmix.pipeline import LoaderConfig, make_loader

from helpers import PilSource, assert_same_stream, epochs_of, maps_for, state_after


def config(**kw) -> LoaderConfig:
    return LoaderConfig(**{**dict(batch_size=6, canvas=40, crop=32, num_workers=0, seed=5, device="cpu"), **kw})


def test_the_backend_is_one_small_class():
    assert len(inspect.getsource(PilSource).splitlines()) <= 80


@pytest.mark.parametrize("kw", [dict(), dict(canvas_mode="stretch", augment="rrc", num_workers=1),
                                dict(clean=False), dict(backmix=False), dict(rank=1, world_size=2),
                                dict(train=False, shuffle=False)])
def test_its_stream_is_the_reference_loaders(tiny_root, kw):
    index = ImageIndex.load(tiny_root)
    got = epochs_of(make_loader("pil", index, config(**kw), maps_for(index)))
    assert_same_stream(got, epochs_of(make_loader("reference", index, config(**kw), maps_for(index))))


def test_a_restored_loader_continues_where_it_stopped(tiny_root):
    index = ImageIndex.load(tiny_root)
    want = epochs_of(make_loader("pil", index, config(), maps_for(index)), epochs=(1,))
    state = state_after(make_loader("pil", index, config(), maps_for(index)), 1, 2)
    second = make_loader("pil", index, config(), maps_for(index))
    second.load_state_dict(state)
    second.set_epoch(1)
    assert_same_stream([tuple(b) for b in second], want[2:])


def test_bad_files_are_the_cores_policy(folder_with_a_broken_file, tiny_root, tmp_path):
    index = ImageIndex.load(folder_with_a_broken_file)
    with pytest.raises(DecodeError, match="does not decode"):
        list(make_loader("pil", index, config(shuffle=False)))
    skipping = make_loader("pil", index, config(on_error="skip"))
    served = torch.cat([b.indices for b in skipping])
    assert skipping.skipped == 1 and len(served) == len(index) - 1
    # a file changed after indexing stops it whatever on_error says
    root = shutil.copytree(tiny_root, tmp_path / "train")
    index = ImageIndex.load(root)
    with open(index.abspath(3), "ab") as f:
        f.write(b"changed")
    with pytest.raises(BackMixError, match="changed after"):
        list(make_loader("pil", index, config(on_error="skip", shuffle=False)))
