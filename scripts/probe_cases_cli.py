"""Probe cases of the commands' silently wrong results and leftovers: ``--open-test`` folders that are the
data itself, refusals that leave a run folder, an experiment folder of another loader geometry, a
stale FFCV beton, an --ema checkpoint's figures, log sinks in the way, figure and report files, bench
flags. Collected by ``scripts/probe.py`` beside ``probe_cases.py`` (whose shared data and helpers
they use); the commands run with ``-q``, so a refusal is its one error line."""
from __future__ import annotations

import json
from pathlib import Path

from probe import Case
from probe_cases import LIB, copy_data, train

# The budget of `experiment --budget quick --epochs 1 --width 0.25` (the CLI's batch size): a finished
# run's line in results.jsonl whose loader geometry is the defaults (augment crop).
EXPERIMENT = ["-q", "experiment", "--out", "{D}/exp", "--budget", "quick", "--epochs", "1", "--width", "0.25",
              "--datasets", "digits", "--splits", "1", "--device", "cpu", "--methods", "baseline"]
BUDGET = {"epochs": 1, "width": 0.25, "lr": 0.05, "arch": "cnn32", "batch_size": 64, "val_fraction": 0.1,
          "augment": "crop"}
PEERS = ["-q", "bench", "peers", "--data", "{S}/data/train", "--families", "torch", "--rounds", "1", "--batches",
         "1", "--warmup", "0", "--batch-size", "4", "--canvas", "40", "--crop", "32", "--workers", "0", "--device",
         "cpu", "--out", "{D}/bp"]


def results_line(record: dict):
    def setup(d: Path) -> None:
        (d / "exp").mkdir()
        (d / "exp" / "results.jsonl").write_text(json.dumps(record) + "\n")
    return setup


def mkdir(*names: str):
    def setup(d: Path) -> None:
        for name in names:
            (d / name).mkdir(parents=True)
    return setup


def said(text: str):
    return lambda d, proc: text in proc.stdout


# Runs a refused train in-process and says what it left: the probe checks the status and the folder.
LEAVES_NOTHING = LIB + """from backmix.cli import main
rc = main(["-q", "train", "--data", S + "/data", "--out", D + "/run", "--epochs", "1", "--width", "0.25",
           "--batch-size", "8", "--known", "ant,cat", "--workers", "0", "--device", "cpu", "--no-progress",
           "--open-test", D + "/nope"])
print("status", rc, "run folder left" if os.path.exists(D + "/run") else "nothing left")
"""

# write-beton, then a file touched after the index: the FFCV loader must refuse the beton's old pixels.
STALE_BETON = LIB + """import shutil
from backmix.cli import main
from backmix.osr_data import ImageIndex
from backmix.pipeline import LoaderConfig, make_loader
os.environ["XDG_CACHE_HOME"] = D + "/xdg"
shutil.copytree(S + "/data/train", D + "/t")
assert main(["-q", "data", "write-beton", "--data", D + "/t", "--canvas", "32", "--no-progress"]) == 0
f = D + "/t/ant/000.png"
st = os.stat(f)
os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
make_loader("ffcv", ImageIndex.load(D + "/t"), LoaderConfig(canvas=32, crop=24))
"""

# An --ema run's last.pt: `eval` gives the figures the run reported for it (summary.json).
EMA_AGREES = LIB + """import json
from backmix.cli import main
from backmix.trainers.eval_checkpoint import evaluate_checkpoint
assert main(["-q", "train", "--data", S + "/data", "--out", D + "/run", "--epochs", "1", "--width", "0.25",
             "--batch-size", "8", "--known", "ant,cat", "--workers", "0", "--device", "cpu", "--no-progress",
             "--ema", "0.5"]) == 0
reported = json.load(open(D + "/run/summary.json"))["last"]["test"]
got = evaluate_checkpoint(D + "/run/last.pt", S + "/data", device="cpu", workers=0, progress=False)
print("same" if all(abs(got[k] - reported[k]) < 1e-9 for k in ("accuracy", "auroc_msp", "oscr_msp")) else
      f"differ: {got['auroc_msp']} vs {reported['auroc_msp']}")
"""


def cases() -> list[Case]:
    return [
        # --open-test: the data's own folders are no unknowns; a refusal leaves no run folder
        Case("cli-open-test-is-the-test-folder", ["-q", *train("--open-test", "{S}/data/test")],
             says="is the data's own folder"),
        Case("cli-open-test-is-the-train-folder-in-eval",
             ["-q", "eval", "--checkpoint", "{S}/run/best.pt", "--data", "{S}/data", "--device", "cpu",
              "--workers", "0", "--open-test", "{S}/data/train"], says="is the data's own folder"),
        Case("cli-open-test-empty-path", ["-q", *train("--open-test", "")], says="--open-test: empty path"),
        Case("cli-open-test-refused-leaves-no-run-folder", code=LEAVES_NOTHING, expect="ok",
             check=said("status 2 nothing left")),
        # --out inside an image folder the run reads
        Case("cli-out-inside-the-data-folder", ["-q", *train("--data", "{D}/data", "--out", "{D}/data/train/run")],
             setup=copy_data, says="is inside the data folder"),
        # experiment: the loader geometry is part of the budget; a foreign results line; --out a file
        Case("cli-experiment-another-augment", [*EXPERIMENT, "--augment", "rrc"], setup=results_line(
            {"dataset": "digits", "split": 0, "seed": 0, "method": "baseline", "metrics": {}, "config": BUDGET}),
             says="holds runs of another budget (augment crop there, rrc asked)"),
        Case("cli-experiment-foreign-results-line", EXPERIMENT,
             setup=results_line({"dataset": "digits", "split": 0}), says="is not a run of `backmix experiment`"),
        Case("cli-experiment-out-is-a-file", [*EXPERIMENT[:3], "{D}/f", *EXPERIMENT[4:]],
             setup=lambda d: (d / "f").write_text(""), says="is a file"),
        # FFCV: a beton of files changed since is refused; a JPEG quality without JPEG storage
        Case("cli-ffcv-stale-beton", code=STALE_BETON, says="is gone or changed after", timeout=300),
        Case("cli-write-beton-jpeg-quality-without-jpg",
             ["-q", "data", "write-beton", "--data", "{S}/data/train", "--out", "{D}/b.beton", "--jpeg-quality",
              "50"], says="--jpeg-quality is for --mode jpg"),
        # --ema: eval of last.pt scores what the run reported for it
        Case("cli-ema-last-pt-eval-agrees", code=EMA_AGREES, expect="ok", check=said("same")),
        # log sinks in the way are named
        Case("cli-log-csv-steps-is-a-folder", ["-q", *train("--log", "csv")], setup=mkdir("run/steps.csv"),
             says="steps.csv"),
        Case("cli-log-tensorboard-is-a-file", ["-q", *train("--log", "tensorboard")],
             setup=lambda d: (mkdir("run")(d), (d / "run" / "tensorboard").write_text("")), says="/run/tensorboard: "),
        # figures and bench flags
        Case("cli-show-out-of-an-unknown-format", ["-q", "show", "--data", "{S}/data", "--out", "{D}/s.out"],
             says="a figure cannot be written as .out"),
        Case("cli-show-out-pdf-is-a-pdf", ["-q", "show", "--data", "{S}/data", "--out", "{D}/s.pdf", "--n", "2"],
             expect="ok", check=lambda d, p: (d / "s.pdf").read_bytes().startswith(b"%PDF")),
        Case("cli-bench-peers-timeout-nan", [*PEERS, "--timeout", "nan"], says="--timeout must be >= 1, got nan"),
        Case("cli-bench-peers-plot-extension", [*PEERS, "--plot", "{D}/r.out"],
             says="a figure cannot be written as .out"),
        Case("cli-bench-peers-json-and-plot-one-file", [*PEERS, "--json", "{D}/r.png", "--plot", "{D}/r.png"],
             says="--json and --plot both name"),
    ]
