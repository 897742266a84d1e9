"""The library-edge cases of ``scripts/probe.py``: a public call given the wrong kind of argument, or one
whose result would be silently wrong (a split ignored, a half-read loader state, labels no logit has,
a backend's malformed canvases, a rebuild with a model of other classes). ``S`` is the shared folder
(``probe_cases.shared_setup``): S/data with the classes ant, bee, cat, dog."""
from __future__ import annotations

from probe import Case
from probe_cases import LIB

DATA = LIB + "data = backmix.open_set_data(S + '/data', 'ant,cat'); L = dict(num_workers=0, device='cpu')\n"
TALL = ("from backmix.pipeline.loaders import register_backend\n"
        "from backmix.pipeline.reference import WorkerSource\n"
        "import torch\n"
        "class Tall(WorkerSource):\n"
        "    def decode(self, path, size, mode):\n"
        "        return torch.zeros(3, size + 1, size, dtype=torch.uint8)\n"
        "register_backend('tall', Tall)\n")
REBUILD = DATA + ("from backmix.models import build_model\n"
                  "tr = backmix.loader(data, cache=D + '/c', batch_size=4, **L)\n")


def printed(text: str):
    return lambda d, proc: text in proc.stdout


def cases() -> list[Case]:
    return [
        # argument types and ranges, checked where the public call takes them
        Case("lib-edge-val-fraction-a-string", code=LIB + "backmix.open_set_data(S + '/data', 'ant,cat', "
                                                          "val_fraction='0.1')", says="val_fraction"),
        Case("lib-edge-loader-batch-size-a-float", code=DATA + "backmix.loader(data, batch_size=2.5, **L)",
             says="batch_size"),
        Case("lib-edge-loader-split-with-open-set-data", code=DATA + "backmix.loader(data, split=3, **L)",
             says="split"),
        Case("lib-edge-loader-std-denormal", code=DATA + "backmix.loader(data, std=(1e-40, 1, 1), **L)", says="std"),
        # a loader state
        Case("lib-edge-state-epoch-not-whole", code=DATA + "backmix.loader(data, **L).load_state_dict("
                                                           "{'epoch': 1.9, 'step': 0, 'skipped': 0})",
             says="not a loader state"),
        # metrics
        Case("lib-edge-fpr-at-tpr-above-1", code=LIB + "import numpy as np; backmix.fpr_at_tpr("
                                                       "np.array([.9, .5]), np.array([.1, .2]), tpr=2)", says="tpr"),
        Case("lib-edge-metrics-labels-outside", code=LIB + "import torch; backmix.open_set_metrics(torch.tensor("
                                                           "[[.1, 1.], [.2, .1]]), torch.tensor([5, -3]), "
                                                           "torch.tensor([[.3, .9]]))", says="labels_known"),
        # register_backend
        Case("lib-edge-register-backend-not-a-source", code=LIB + "from backmix.pipeline.loaders import "
                                                                  "register_backend; register_backend('x', 42)",
             says="source"),
        Case("lib-edge-backend-malformed-canvases", code=DATA + TALL + "next(iter(backmix.loader(data, "
                                                                       "backend='tall', batch_size=4, **L)))",
             says="backend 'tall'"),
        # the in-loop rebuild
        Case("lib-edge-rebuilding-model-of-other-classes", code=REBUILD + "backmix.rebuilding(tr, build_model("
                                                                          "'cnn32', 4, width=0.25))",
             says="model has 4 outputs"),
        Case("lib-edge-rebuilding-reused-and-float64", expect="ok", check=printed("generations [1, 2]"),
             code=REBUILD + ("r = backmix.rebuilding(tr, build_model('cnn32', 2, width=0.25).double())\n"
                             "out = []\n"
                             "for e in range(2):\n"
                             "    tr.set_epoch(e)\n"
                             "    with r:\n"
                             "        [r.record(b) for b in tr]\n"
                             "    out.append(r.generation)\n"
                             "print('generations', out)\n")),
    ]
