"""Option values the command line offers and the code checks, importable without torch
(so that ``backmix --help`` and ``backmix cache info`` start fast)."""

# How an image becomes the square canvas the mix works on: "center" = Resize(shorter side) +
# CenterCrop (the authors' loader, aspect ratio kept); "stretch" = both sides resized.
CANVAS_MODES = ("center", "stretch")
