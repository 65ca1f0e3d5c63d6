"""One node description, two ComfyUI APIs.

Each node is written once as a plain class: NODE_ID, DISPLAY_NAME, DESCRIPTION, INPUTS (or an
`inputs()` classmethod when options change at run time), OUTPUTS
and a `run(**inputs) -> tuple` function. `comfy_node` turns it into a V3 `io.ComfyNode` when
`comfy_api` is importable (current ComfyUI), else into a V1 class (INPUT_TYPES / RETURN_TYPES),
so old installs load the same nodes. Inputs are `(name, TYPE, options)` with TYPE a ComfyUI type
name ("INT", "STRING", "CLIP", ...), a list of combo options, or a custom type name;
options use the V1/V3 shared keys (default, min, max, step, tooltip, multiline, optional).
An optional `validate(<one input>=None) -> True | str` checks one input before the graph runs;
ComfyUI keeps checking the others' ranges and combos itself (see `_validated_input`).
`ALWAYS_RUN = True` marks a node whose output is not a function of its inputs (a training run that
continues where the last one stopped): ComfyUI then runs it on every queue instead of returning its
cached output (V1 `IS_CHANGED` / V3 `fingerprint_inputs` answer NaN, which never equals itself) and
never merges two such nodes (`NOT_IDEMPOTENT` / `not_idempotent`).
An optional `fingerprint(**inputs) -> str` says what else the output depends on (a model folder's contents):
ComfyUI runs the node again when it answers something new (V1 `IS_CHANGED` / V3 `fingerprint_inputs`) and
keeps the cached output while it answers the same.
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
    if getattr(spec, "ALWAYS_RUN", False):
        attrs["NOT_IDEMPOTENT"] = True
        attrs["IS_CHANGED"] = classmethod(_always_changed)
    elif hasattr(spec, "fingerprint"):
        attrs["IS_CHANGED"] = _fingerprint_of(spec)
    if hasattr(spec, "validate"):
        _validated_input(spec)
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
            not_idempotent=getattr(spec, "ALWAYS_RUN", False),
        )

    def execute(cls, **inputs):
        return comfy_io.NodeOutput(*spec.run(**inputs))

    attrs = {"__doc__": spec.__doc__, "define_schema": classmethod(define_schema),
             "execute": classmethod(execute), "SPEC": spec}
    if getattr(spec, "ALWAYS_RUN", False):
        attrs["fingerprint_inputs"] = classmethod(_always_changed)
    elif hasattr(spec, "fingerprint"):
        attrs["fingerprint_inputs"] = _fingerprint_of(spec)
    if hasattr(spec, "validate"):
        attrs["validate_inputs"] = v3_validate_inputs(spec)
    return type(spec.NODE_ID, (comfy_io.ComfyNode,), attrs)


def _always_changed(cls, **inputs) -> float:
    """NaN: never equal to the last run's fingerprint, so ComfyUI runs the node again."""
    return float("nan")


def _fingerprint_of(spec: type) -> classmethod:
    """`spec.fingerprint` as the classmethod ComfyUI calls with the node's inputs."""
    def fingerprint(cls, **inputs):
        return spec.fingerprint(**inputs)
    return classmethod(fingerprint)


def _validated_input(spec: type) -> str:
    """The one input `spec.validate` checks. ComfyUI's executor (execution.py `validate_inputs`) reads the
    validator's parameter names: every input named there, or all of them with **kwargs, skips ComfyUI's
    own min/max/combo checks, and a failure is reported once per named input. So a validator takes
    exactly one input, by name."""
    params = list(inspect.signature(spec.validate).parameters.values())
    if len(params) != 1 or params[0].kind not in (params[0].POSITIONAL_OR_KEYWORD, params[0].KEYWORD_ONLY):
        raise TypeError(f"{spec.__name__}.validate must take exactly one input by name, got "
                        f"{inspect.signature(spec.validate)}: ComfyUI skips its own checks on every input a "
                        "validator names and repeats the error once per input")
    return params[0].name


def v3_validate_inputs(spec: type) -> classmethod:
    """V3's `validate_inputs` for `spec`: a classmethod whose signature is `(cls, <the validated input>)`,
    not `(cls, **inputs)` (see `_validated_input`). ComfyUI inspects it with `getfullargspec`, which reads
    `__signature__`."""
    name = _validated_input(spec)

    def validate_inputs(cls, **inputs):
        return spec.validate(**inputs)

    validate_inputs.__signature__ = inspect.Signature(
        [inspect.Parameter("cls", inspect.Parameter.POSITIONAL_OR_KEYWORD),
         inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)])
    return classmethod(validate_inputs)


def comfy_node(spec: type) -> type:
    """The ComfyUI node class for `spec`: V3 where available, V1 otherwise."""
    return _v3_class(spec) if HAS_V3 else _v1_class(spec)


def v1_node(spec: type) -> type:
    """The V1 class for `spec` (what old ComfyUI loads; tests inspect it without a ComfyUI)."""
    return _v1_class(spec)
