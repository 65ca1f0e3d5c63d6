"""Errors a webui user sees, and how a script hook stops the job with one (the webui would swallow it)."""

from __future__ import annotations

import functools
import html
import re
import sys

from promptist_core.dfprompt import DFPromptError, has_dfprompt, parse
from promptist_core.weights import WeightsNotFoundError

# Rewrites and errors go into prompts, the infotext (one line per key) and HTML: no control characters.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")


class PromptistError(RuntimeError):
    """An error the user must see. The webui shows it as `PromptistError: ...` in the UI's info box and
    returns it from the API (`errors` field; HTTP `status_code`: 422 for a bad prompt, else 500)."""

    def __init__(self, message: str, status_code: int = 500):
        # The webui's error box escapes HTML and drops line breaks: a multi-line message (weights' "Looked
        # in:" list) would run together there, so its lines are joined with " | ".
        super().__init__(one_line(message))
        self.status_code = status_code  # read by the webui's API error handler (vars(e)['status_code'])


def one_line(message: str) -> str:
    return " | ".join(line.strip() for line in str(message).strip().splitlines() if line.strip())


# The webui runs every script hook inside `try: ... except Exception: errors.report(...)`
# (modules/scripts.py, A1111 1.10 and Forge alike): an exception raised in `process` only reaches the
# console and the job goes on without us. The methods below are what `process_images_inner` calls next
# *outside* those wrappers: `p.init` right after the scripts' `process`, `p.save_samples` right after
# `postprocess_batch_list`. Replacing them on this job's `p` makes the webui raise our error itself,
# which stops the job and shows the error the webui's own way (UI info box, API error response).
BEFORE_SAMPLING = ("init", "setup_conds", "sample")
AFTER_SAMPLING = ("save_samples",)
_PENDING = "_promptist_errors"


def stop_job(p, error: PromptistError, at: tuple[str, ...] = BEFORE_SAMPLING) -> None:
    """Make the webui stop this job with `error` at its next call of one of `p`'s methods `at`."""
    errors = getattr(p, _PENDING, None)
    if errors is None:
        errors = []
        setattr(p, _PENDING, errors)
    errors.append(error)

    def raise_pending(*args, **kwargs):
        first = errors[0]
        message = "\n".join(str(e) for e in errors)
        raise PromptistError(message, status_code=first.status_code)

    for name in at:
        setattr(p, name, raise_pending)


def as_user_error(error: Exception, doing: str) -> PromptistError:
    """One message a user can act on: what failed, then the error's own text (which names files or columns)."""
    if isinstance(error, PromptistError):
        return error
    detail = str(error).strip() or type(error).__name__
    status = 422 if isinstance(error, ValueError) else 500  # a bad prompt or option; else files or models
    return PromptistError(f"{doing}: {detail}", status_code=status)  # shown as "PromptistError: <doing>: ..."


def guarded(p, doing: str, run, at: tuple[str, ...] = BEFORE_SAMPLING) -> bool:
    """Run `run()`; on an error, log it and stop the job with it (stop_job). True when it ran."""
    try:
        run()
        return True
    except Exception as e:  # everything reaches the user; nothing is swallowed
        error = as_user_error(e, doing)
        print(f"*** {error}", file=sys.stderr)
        stop_job(p, error, at)
        return False


def shown_in_ui(func, extra_outputs: list):
    """A tab button's function whose PromptistError (what the user caused: a bad save name, a missing model,
    a bad setting) is shown in the webui's own error box, with one console line.

    Raised, it would reach the webui's call wrapper (modules/call_queue.py `wrap_gradio_call_no_job`), which
    prints `*** Error completing request`, the arguments and a full traceback (A1111 1.10; Forge classic prints
    the traceback too) before showing `<div class='error'>{type}: {message}</div>`. Returned here as that same
    box, after `extra_outputs` (the wrapper appends its timing to the last output). Any other exception is a bug
    and still reaches the wrapper with its traceback."""

    @functools.wraps(func)
    def call(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (PromptistError, WeightsNotFoundError) as e:  # a missing model is the user's to fix too
            message = f"PromptistError: {one_line(str(e))}"
            print(f"*** {message}", file=sys.stderr)
            return (*extra_outputs, f"<div class='error'>{html.escape(message)}</div>")

    return call


PROMPT_LISTS = {"all_prompts": "prompt", "all_negative_prompts": "negative prompt",
                "all_hr_prompts": "hires prompt", "all_hr_negative_prompts": "hires negative prompt"}


def check_dfprompts(p) -> None:
    """Parse every DF-Prompt of the job; a bad one raises PromptistError naming the prompt and the column."""
    for name, label in PROMPT_LISTS.items():
        for i, text in enumerate(getattr(p, name, None) or []):
            if not (isinstance(text, str) and has_dfprompt(text)):
                continue
            try:
                parse(text, host_brackets=True)
            except DFPromptError as e:
                which = f"{label} of image {i + 1}" if len(set(getattr(p, name))) > 1 else label
                raise PromptistError(f"DF-Prompt error in the {which}, {dfprompt_message(e)}", status_code=422) from e


def dfprompt_message(error: DFPromptError) -> str:
    """'column 21: expected ...: "a red horse, [anime:▶1-0.5:1.5]"': a DFPromptError on one line."""
    return f"column {error.column}: {error.expected}: {mark_column(error.text, error.column)}"


def mark_column(text: str, column: int, context: int = 30) -> str:
    """'a red horse, [anime:1-0.5:1.5]', 21 -> '"a red horse, [anime:▶1-0.5:1.5]"': the place on one line.

    The webui shows an error as HTML, where DFPromptError's caret line (a second line of spaces and `^`)
    collapses to a lone `^` after the prompt; a marker inside the text survives HTML, JSON and the console.
    """
    i = column - 1
    start, end = max(0, i - context), min(len(text), i + context)
    before = ("…" if start > 0 else "") + text[start:i]
    after = text[i:end] + ("…" if end < len(text) else "")
    return CONTROL_CHARACTERS.sub(" ", f'"{before}▶{after}"')
