"""The public API as a user's own loop meets it: examples/own_loop.py and backmix.loader."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import backmix

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own_loop.py"


def test_the_own_loop_example_trains_rebuilds_and_evaluates(digits_root, tmp_path):
    assert len(EXAMPLE.read_text().splitlines()) <= 60
    r = subprocess.run([sys.executable, str(EXAMPLE), "--data", str(digits_root), "--epochs", "2",
                        "--rebuild-every", "1", "--cache", str(tmp_path / "cache")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert lines[0].startswith("epoch 1: loss") and lines[0].endswith("generation 0")
    assert lines[1].startswith("epoch 2: loss") and lines[1].endswith("generation 1")   # the rebuild took effect
    assert lines[2].startswith("accuracy ") and "AUROC" in lines[2]
    assert (tmp_path / "cache" / "gen-000001.arrow").is_file()


def test_loader_serves_closed_set_labels_of_the_known_classes(digits_root, tmp_path):
    data = backmix.open_set_data(digits_root, split=1)
    train = backmix.loader(data, cache=tmp_path / "c", batch_size=32, num_workers=0)
    test = backmix.loader(data, train=False, batch_size=256, num_workers=0)
    seen = torch.cat([b.indices for b in train])
    assert sorted(seen.tolist()) == sorted(data.known_rows.tolist())          # the known classes, each once
    batch = next(iter(train))
    x, y = batch.inputs()
    assert x.shape[0] == 2 * len(batch.indices) and y.min() >= 0 and y.max() < data.num_known
    expected = data.label_map[data.train.labels[batch.indices.numpy()]]
    assert np.array_equal(batch.labels.numpy(), expected)
    labels = torch.cat([b.labels for b in test])
    assert (labels == -1).sum() == (data.label_map[data.test.labels] < 0).sum() > 0   # unknowns marked -1
    assert train.maps.generation == 0 and (tmp_path / "c" / "CURRENT").is_file()


def test_the_readme_quick_start_runs_as_written(digits_root, tmp_path, capsys):
    readme = (EXAMPLE.parents[1] / "README.md").read_text()
    section = readme.split("## Use it in your own training loop", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) < 15
    code = (code.replace('"data/digits"', repr(str(digits_root))).replace('"runs/cache"', repr(str(tmp_path / "c")))
            .replace("momentum=0.9), 10", "momentum=0.9), 2"))
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("epoch 1: loss") and out[0].endswith("generation 0")
    assert out[1].startswith("epoch 2: loss") and out[1].endswith("generation 1")   # the in-loop rebuild took effect
    assert "'auroc_msp'" in out[2] and "'accuracy'" in out[2]
    assert (tmp_path / "c" / "gen-000001.arrow").is_file()
    assert not (tmp_path / "c" / "gen-000002.arrow").exists()     # none after the last epoch


def readme_commands(text: str) -> list[list[str]]:
    """The ``backmix ...`` command lines of README's code blocks (continuation lines joined, comments and a
    ``...`` placeholder line left out), as argument lists."""
    import re
    import shlex
    inside, lines, commands = False, [], []
    for line in text.splitlines():
        if line.startswith("```"):
            inside = not inside
            continue
        if inside:
            lines.append(line)
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    for line in joined.splitlines():
        for m in re.finditer(r"(?:^|&& |-m )backmix ([^#&|]*)", line.strip()):
            if "..." not in m.group(1):
                commands.append(shlex.split(m.group(1)))
    return commands


DOCS = sorted((EXAMPLE.parents[1] / "docs").glob("*.md"))
# The command lines each page's code blocks hold at least (a page not listed may hold none).
COMMANDS_AT_LEAST = {"README.md": 2, "cache.md": 4, "data.md": 4, "loaders.md": 3, "results.md": 17,
                     "trainer.md": 9}


def assert_every_command_parses(page: Path) -> None:
    from backmix.cli import build_parser
    commands = readme_commands(page.read_text())
    assert len(commands) >= COMMANDS_AT_LEAST.get(page.name, 0), f"{page.name}: {len(commands)} command lines"
    for words in commands:
        try:
            build_parser(words).parse_args(words)
        except SystemExit as e:
            assert not e.code, f"{page.name}: backmix {' '.join(words)} does not parse"


def test_every_backmix_command_line_of_the_readme_parses():
    assert_every_command_parses(EXAMPLE.parents[1] / "README.md")


@pytest.mark.parametrize("page", DOCS, ids=[p.name for p in DOCS])
def test_every_backmix_command_line_of_a_docs_page_parses(page):
    assert_every_command_parses(page)


def test_the_pages_readme_links_to_are_there():
    names = {p.name for p in DOCS}
    assert {"cache.md", "loaders.md", "trainer.md", "gpu-check.md", "security.md", "results.md"} <= names
    readme = (EXAMPLE.parents[1] / "README.md").read_text()
    assert [p.name for p in DOCS if f"](docs/{p.name}" not in readme] == []


def test_readmes_first_commands_are_what_ci_runs():
    """README opens with the two commands for a fresh machine; the second is what .ci/run runs."""
    root = EXAMPLE.parents[1]
    first_block = (root / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line for line in first_block.splitlines() if line and not line.startswith("#")]
    assert commands[0].startswith("bash scripts/install.sh && backmix data prepare")
    install, tests = commands[1].split(" && ")
    ci = (root / ".ci" / "run").read_text().splitlines()
    assert install in ci and tests in ci and ci.index(install) < ci.index(tests)


LOOP_WITH_MIXUP = '''
import sys, torch, torch.distributed as dist, backmix
from timm.data import Mixup
root, cache = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
data = backmix.open_set_data(root, split="ant,bee,cat")
train = backmix.loader(data, cache=cache, batch_size=4, last_batch="drop", num_workers=0)
model = torch.nn.parallel.DistributedDataParallel(backmix.models.build_model("cnn32", data.num_known, width=0.25))
mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=data.num_known)   # pairs images: even batches only
opt, epochs = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), 2
for epoch in range(epochs):
    train.set_epoch(epoch)
    steps = 0
    with backmix.rebuilding(train, model, enabled=epoch + 1 < epochs) as rebuild:
        for batch in train:
            rebuild.record(batch)
            x, y = mixup(*batch.inputs())
            loss = torch.sum(-y * torch.log_softmax(model(x), dim=1), dim=1).mean()
            opt.zero_grad(); loss.backward(); opt.step()
            steps += 1
    # one write of the whole line: the two ranks share the pipe
    print(f"rank {dist.get_rank()} epoch {epoch + 1}: {steps} steps of {x.shape[0]}\\n", end="", flush=True)
dist.destroy_process_group()
# torch 2.14's gloo may abort a process at exit after this ("terminate called without an active
# exception"; a plain DDP + gloo script does too, a run in three or four): end it here, its work done.
import os; os._exit(0)
'''


def test_the_readme_loop_with_timm_mixup_under_torchrun_drops_the_short_last_batch(small_root, tmp_path):
    """README's loop with timm's Mixup (even batches only) under torchrun: 36 known images on 2 ranks, 4 a
    batch, so each rank has 18: 4 full batches and 2 images left over; with last_batch="drop" every rank
    makes the same 4 full steps of 8 inputs (clean + mixed crops), and the in-loop rebuild publishes."""
    script = tmp_path / "loop.py"
    script.write_text(LOOP_WITH_MIXUP)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(script), str(small_root), str(tmp_path / "cache")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    # A rank's own error comes before torchrun's traceback of the failed child: show both.
    assert r.returncode == 0, r.stderr[:3000] + "\n...\n" + r.stderr[-1500:]
    lines = sorted(line for line in r.stdout.splitlines() if line.startswith("rank "))
    assert lines == [f"rank {k} epoch {e}: 4 steps of 8" for k in (0, 1) for e in (1, 2)]
    assert (tmp_path / "cache" / "gen-000001.arrow").is_file()   # the in-loop rebuild ran under torchrun
