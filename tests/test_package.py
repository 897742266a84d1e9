"""The distribution: one top-level package, light imports, optional backends that say how to install them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from backmix.osr_data import BackMixError

REPO = Path(__file__).resolve().parents[1]


def test_the_wheel_installs_only_the_backmix_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(REPO)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("backmix-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"backmix"}, top
    for stage in ("osr_data", "models", "cam_cache", "pipeline", "trainers"):
        assert f"backmix/{stage}/__init__.py" in names


def test_the_image_copies_every_folder_the_distribution_installs():
    # a folder of pyproject's package-dir that docker/Dockerfile leaves out fails the image's pip install
    import tomllib
    folders = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    copied = {line.split()[1] for line in (REPO / "docker" / "Dockerfile").read_text().splitlines()
              if line.startswith("COPY ")}
    assert folders == {"backmix", "osr_data", "models", "cam_cache", "pipeline", "trainers", "bench"}
    assert folders <= copied, folders - copied


def test_stage_packages_are_not_importable_by_their_folder_names_outside_the_repo(tmp_path):
    for name in ("pipeline", "trainers", "cam_cache", "osr_data", "models"):
        r = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 1 and "ModuleNotFoundError" in r.stderr, (name, r.stderr)


def test_importing_backmix_and_its_stages_imports_no_torch(tmp_path):
    code = ("import sys, backmix, backmix.osr_data, backmix.models, backmix.cam_cache, backmix.pipeline, "
            "backmix.trainers; print(sorted(m for m in ('torch', 'torchvision', 'timm', 'sklearn', 'nvidia.dali', "
            "'ffcv') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert r.stdout.strip() == "[]"


def test_a_missing_dali_is_one_line_naming_the_install_command(monkeypatch, tiny_root):
    from backmix.osr_data import ImageIndex
    from backmix.pipeline import LoaderConfig, make_loader
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)     # what an install without the extra looks like
    with pytest.raises(BackMixError, match=r"pip install 'backmix\[dali\]'"):
        make_loader("dali", ImageIndex.load(tiny_root), LoaderConfig(batch_size=4))


@pytest.mark.parametrize("argv", [["--help"], ["cache", "--help"], ["cache", "info", "--help"]])
def test_help_and_cache_info_import_no_torch(tmp_path, argv):
    code = (f"import sys; from backmix.cli import main\ntry: main({argv!r})\nexcept SystemExit: pass\n"
            "print(sorted(m for m in ('torch', 'torchvision', 'sklearn') if m in sys.modules), file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.stderr.strip().splitlines()[-1] == "[]" and "usage: backmix" in r.stdout


def test_every_command_has_help():
    from backmix.cli import COMMANDS, main
    for group, name in COMMANDS:
        argv = [group, name, "--help"] if group else [name, "--help"]
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 0, argv


@pytest.mark.parametrize("argv", [["train", "--help"], ["bench", "scale", "--help"]])
def test_train_and_its_commands_import_no_sklearn_skimage_matplotlib_or_timm_before_they_need_them(tmp_path, argv):
    # scikit-learn (the metrics), scikit-image (bundled photos), matplotlib (sheets) and timm (its models,
    # the recipe) cost seconds of start-up: imported at first use, never by the trainer's modules.
    heavy = ("sklearn", "skimage", "matplotlib", "timm")
    code = (f"import sys; import backmix.trainers.train, backmix.bench.scale, backmix.trainers.metrics\n"
            f"from backmix.cli import main\ntry: main({argv!r})\nexcept SystemExit: pass\n"
            f"print(sorted(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.stderr.strip().splitlines()[-1] == "[]" and "usage: backmix" in r.stdout


@pytest.mark.parametrize("chosen", [None, "ACTIVE"])
def test_the_command_makes_openmp_threads_wait_passively_before_torch_loads_unless_the_user_chose(tmp_path, chosen):
    # What torch's OpenMP runtime reads when it loads: the environment at the moment torch is imported.
    code = ("import os, sys\n"
            "class Watch:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch': print('torch loads with', os.environ.get('OMP_WAIT_POLICY'), file=sys.stderr)\n"
            "sys.meta_path.insert(0, Watch())\n"
            "from backmix.cli import main\ntry: main(['train', '--help'])\nexcept SystemExit: pass\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if chosen:
        env["OMP_WAIT_POLICY"] = chosen
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert "usage: backmix train" in r.stdout
    assert r.stderr.splitlines()[0] == f"torch loads with {chosen or 'PASSIVE'}"


def test_the_command_imports_without_collecting_then_freezes_what_they_made_until_it_ends(tmp_path):
    # While the command runs, the objects its imports made are frozen (collections skip them, forked
    # workers do not write to them); once main returns, or exits on --help, they are collectable again.
    code = textwrap.dedent("""
        import gc, json
        import backmix.cli as cli
        seen = {}
        parse, run = cli.build_parser, cli.run_command
        def build_parser(argv=None):
            seen["importing"] = gc.isenabled()
            return parse(argv)
        def run_command(args):
            seen["running"] = [gc.isenabled(), gc.get_freeze_count()]
            return run(args)
        cli.build_parser, cli.run_command = build_parser, run_command
        assert cli.main(["cache", "info", "--cache", "x"]) == 2      # no cache there: one line, exit 2
        seen["after"] = [gc.isenabled(), gc.get_freeze_count()]
        try:
            cli.main(["train", "--help"])
        except SystemExit:
            seen["after help"] = [gc.isenabled(), gc.get_freeze_count()]
        print(json.dumps(seen))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert seen["importing"] is False and seen["running"][0] is True and seen["running"][1] > 10_000
    assert seen["after"] == [True, 0] and seen["after help"] == [True, 0]
