"""The layer table of format 1 (FORMAT.md, "Layers"): one registry entry per layer type.

A ``LayerType`` says everything vaeeval knows about one layer: the keys its spec
takes, how to build it, which torch modules are that layer (for ``save_model``)
and which traced function and method calls compute it (for ``convert``). Adding
a layer type means adding one entry here.

A builder checks its keys and tensors against the shape that reaches it (a dry
shape check: nothing is computed) and returns the module and the shape it
gives, so a file whose shapes do not chain is refused with the layer and both
shapes named before any data is touched. Shapes here never include the batch axis.
"""

import importlib

from vaeeval.format.layers.base import (
    DROPPED,
    LAYER_TYPES,
    BuiltLayer,
    LayerType,
    Shape,
    build_layer,
    describe,
    format_shape,
    function_layer,
    is_layer_module,
    layer_spec,
    method_layer,
    register,
)

# Each layer type registers itself when its module is imported: this order is the order errors list them in.
for _module in ("linear", "norm", "conv", "elementwise", "shape"):
    importlib.import_module(f"{__name__}.{_module}")

from vaeeval.format.layers.linear import Chain, Linear  # noqa: E402
from vaeeval.format.layers.shape import Reshape  # noqa: E402

__all__ = [
    "DROPPED",
    "LAYER_TYPES",
    "BuiltLayer",
    "Chain",
    "LayerType",
    "Linear",
    "Reshape",
    "Shape",
    "build_layer",
    "describe",
    "format_shape",
    "function_layer",
    "is_layer_module",
    "layer_spec",
    "method_layer",
    "register",
]
