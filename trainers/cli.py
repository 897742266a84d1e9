"""``backmix train`` and ``backmix eval``."""
from __future__ import annotations

import argparse
from pathlib import Path

from backmix.cam_cache.node_folders import LAYOUTS as CACHE_LAYOUTS
from backmix.options import GEOMETRY, DefaultsFormatter, add_options
from backmix.osr_data.errors import BackMixError
from backmix.pipeline.loaders import backend_options
from backmix.osr_data.protocols import PROTOCOLS

from .config import AMP, AUTO_AUGMENTS, BETON_STORAGES, LOG_SINKS, OPTIMIZERS, REGEN, TrainConfig, field_defaults, option
from .methods import METHODS, method_fields
from .metrics import SCORES

S = argparse.SUPPRESS   # an option not given stays out of the namespace: we know what was explicit
TRAIN = "backmix.trainers.config:TrainConfig"   # the config whose field defaults the help states


def _d(name: str) -> str:
    return f" (default: {field_defaults()[name]})"


def register(top) -> None:
    from backmix.models import ARCH_HELP
    fmt = DefaultsFormatter
    p = top.add_parser("train", help="train an open-set classifier with BackMix (or the plain baseline)",
                       formatter_class=fmt,
                       description="Train on the known classes of DATA/train (less a validation split that "
                                   "selects RUN/best.pt), rebuild the foreground cache every few epochs, "
                                   "evaluate on DATA/test (known vs unknown classes; reporting only). "
                                   "Writes RUN/config.json (and config.yaml, which --config takes back), RUN/metrics.jsonl, "
                                   "RUN/train.log, RUN/last.pt, RUN/best.pt, "
                                   "RUN/summary.json (test metrics of last.pt and best.pt). "
                                   "Under torchrun every rank trains its share (DistributedDataParallel).")
    p.add_argument("--config", type=Path, metavar="RUN.yaml",
                   help="a YAML file of options (keys: these options' names, e.g. batch_size: 256); the command "
                        "line overrides it. Every run writes its own as RUN/config.yaml")
    p.add_argument("--data", type=Path, default=S,
                   help="prepared data set root holding train/ and test/ (required, here or in --config)")
    p.add_argument("--out", type=Path, default=S, help="run folder (default: runs/quick)")
    p.add_argument("--epochs", type=int, default=S, help="epochs" + _d("epochs"))
    p.add_argument("--arch", default=S, metavar="NAME", help=f"model: {ARCH_HELP}" + _d("arch"))
    p.add_argument("--width", type=float, default=S, help="cnn32 channel multiplier" + _d("width"))
    add_options(p, ("batch_size",), only_given=TRAIN)
    p.add_argument("--lr", type=float, default=S, help="peak learning rate" + _d("lr"))
    p.add_argument("--opt", choices=OPTIMIZERS, default=S, help="optimizer" + _d("opt"))
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=S,
                   help="Nesterov momentum for SGD" + _d("nesterov"))
    p.add_argument("--weight-decay", type=float, default=S, help=_d("weight_decay").strip())
    p.add_argument("--warmup-epochs", type=float, default=S,
                   help="linear warm-up before the cosine schedule" + _d("warmup_epochs"))
    split = p.add_mutually_exclusive_group()
    split.add_argument("--split", default=S,
                       help="open-set split number 0..4, or all: every class known, unknowns only from --open-test "
                            "folders (the Semantic Shift Benchmark's setting; without --open-test a closed-set "
                            "run)" + _d("split"))
    split.add_argument("--known", dest="split", default=S, metavar="A,B,C",
                       help="comma list of known class names instead of a numbered split")
    p.add_argument("--protocol", choices=PROTOCOLS, default=S,
                   help="the published splits of Neal et al. 2018 / ARPL for a folder with those classes (CIFAR10 "
                        "names; CIFAR10 + CIFAR100 names; TinyImageNet wnids): --split N picks split N; or the "
                        "Semantic Shift Benchmark (Vaze et al. 2022): ssb-imagenet trains on the 1,000 "
                        "ImageNet-1k wnid folders, ssb-cub|ssb-aircraft|ssb-scars on the known classes as folders "
                        "named by the benchmark's 3-digit class index (000, 001, ...), every class known (--split "
                        "all), and each --open-test folder named easy, medium, hard or medium+hard must hold that "
                        "published set of unknowns (docs/ssb.md); a folder whose classes do not match is refused")
    p.add_argument("--splits", dest="splits_file", default=S, metavar="FILE",
                   help="JSON list of splits, each a list of known class names (or {\"known\": [...], "
                        "\"unknown\": [...]}): --split N picks split N")
    p.add_argument("--val-fraction", type=float, default=S,
                   help="share of each known class's training images held out as the validation split (chosen "
                        "by --seed; never trained on, not in the cache): validated every epoch, it alone "
                        "selects RUN/best.pt; the test folder is for reporting only; 0: no validation, "
                        "best.pt is the last epoch" + _d("val_fraction"))
    p.add_argument("--open-test", action="append", default=S, metavar="DIR",
                   help="an image folder whose images are all unknown (any class names; e.g. an SSB or OpenOOD "
                        "set, or `backmix data prepare --dataset photo-crops`'s test/): every evaluation also "
                        "reports each metric against it, under its folder's name (DIR/test: DIR's name/test); "
                        "with an ssb-* --protocol, a folder named easy, medium, hard or medium+hard is that "
                        "published set and must hold its classes; repeatable")
    add_options(p, ("backend", "ray_address", "prefetch"), only_given=TRAIN)
    p.add_argument("--beton-mode", choices=BETON_STORAGES, default=S,
                   help="--backend ffcv: the betons to read, raw canvases (the reference loader's stream, bit for "
                        "bit) or jpg ones (smaller; the stream differs by the JPEG loss)" + _d("beton_mode"))
    p.add_argument("--jpeg-quality", type=int, default=S,
                   help="--backend ffcv --beton-mode jpg: the JPEG quality the betons were written at"
                        + _d("jpeg_quality"))
    p.add_argument("--no-backmix", dest="backmix", action="store_false", default=S,
                   help="the plain baseline: same loader and schedule, loss on the raw images only")
    p.add_argument("--w-raw", type=float, default=S,
                   help="weight of the clean (un-mixed) images' loss; 0 with BackMix: train on the mixed "
                        "images only, as the authors do (the loader then skips the clean crops)" + _d("w_raw"))
    p.add_argument("--w-mix", type=float, default=S, help="weight of the mixed images' loss" + _d("w_mix"))
    p.add_argument("--mix-prob", type=float, default=S, metavar="P",
                   help="BackMix at one forward pass per image: each image of a batch trains on its mixed crop "
                        "with probability P (drawn per image from seed, epoch, rank and step), else on its clean "
                        "one; the loss is --w-mix times CE on that crop (default: none, both crops)")
    p.add_argument("--method", choices=tuple(METHODS), default=None,
                   help="a recipe by name, as `backmix experiment` runs it: baseline (--no-backmix), "
                        "baseline-2view (two independently augmented clean crops of each image, CE on both "
                        "weighted as --w-raw and --w-mix: BackMix's forward passes without the mix), backmix "
                        "(clean + mixed), backmix-mixed (--w-raw 0), backmix-p50 (--mix-prob 0.5)")
    p.add_argument("--regen-every", type=int, default=S,
                   help="rebuild the foreground cache after every k epochs, 0 never" + _d("regen_every"))
    p.add_argument("--regen", choices=REGEN, default=S,
                   help="where a rebuild's CAMs come from: loop = the rebuild epoch's own batches, each with "
                        "the weights of its step (no second decode); pass = a separate pass over the data "
                        "after the epoch" + _d("regen"))
    p.add_argument("--momentum", type=float, default=S,
                   help="CAM momentum of a cache rebuild (share of the new map)" + _d("momentum"))
    add_options(p, (*GEOMETRY, "crop_from"), only_given=TRAIN)
    p.add_argument("--cache", default=S, help="foreground cache folder to use or share (default: RUN/cache)")
    p.add_argument("--cache-layout", choices=CACHE_LAYOUTS, default=S,
                   help="under torchrun: shared = every node sees the one --cache folder; node-local = each node "
                        "has its own (rank 0 publishes, the others get copies); auto = find out" + _d("cache_layout"))
    p.add_argument("--seed", type=int, default=S, help=_d("seed").strip())
    add_options(p, ("device",), only_given=TRAIN)
    p.add_argument("--amp", choices=AMP, default=S, help="mixed precision, CUDA only" + _d("amp"))
    add_options(p, ("workers",), only_given=TRAIN)
    p.add_argument("--eval-every", type=int, default=S,
                   help="evaluate every k epochs (always after the last)" + _d("eval_every"))
    p.add_argument("--save-every", type=int, default=S,
                   help="also save RUN/last.pt every N optimizer steps, mid-epoch, with the loader's position, "
                        "so --resume continues from that step (0: at epoch ends only)" + _d("save_every"))
    add_options(p, ("on_error",), only_given=TRAIN)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last.pt (mid-epoch if it was saved there); "
                        "refused if a field that shapes the model or the data differs")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=S,
                   help="no progress bar (on a terminal) and no progress lines (every 10%% of an epoch, otherwise)")
    p.add_argument("--log-every", type=int, default=S,
                   help="a line every N steps: loss, img/s, lr and the share of time spent waiting for data "
                        "(0: none); also into RUN/train.log" + _d("log_every"))
    p.add_argument("--log", default=S, metavar="csv,tensorboard",
                   help=f"extra sinks, a comma list of {', '.join(LOG_SINKS)}: csv = RUN/steps.csv (the --log-every "
                        "lines) and RUN/epochs.csv; tensorboard = event files in RUN/tensorboard (needs the "
                        "tensorboard package: backmix[tensorboard])")
    r = p.add_argument_group("recipe", "the usual ImageNet training recipe around the BackMix step")
    r.add_argument("--label-smoothing", type=float, default=S, help="of the cross-entropy targets" + _d("label_smoothing"))
    r.add_argument("--ema", type=float, default=S, metavar="DECAY",
                   help="keep an EMA of the weights (timm ModelEmaV3, e.g. 0.9998); evaluation and best.pt use "
                        "it (0: none)" + _d("ema"))
    r.add_argument("--clip-grad", type=float, default=S, metavar="NORM",
                   help="clip the gradients' global L2 norm (0: no clipping)" + _d("clip_grad"))
    r.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=S,
                   help="under torchrun on CUDA: BatchNorm statistics over all ranks (SyncBatchNorm)" + _d("sync_bn"))
    r.add_argument("--auto-augment", choices=AUTO_AUGMENTS, default=S,
                   help="torchvision's TrivialAugmentWide or RandAugment on each training crop, after the mix "
                        "and the crop, on the device (not with --backend dali)" + _d("auto_augment"))
    r.add_argument("--pretrained", default=S, metavar="FILE",
                   help="start from the weights in FILE: a torchvision/timm state dict (.pt/.pth, read with "
                        "weights_only) or .safetensors of the same --arch; its head is replaced by a new one "
                        "for the known classes")
    r.add_argument("--mixup", type=float, default=S, metavar="ALPHA",
                   help="Mixup (timm) of each part of the batch with Beta(ALPHA, ALPHA) (0: none)" + _d("mixup"))
    r.add_argument("--cutmix", type=float, default=S, metavar="ALPHA",
                   help="CutMix (timm), ALPHA as --mixup; with both, each batch takes one of the two" + _d("cutmix"))
    r.add_argument("--grad-accum-steps", type=int, default=S, metavar="N",
                   help="step the optimiser every N batches on their mean gradient (an N times larger batch in "
                        "the memory of one, but for BatchNorm's statistics, which stay per batch); the schedule, "
                        "--log-every and --save-every count optimiser steps; under torchrun the ranks exchange "
                        "gradients once every N batches" + _d("grad_accum_steps"))
    r.add_argument("--compile", action=argparse.BooleanOptionalAction, default=S,
                   help="torch.compile the model for the training forward (the first steps compile it: slower; "
                        "evaluation, the cache rebuild's CAMs and the checkpoints use the plain module, the same "
                        "weights); --resume may add or drop it" + _d("compile"))
    p.set_defaults(func=run_train)

    e = top.add_parser("eval", help="open-set metrics of a checkpoint on a data set's test folder",
                       formatter_class=fmt,
                       description="Closed-set accuracy on the known classes; AUROC, FPR at 95%% TPR and "
                                   "OSCR of known vs unknown test images, scored by maximum softmax "
                                   "probability (MSP), maximum logit (MLS) and energy (logsumexp of the logits).")
    e.add_argument("--checkpoint", type=Path, required=True, help="a last.pt or best.pt of `backmix train`")
    e.add_argument("--data", type=Path, required=True, help="prepared data set root holding train/ and test/")
    add_options(e, ("backend",))
    e.add_argument("--split", default=None,
                   help="known classes (split number or names); default: those the checkpoint was trained on")
    add_options(e, ("canvas_mode",), defaults={"canvas_mode": None},
                said={"canvas_mode": "the checkpoint's"})
    e.add_argument("--open-test", action="append", default=[], metavar="DIR",
                   help="an image folder whose images are all unknown: the metrics against it too, under its "
                        "folder's name; repeatable")
    add_options(e, ("device", "workers", "on_error"))
    e.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    e.set_defaults(func=run_eval)


def config_from_args(args) -> tuple[TrainConfig, set[str]]:
    """The run's config (defaults < --config file < command line) and the fields given explicitly."""
    from .config_file import read_config_file
    values = read_config_file(args.config) if getattr(args, "config", None) else {}
    given = {k: v for k, v in vars(args).items() if k in field_defaults()}
    for key in ("data", "out", "cache", "splits_file"):
        if given.get(key) is not None:
            given[key] = str(given[key])
    values.update(given)
    if getattr(args, "method", None):
        for key, value in method_fields(args.method).items():
            if key in given and given[key] != value:
                flag = "--no-backmix" if key == "backmix" else option(key)
                raise BackMixError(f"--method {args.method} sets {flag} itself; leave {flag} out")
            values[key] = value
    if not values.get("data"):
        raise BackMixError("--data is required (on the command line or in --config)")
    values.setdefault("out", "runs/quick")
    explicit = set(values) - {"data", "out"}
    if explicit & {"backend", "ray_address", "prefetch", "beton_mode", "jpeg_quality"}:
        # a backend's options with another backend; a default value (as a run's config.yaml holds
        # every option) asks for nothing
        defaults = field_defaults()
        asked = {k: None if values.get(k, defaults[k]) == defaults[k] else values[k]
                 for k in ("ray_address", "prefetch", "beton_mode", "jpeg_quality")}
        backend_options(values.get("backend", defaults["backend"]), **asked)
    return TrainConfig(**values), explicit | {"data"}


def run_train(args) -> int:
    from .train import main
    cfg, explicit = config_from_args(args)
    main(cfg, resume=args.resume, explicit=explicit)
    return 0


def run_eval(args) -> int:
    import json

    from .eval_checkpoint import evaluate_checkpoint
    if args.workers < 0:
        raise BackMixError(f"--workers must be >= 0, got {args.workers}")
    m = evaluate_checkpoint(args.checkpoint, args.data, backend=args.backend, split=args.split,
                            device=args.device, workers=args.workers, on_error=args.on_error,
                            canvas_mode=args.canvas_mode, open_test=tuple(str(d) for d in args.open_test))
    if args.json:
        print(json.dumps(m))
        return 0
    print(f"{args.checkpoint} on {args.data}/test: {m['num_known']} known, {m['num_unknown']} unknown images")
    print(f"  closed-set accuracy  {m['accuracy']:.4f}")
    held_out = (("held-out classes", m),) if m["num_unknown"] else ()   # none with every class known
    for unknowns, metrics in (*held_out, *m.get("open_test", {}).items()):
        print(f"  unknowns: {unknowns} ({metrics['num_unknown']} images)")
        for score, name in SCORES:
            print(f"    {name:24s} AUROC {metrics['auroc_' + score]:.4f}  FPR@95%TPR {metrics['fpr95_' + score]:.4f}  "
                  f"OSCR {metrics['oscr_' + score]:.4f}")
    return 0

