"""One node description, two ComfyUI APIs.

Each node is written once as a plain class: NODE_ID, DISPLAY_NAME, DESCRIPTION, INPUTS (or an
`inputs()` classmethod when options change at run time), OUTPUTS
and a `run(**inputs) -> tuple` function. `comfy_node` turns it into a V3 `io.ComfyNode` when
`comfy_api` is importable (current ComfyUI), else into a V1 class (INPUT_TYPES / RETURN_TYPES),
so old installs load the same nodes. Inputs are `(name, TYPE, options)` with TYPE a ComfyUI type
name ("INT", "STRING", "CLIP", ...), a list of combo options, or a custom type name;
options use the V1/V3 shared keys (default, min, max, step, tooltip, multiline, optional).
"""

from __future__ import annotations

import inspect
from typing import Any

CATEGORY = "promptist"

try:  # V3 API: ComfyUI from mid-2025 on
    from comfy_api.latest import io as comfy_io
except ImportError:  # older ComfyUI, or no ComfyUI at all (tests)
    comfy_io = None

HAS_V3 = comfy_io is not None


def _inputs(spec: type) -> list:
    """INPUTS, or `inputs()` for nodes whose options change at run time (a list of model folders)."""
    return spec.inputs() if hasattr(spec, "inputs") else spec.INPUTS


def _v1_input_types(spec: type) -> dict[str, dict[str, Any]]:
    required: dict[str, Any] = {}
    optional: dict[str, Any] = {}
    for name, kind, opts in _inputs(spec):
        opts = dict(opts)
        target = optional if opts.pop("optional", False) else required
        target[name] = (kind, opts) if opts else (kind,)
    return {"required": required, "optional": optional}


def _v1_class(spec: type) -> type:
    attrs = {
        "__doc__": spec.__doc__,
        "CATEGORY": CATEGORY,
        "DESCRIPTION": spec.DESCRIPTION,
        "RETURN_TYPES": tuple(kind for kind, _, _ in spec.OUTPUTS),
        "RETURN_NAMES": tuple(name for _, name, _ in spec.OUTPUTS),
        "OUTPUT_TOOLTIPS": tuple(tip for _, _, tip in spec.OUTPUTS),
        "FUNCTION": "run",
        "OUTPUT_NODE": getattr(spec, "OUTPUT_NODE", False),
        "INPUT_TYPES": classmethod(lambda cls: _v1_input_types(spec)),
        "run": staticmethod(spec.run),
        "SPEC": spec,
    }
    if hasattr(spec, "validate"):
        attrs["VALIDATE_INPUTS"] = staticmethod(spec.validate)
    return type(spec.NODE_ID, (), attrs)


_V3_TYPES = {
    "INT": "Int", "FLOAT": "Float", "STRING": "String", "BOOLEAN": "Boolean", "IMAGE": "Image",
    "CLIP": "Clip", "CONDITIONING": "Conditioning", "MODEL": "Model", "VAE": "Vae", "LATENT": "Latent",
}


def _v3_type(kind):
    if isinstance(kind, (list, tuple)):
        return comfy_io.Combo
    if kind in _V3_TYPES:
        return getattr(comfy_io, _V3_TYPES[kind])
    return comfy_io.Custom(kind)


def _v3_class(spec: type) -> type:
    def define_schema(cls):
        inputs = []
        for name, kind, opts in _inputs(spec):
            opts = dict(opts)
            if isinstance(kind, (list, tuple)):
                opts["options"] = list(kind)
            inputs.append(_v3_type(kind).Input(name, **opts))
        outputs = [_v3_type(kind).Output(display_name=name, tooltip=tip) for kind, name, tip in spec.OUTPUTS]
        return comfy_io.Schema(
            node_id=spec.NODE_ID, display_name=spec.DISPLAY_NAME, category=CATEGORY,
            description=spec.DESCRIPTION, inputs=inputs, outputs=outputs,
            is_output_node=getattr(spec, "OUTPUT_NODE", False),
        )

    def execute(cls, **inputs):
        return comfy_io.NodeOutput(*spec.run(**inputs))

    attrs = {"__doc__": spec.__doc__, "define_schema": classmethod(define_schema),
             "execute": classmethod(execute), "SPEC": spec}
    if hasattr(spec, "validate"):
        attrs["validate_inputs"] = classmethod(lambda cls, **inputs: spec.validate(**_accepted(spec.validate, inputs)))
    return type(spec.NODE_ID, (comfy_io.ComfyNode,), attrs)


def _accepted(function, inputs: dict) -> dict:
    """The inputs `function` takes by name (the V3 executor offers every input to `validate_inputs`)."""
    params = inspect.signature(function).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return inputs
    return {k: v for k, v in inputs.items() if k in params}


def comfy_node(spec: type) -> type:
    """The ComfyUI node class for `spec`: V3 where available, V1 otherwise."""
    return _v3_class(spec) if HAS_V3 else _v1_class(spec)


def v1_node(spec: type) -> type:
    """The V1 class for `spec` (what old ComfyUI loads; tests inspect it without a ComfyUI)."""
    return _v1_class(spec)
