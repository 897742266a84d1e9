"""Option values the command line offers and the code checks, importable without torch
(so that ``backmix --help`` and ``backmix cache info`` start fast)."""

# How an image becomes the square canvas the mix works on: "center" = Resize(shorter side) +
# CenterCrop (the authors' loader, aspect ratio kept); "stretch" = both sides resized.
CANVAS_MODES = ("center", "stretch")

# Where a training RandomResizedCrop is cut from: "canvas" = the square canvas above (the authors');
# "image" = the whole image, its box drawn in the image's own pixels by torchvision's law.
CROP_FROM = ("canvas", "image")
CROP_FROM_HELP = ("where RandomResizedCrop (--augment rrc) cuts its training crops: canvas = from the square "
                  "canvas (the authors'); image = from the whole image, its box drawn by torchvision's law in "
                  "the image's pixels, the foreground grid and the mix's box stretched over the image "
                  "(needs --canvas-mode stretch, whose canvas is the whole image)")
