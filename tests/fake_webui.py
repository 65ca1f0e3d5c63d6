"""Just enough of the webui's modules (and gradio) to load the extension (scripts/promptist.py, which imports
promptist_webui) and its webui classes in CI.

The fakes record what the script registers and run a job's script hooks the way A1111 1.10's
`modules/scripts.py` and `process_images_inner` do: each hook inside `except Exception` (logged
only), then `p.init(...)` outside any wrapper. No webui code is copied: only that calling order.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from types import SimpleNamespace


class _Component:
    clicks: list = []  # (button, fn, inputs, outputs, other keywords) of every .click, for tests to press

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def click(self, fn=None, inputs=(), outputs=(), **kwargs):
        _Component.clicks.append((self, fn, list(inputs), list(outputs), kwargs))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def fake_modules(models_path: Path, settings: dict) -> dict[str, types.ModuleType]:
    gradio = types.ModuleType("gradio")
    for name in ("Accordion", "Checkbox", "Dropdown", "Radio", "Textbox", "Slider", "Number", "Button", "HTML",
                 "Row", "Column", "Blocks", "Tabs", "Tab", "Image"):
        setattr(gradio, name, _Component)

    registered = {"ui_tabs": [], "ui_settings": [], "infotext_pasted": [], "options": {}}
    callbacks = types.ModuleType("modules.script_callbacks")
    for kind in ("ui_tabs", "ui_settings", "infotext_pasted"):
        setattr(callbacks, f"on_{kind}", registered[kind].append)
    callbacks.registered = registered

    scripts = types.ModuleType("modules.scripts")
    scripts.AlwaysVisible = object()

    class Script:
        def elem_id(self, name):
            return name

    scripts.Script = Script

    shared = types.ModuleType("modules.shared")
    shared.models_path = str(models_path)
    shared.opts = SimpleNamespace(data=dict(settings), add_option=registered["options"].__setitem__)
    shared.state = FakeState()
    shared.sd_model = SimpleNamespace(sd_checkpoint_info=SimpleNamespace(name_for_extra="tiny-sd15"))
    shared.OptionInfo = lambda default, label="", component=None, component_args=None, **kw: SimpleNamespace(
        default=default, label=label, component=component, component_args=component_args, **kw)

    devices = types.ModuleType("modules.devices")
    devices.device = "cpu"
    call_queue = types.ModuleType("modules.call_queue")
    call_queue.wrap_gradio_gpu_call = lambda func, extra_outputs=None: func
    samplers = types.ModuleType("modules.sd_samplers")
    samplers.find_sampler_config = lambda name: None
    processing = FakeProcessing(shared.state)

    package = types.ModuleType("modules")
    package.__path__ = []
    for name, module in (("script_callbacks", callbacks), ("scripts", scripts), ("shared", shared),
                         ("devices", devices), ("call_queue", call_queue), ("sd_samplers", samplers),
                         ("processing", processing)):
        setattr(package, name, module)
    mods = {f"modules.{n}": m for n, m in (("script_callbacks", callbacks), ("scripts", scripts),
                                             ("shared", shared), ("devices", devices),
                                             ("call_queue", call_queue), ("sd_samplers", samplers),
                                             ("processing", processing))}
    return {"gradio": gradio, "modules": package, **mods}


ADAPTER = Path(__file__).resolve().parents[1] / "promptist_webui"


def forget_adapter(monkeypatch) -> None:
    """Let the entry import `promptist_webui` afresh, over this fake webui's modules (the webui imports it
    once per process); whatever was imported before is back when the test ends."""
    names = {"promptist_webui", *(f"promptist_webui.{f.stem}" for f in ADAPTER.glob("*.py")),
             *(n for n in sys.modules if n.startswith("promptist_webui."))}
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)  # remembers what was there (or that nothing was)
        del sys.modules[name]


def load_script_in_fake_webui(script_path: Path, monkeypatch, models_path: Path, settings: dict):
    """Execute the entry by path, as the webui does, with the fake webui's modules importable."""
    for name, module in fake_modules(models_path, settings).items():
        monkeypatch.setitem(sys.modules, name, module)
    forget_adapter(monkeypatch)
    return execute_entry(script_path)


def execute_entry(script_path: Path):
    """One execution of scripts/promptist.py (the webui runs it again on Reload UI)."""
    spec = importlib.util.spec_from_file_location("promptist_script_in_fake_webui", script_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Job:
    """The processing object's fields and methods our hooks and the webui's next steps touch."""

    def __init__(self, prompt: str, *, steps: int = 20, batch: int = 1):
        self.prompt = self.main_prompt = prompt
        self.all_prompts = [prompt] * batch
        self.all_negative_prompts = [""] * batch
        self.all_seeds = list(range(1, batch + 1))
        self.prompts, self.batch_size = list(self.all_prompts), batch
        self.steps, self.sampler_name = steps, "Euler"
        self.extra_generation_params = {}
        self.sampled = False

    def init(self, prompts, seeds, subseeds):
        pass

    def setup_conds(self):
        pass

    def sample(self, *args, **kwargs):
        self.sampled = True

    def save_samples(self):
        return False


def run_process_hook(script, p, *args) -> list[Exception]:
    """`ScriptRunner.process` (each script's exception logged, not raised), then what the webui calls next."""
    logged = []
    try:
        script.process(p, *args)
    except Exception as e:
        logged.append(e)
    p.init(p.all_prompts, p.all_seeds, p.all_seeds)
    p.setup_conds()
    p.sample()
    return logged


def run_job_hooks(p, *scripts_and_args) -> list[Exception]:
    """A job with several scripts, as `process_images` runs them: every script's `before_process`, then every
    `process` (each hook's exception logged, not raised), then what the webui calls next."""
    logged = []
    for hook in ("before_process", "process"):
        for script, args in scripts_and_args:
            try:
                getattr(script, hook)(p, *args)
            except Exception as e:
                logged.append(e)
    p.init(p.all_prompts, p.all_seeds, p.all_seeds)
    p.setup_conds()
    p.sample()
    return logged


class FakeState:
    """`shared.state`: the fields the trainers' progress, preview and Interrupt use (A1111 1.10 names).

    `interrupt_at_job_no`: Interrupt is pressed once the progress reaches that step (as a user would).
    """

    def __init__(self):
        self.interrupt_at_job_no: int | None = None
        self.job, self.job_no, self.job_count, self.textinfo = "", 0, 0, None
        self.interrupted = self.stopping_generation = False
        self.previews: list = []

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name == "job_no" and self.interrupt_at_job_no is not None and value >= self.interrupt_at_job_no:
            super().__setattr__("interrupted", True)

    def assign_current_image(self, image):
        self.previews.append(image)


class FakeProcessing(types.ModuleType):
    """`modules.processing`: records each StableDiffusionProcessingTxt2Img and paints its images solid red
    when the prompt says red, else blue. `interrupt_next`: the next job is interrupted mid-sampling (the
    webui still returns its partial images)."""

    def __init__(self, state: FakeState):
        super().__init__("modules.processing")
        self.state, self.jobs, self.interrupt_next = state, [], 0
        processing = self

        class StableDiffusionProcessingTxt2Img:
            scripts = "the txt2img script runner"  # what a job would run unless told otherwise

            def __init__(self, **kwargs):
                self.kwargs = kwargs
                self.__dict__.update(kwargs)
                processing.jobs.append(self)

        self.StableDiffusionProcessingTxt2Img = StableDiffusionProcessingTxt2Img

    def process_images(self, p):
        from PIL import Image

        self.state.job_no += 1  # the webui's state.nextjob()
        self.state.job_count = 1
        if self.interrupt_next:
            self.interrupt_next -= 1
            self.state.interrupted = True
        colours = [(230, 25, 25) if "red" in t.replace(",", " ").split() else (25, 25, 230) for t in p.prompt]
        return SimpleNamespace(images=[Image.new("RGB", (p.width, p.height), c) for c in colours])
