"""The choices and defaults of `convserve import`, without the libraries that act on them (so the
command's help never loads onnx or ONNX Runtime)."""

from __future__ import annotations

from modelcontract.metadata import LOGITS, PROBABILITIES

Triple = tuple[float, float, float]

NORMALIZATIONS: dict[str, tuple[Triple, Triple]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),  # the graph normalizes [0, 1] pixels itself
}
"""`--mean` presets: (mean, std) on the [0, 1] pixel scale, RGB."""
DEFAULT_NORMALIZATION = "imagenet"
CROP_FRACTION = 0.875
"""Default share of the resized image the center crop keeps: resize = floor(size / 0.875), as timm."""
DEFAULT_INTERPOLATION = "bilinear"

AUTO = "auto"
NCHW = "nchw"
NHWC = "nhwc"
LAYOUTS = (AUTO, NCHW, NHWC)
"""`--layout`: where the colour channels are; auto = the axis of size 3."""
OUTPUT_CHOICES = (AUTO, LOGITS, PROBABILITIES)
"""`--output`: what the output rows are; auto = probabilities when the smoke run's rows sum to 1."""
YES = "yes"
NO = "no"
EMBEDDING_NORMALIZED_CHOICES = (AUTO, YES, NO)
"""`--embedding-normalized`: whether the graph scales embedding rows to unit L2 length itself; auto = yes
when every smoke-run row has unit length."""
