"""ComfyUI's graph validation of one node, as its executor does it, for tests without a ComfyUI.

Follows `validate_inputs` in ComfyUI's execution.py (Comfy-Org/ComfyUI a125cd8, 2025-10-12): the
validator's parameter names come from `inspect.getfullargspec`; an input named there (or every input,
when the validator takes **kwargs) skips ComfyUI's own min/max/combo checks and is handed to the
validator (a linked input as None); a failed validator is reported once per input handed to it.
"""

from __future__ import annotations

import inspect

LINK = object()  # stands for a linked input: its value is unknown while the graph is validated


def validate_node(node: type, values: dict, *, v3_validate=None) -> list[tuple[str, str]]:
    """(input name, message) for each error ComfyUI would show. `node` is the V1 class (its INPUT_TYPES);
    `v3_validate` the V3 `validate_inputs` classmethod to use instead of VALIDATE_INPUTS."""
    types = node.INPUT_TYPES()
    inputs = {**types.get("required", {}), **types.get("optional", {})}
    if v3_validate is not None:
        validate = type("V3Node", (), {"validate_inputs": v3_validate}).validate_inputs
    else:
        validate = getattr(node, "VALIDATE_INPUTS", None)
    names, has_kwargs = [], False
    if validate is not None:
        spec = inspect.getfullargspec(validate)
        names, has_kwargs = spec.args, spec.varkw is not None

    errors = []
    for name, (kind, *rest) in inputs.items():
        if name not in values or values[name] is LINK:
            continue
        opts, val = (rest[0] if rest else {}), values[name]
        if name in names or has_kwargs:
            continue
        if "min" in opts and val < opts["min"]:
            errors.append((name, f"Value {val} smaller than min of {opts['min']}"))
        elif "max" in opts and val > opts["max"]:
            errors.append((name, f"Value {val} bigger than max of {opts['max']}"))
        elif isinstance(kind, list) and val not in kind:
            errors.append((name, f"Value not in list: {name}: '{val}'"))

    if names or has_kwargs:
        handed = {k: (None if v is LINK else v) for k, v in values.items() if k in names or has_kwargs}
        result = validate(**handed)
        if result is not True:
            errors += [(name, f"{name} - {result}") for name in handed]
    return errors
