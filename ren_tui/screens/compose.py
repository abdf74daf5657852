"""Compose: build a run config from a preset (or a stored run's config) without writing TOML.

The form covers a curated list of keys, each with a widget chosen from its type
in :mod:`engine.config` (a Select for choices, a Switch for flags, an Input for
numbers and text); sections follow the architecture kind and the stage; the
weights a run starts from (``train.init_from``) are picked from the store's
finished runs and the presets. On every change (debounced) a worker thread asks
the model inspector for the parameter count per part and the compute per
sample, and a validation error is shown next to the field it names. The side
panel adds the run's total compute and how long it takes at the throughput this
machine's finished runs measured (:mod:`ren_tui.estimate`). ``ctrl+s`` saves a
preset TOML, ``ctrl+r`` queues the run, ``f`` opens Freeze on the current config.
"""

from __future__ import annotations

import asyncio
import copy
import re
import textwrap
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.compose import compose as compose_widgets
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.timer import Timer
from textual.widget import Widget
from textual.widgets import Header, Input, Label, Select, Static, Switch

from engine.config import MANUAL_ONLY_KEYS, MANUAL_USE_KEYS, MODEL_KINDS, TOWERS, RunConfig
from engine.display import format_seconds
from engine.dotted import get_in, set_in
from engine.errors import RenError
from engine.store import RunRecord
from ren_tui.dialogs import Confirm, Prompt
from ren_tui.estimate import Throughput, eta_seconds, measured_throughput, plan
from ren_tui.screens import KeepStyles
from ren_tui.screens.freeze import FreezeScreen, by_part, format_flops
from ren_tui.widgets.footer import Footer

DEBOUNCE_S = 0.3
FRONT_ROWS = 4  # fields made with the screen when it opens in front (the Run section); the rest follow in batches
BUILD_ROWS = 4  # fields mounted at a time after those (~10-40 ms of the UI thread)
BUILD_PAUSE_S = 0.02  # between two such batches: keys and redraws go first
MOUNT_WAITS, MOUNT_WAIT_S = 200, 0.005  # how long a batch waits for its fields to be mounted: a second at most
LAY_OUT_AFTER_S = 0.2  # a form changed behind another screen is laid out and drawn this long after the last change
STAGES = ("pretrain", "finetune")
KNOWN_TEXT = ("bert-base-uncased", "google/electra-small-discriminator", "google/electra-base-discriminator",
              "roberta-base")
KNOWN_VISION = ("google/vit-base-patch16-224-in21k", "facebook/deit-tiny-patch16-224",
                "facebook/deit-small-patch16-224", "microsoft/swin-tiny-patch4-window7-224")
KNOWN_TIMM = ("test_resnet", "resnet18", "resnet50", "convnext_tiny")
KNOWN = {"text": KNOWN_TEXT, "vision": KNOWN_VISION + KNOWN_TIMM, "backbone": KNOWN_TEXT + KNOWN_VISION}
CUSTOM = "__custom__"

SECTIONS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("Run", "all", ("run.name", "run.seed", "model.kind", "stage")),
    ("Backbone", "one_tower", ("model.backbone.source", "model.backbone.name", "model.backbone.hidden_size",
                               "model.backbone.layers", "model.backbone.heads", "model.backbone.image_embedding",
                               "model.backbone.patch_size", "model.backbone.image_size", "model.backbone.dropout",
                               "model.pooler")),
    ("Text tower", "towers", ("model.text.source", "model.text.name", "model.text.hidden_size",
                              "model.text.layers", "model.text.heads", "model.text.max_positions",
                              "model.text.dropout")),
    ("Vision tower", "towers", ("model.vision.source", "model.vision.library", "model.vision.name",
                                "model.vision.hidden_size", "model.vision.layers", "model.vision.heads",
                                "model.vision.patch_size", "model.vision.image_size", "model.vision.dropout")),
    ("Fusion", "two_tower", ("model.fusion.hidden_size", "model.fusion.layers", "model.fusion.heads",
                             "model.fusion.dropout")),
    ("Projection", "dual_encoder", ("model.projection_dim",)),
    ("Objectives", "pretrain", ("objectives.mlm", "objectives.mlm.weight", "objectives.itm",
                                "objectives.itm.weight", "objectives.itc", "objectives.itc.weight")),
    ("Task", "finetune", ("task.name", "task.loss")),
    ("Data", "all", ("data.dataset", "data.max_text_len")),
    ("Training", "all", ("train.init_from", "optim.lr", "optim.warmup_ratio", "optim.weight_decay",
                         "train.batch_size", "train.max_steps", "train.mixed_precision")),
    ("Intervals", "all", ("train.log_every", "train.eval_every", "train.checkpoint_every")),
    ("Freeze", "all", ("freeze.groups",)),
)
LABELS = {"run.name": "name", "model.kind": "architecture", "model.pooler": "pooler", "optim.lr": "learning rate",
          "train.mixed_precision": "precision", "data.dataset": "data set", "objectives.mlm": "MLM",
          "objectives.itm": "ITM", "objectives.itc": "ITC", "freeze.groups": "frozen", "task.name": "task",
          "train.init_from": "weights from", "optim.warmup_ratio": "warmup share", "train.log_every": "log every",
          "train.eval_every": "evaluate every", "train.checkpoint_every": "save every"}
PLACEHOLDERS = {"dropout": "unset: 0 (manual), the checkpoint's (named)"}
FRESH = ""
"""The ``train.init_from`` pick that starts from fresh weights (the key unset)."""


# --- config dict helpers ------------------------------------------------------------


def stage_of(raw: dict[str, Any]) -> str:
    """``pretrain`` while the config has an ``[objectives]`` table (even with none enabled)."""
    return "pretrain" if raw.get("objectives") is not None else "finetune"


def kind_of(raw: dict[str, Any]) -> str:
    return str(get_in(raw, "model.kind", "two_tower"))


def section_shown(tag: str, raw: dict[str, Any]) -> bool:
    kind = kind_of(raw)
    return {"all": True, "towers": kind in ("two_tower", "dual_encoder"), "pretrain": stage_of(raw) == "pretrain",
            "finetune": stage_of(raw) == "finetune"}.get(tag, kind == tag)


def field_shown(key: str, raw: dict[str, Any]) -> bool:
    """Whether ``key`` applies to the config as it stands (its section aside)."""
    parts = key.split(".")
    if len(parts) == 3 and parts[0] == "model" and parts[1] in TOWERS:
        manual = get_in(raw, f"model.{parts[1]}.source", "manual") == "manual"
        if parts[2] in ("name", "library"):
            return not manual
        return manual or parts[2] not in MANUAL_USE_KEYS[parts[1]]
    if key == "train.eval_every":  # pretraining evaluates no task
        return stage_of(raw) == "finetune"
    if parts[0] == "objectives":
        if len(parts) == 3:
            return get_in(raw, ".".join(parts[:2])) is not None
        kind = kind_of(raw)
        return not (kind == "one_tower" and parts[1] == "itc" or kind == "dual_encoder" and parts[1] != "itc")
    return True


def field_for_error(key: str | None, message: str, shown: list[str]) -> str | None:
    """The shown form field an error is about: the key itself, the field holding it
    (``objectives.mlm.mask_prob`` -> ``objectives.mlm``), or for a table the field the
    message names first (``model.text`` + "hidden_size (130) must ..." -> its hidden_size)."""
    if not key:
        return None
    if key in shown:
        return key
    inside = [f for f in shown if f.startswith(key + ".")]
    if inside:
        named = [(message.find(f.rpartition(".")[2]), f) for f in inside if f.rpartition(".")[2] in message]
        return min(named)[1] if named else inside[0]
    holders = [f for f in shown if key.startswith(f + ".")]
    return max(holders, key=len) if holders else None


# --- widgets from the schema -----------------------------------------------------------


def schema_field(key: str) -> Any:
    """The pydantic field of a dotted key (any architecture kind that has it)."""
    parts = key.split(".")
    roots = list(MODEL_KINDS.values()) if parts[0] == "model" else [RunConfig]
    for model in roots:
        for part in parts[1:-1] if parts[0] == "model" else parts[:-1]:
            field = model.model_fields.get(part) if model else None
            model = _model_type(field.annotation) if field else None
        field = model.model_fields.get(parts[-1]) if model else None
        if field is not None:
            return field
    raise KeyError(key)


def _model_type(annotation: Any) -> Any:
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for m in map(_model_type, get_args(annotation)) if m is not None), None)


def value_type(annotation: Any) -> tuple[str, tuple[Any, ...], bool]:
    """(``choice``/``bool``/``int``/``float``/``str``, the choices, whether None is allowed)."""
    if get_origin(annotation) is Literal:
        return "choice", get_args(annotation), False
    if get_origin(annotation) in (Union, types.UnionType):
        inner = [a for a in get_args(annotation) if a is not type(None)]
        kind, choices, _ = value_type(inner[0])
        return kind, choices, len(inner) < len(get_args(annotation))
    names = {bool: "bool", int: "int", float: "float"}
    return names.get(annotation, "str"), (), False


def parse_value(text: str, kind: str, optional: bool) -> Any:
    """An Input's text as the config value; text that does not parse stays text (the
    validation then names the key)."""
    text = text.strip()
    if not text:
        return None if optional else text
    try:
        return int(text) if kind == "int" else float(text) if kind == "float" else text
    except ValueError:
        return text


def compute_lines(flops: dict[str, Any], config: dict[str, Any],
                  throughput: Callable[[float | None], Throughput | None], width: int = 36) -> list[str]:
    """The side panel's compute: per sample (the inspector's count), the run's total (:func:`plan`) and how
    long it takes at this machine's measured throughput (``throughput(training FLOPs per sample)``); notes
    are wrapped to ``width``."""
    def note(text: str) -> list[str]:
        return textwrap.wrap(text, width, initial_indent="  ", subsequent_indent="  ")

    lines = ["Compute per sample (estimate)", f"  forward     {format_flops(flops['forward'])}",
             f"  training    {format_flops(flops['train'])}"]
    text = flops.get("text_len")
    if text:
        bound = str(text.get("source", "")).startswith("at most")
        lines.append(f"  text        {'≤' if bound else '≈'} {text['train']:.3g} tokens")
    work = plan(flops, config)
    if work is None:
        return lines
    lines += ["", "Run total (estimate)", f"  training    {format_flops(work.train)}"]
    if work.eval:
        lines += [f"  evaluation  {format_flops(work.eval)} ({work.evals}x)",
                  f"  total       {format_flops(work.total)}"]
    if work.final_eval_left_out:
        lines += note("not counted: the final evaluation, over the whole eval split")
    measured = throughput(flops.get("train"))
    eta = eta_seconds(work, measured)
    lines.append(f"  time        {'≈ ' + format_seconds(eta) if eta is not None else '-'}")
    lines += note(measured.basis() if measured is not None else "no finished run on this machine to time it by")
    return lines


def wid(key: str) -> str:
    return "f-" + key.replace(".", "-")


def picked(key: str) -> bool:
    """Whether ``key`` is chosen from a pick list with an "other: type it" row (tower names, init_from)."""
    return key == "train.init_from" or key.endswith(".name") and key.split(".")[1] in TOWERS


class ComposeScreen(KeepStyles, Screen[None]):
    """Compose a run config; ``config`` (a stored run's or a preset's) starts the form."""

    BINDINGS = [
        Binding("ctrl+s", "save", "Save preset"),
        Binding("ctrl+r", "queue", "Queue run"),
        Binding("f", "freeze", "Freeze…"),
        Binding("escape", "back", "Back"),
    ]

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.raw: dict[str, Any] = {}
        self.initial = copy.deepcopy(config) if config else None
        self.loaded = False
        """Whether the form shows a config yet (change events before that are the widgets' own)."""
        self.answer: dict[str, Any] | None = None
        self.last_ok: dict[str, Any] | None = None
        self.generation = 0
        self.inspector_state = "starting"
        self.inspector_failure: str | None = None
        self._timer: Timer | None = None
        self._types: dict[str, tuple[str, tuple[Any, ...], bool]] = {}
        self._keys_by_id: dict[str, str] = {}
        self._section_tags: dict[str, str] = {}
        self._answered_generation = -1
        self._init_sources: list[tuple[str, str]] = []
        """``train.init_from`` picks other than fresh weights: (label, value) of finished runs and presets."""
        self._runs: tuple[str, list[RunRecord]] = ("", [])
        """(this machine's host name, the store's finished runs): what the time estimate is measured on."""
        self._unbuilt: list[tuple[str, str]] = []
        """(section id, key) of the fields not mounted yet, mounted a batch at a time (see compose)."""
        self._mounting = 0  # batches of fields being mounted (build_more)
        self._behind_timer: Timer | None = None  # _lay_out_behind's

    # --- layout -------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        # The form's ~60 fields are ~370 widgets: made at once, a second of the UI thread on a slow machine.
        # Made behind another screen (RenApp.prebuild, after start-up), they are mounted a few rows at a time
        # (build_more), so the screen in front stays responsive and Compose's first opening finds its form
        # ready. Opened in front (early, or pushed), the top FRONT_ROWS fields come with the screen and the
        # rest follow the same way: it takes keys at once, and the config shows in each field once it is made.
        front = FRONT_ROWS if self.app.screen is self else 0
        yield Header()
        with Horizontal(id="compose-top"):
            yield Label("start from")
            yield Select([], prompt="a preset…", id="preset", compact=True)
        with Horizontal(id="compose-body"):
            with VerticalScroll(id="form"):
                for title, tag, keys in SECTIONS:
                    section_id = f"section-{title.split()[0].lower()}"
                    self._section_tags[section_id] = tag
                    with Vertical(classes="section", id=section_id):
                        yield Static(title, classes="section-title")
                        for key in keys:
                            if front > 0:
                                front -= 1
                                yield from self._field(key)
                            else:
                                self._unbuilt.append((section_id, key))
            with Vertical(id="side"):
                yield Static("starting model inspector… (it imports torch: a few seconds)", id="inspect-state")
                yield Static("", id="summary")
        yield Static("", id="status")
        yield Footer()

    def _field(self, key: str) -> ComposeResult:
        label = LABELS.get(key) or key.rpartition(".")[2].replace("_", " ")
        if key.startswith("objectives.") and key.endswith(".weight"):
            label = "  weight"
        with Horizontal(classes="row", id="row-" + wid(key)):
            yield Label(label)
            if key == "model.kind":
                self._types[key] = ("choice", tuple(MODEL_KINDS), False)
            elif key == "stage":
                self._types[key] = ("choice", STAGES, False)
            elif key in ("objectives.mlm", "objectives.itm", "objectives.itc"):
                self._types[key] = ("bool", (), False)
            elif key == "freeze.groups":
                yield Static("", id=wid(key), classes="value")
            elif picked(key):
                yield self._track(key, Select(self._pick_options(key), allow_blank=False, compact=True,
                                              id=wid(key) + "-pick"))
            else:
                self._types[key] = value_type(schema_field(key).annotation)
            kind, choices, _ = self._types.get(key, ("", (), False))
            if kind == "choice":
                yield self._track(key, Select([(str(c), c) for c in choices], allow_blank=False, compact=True,
                                              id=wid(key)))
            elif kind == "bool":
                yield self._track(key, Switch(id=wid(key)))
            elif kind in ("int", "float", "str"):
                restrict = {"int": "integer", "float": "number"}.get(kind, "text")
                yield self._track(key, Input(type=restrict, compact=True, id=wid(key),
                                             placeholder=PLACEHOLDERS.get(key.rpartition(".")[2], "")))
        if picked(key):
            label, hint = (("  run or dir", "run:<id>, a checkpoint directory or a .safetensors file")
                           if key == "train.init_from" else ("  hub id / dir", "org/model or /path/to/model"))
            with Horizontal(classes="row custom", id="row-" + wid(key) + "-custom"):
                yield Label(label)
                yield self._track(key, Input(compact=True, id=wid(key), placeholder=hint))
        yield Static("", classes="field-error", id="err-" + wid(key))

    def _pick_options(self, key: str) -> list[tuple[str, str]]:
        """A pick list's (label, value) options; the last one lets you type any value."""
        if key == "train.init_from":
            return [("fresh weights", FRESH), *self._init_sources, ("other: type it below", CUSTOM)]
        return [(n, n) for n in KNOWN[key.split(".")[1]]] + [("other: type it below", CUSTOM)]

    def _picks(self, key: str) -> list[str]:
        return [value for _, value in self._pick_options(key)[:-1]]

    def _track(self, key: str, widget: Widget) -> Widget:
        assert widget.id is not None
        self._keys_by_id[widget.id] = key
        return widget

    @property
    def built(self) -> bool:
        """Whether every field of the form is mounted."""
        return not self._unbuilt and not self._mounting

    async def build_more(self) -> None:
        """Mount the next BUILD_ROWS fields of the form, showing the config in them, then the next ones after
        BUILD_PAUSE_S."""
        if not self._unbuilt:
            return
        batch, self._unbuilt = self._unbuilt[:BUILD_ROWS], self._unbuilt[BUILD_ROWS:]
        rows: dict[str, list[Widget]] = {}
        for section_id, key in batch:
            rows.setdefault(section_id, []).extend(compose_widgets(self, self._field(key)))
        keys = {key for _, key in batch}
        made = {widget_id for widget_id, key in self._keys_by_id.items() if key in keys}
        self._mounting += 1  # not built until the batch shows the config
        try:
            for section_id, widgets in rows.items():
                await self.query_one("#" + section_id).mount_all(widgets)
            for _ in range(MOUNT_WAITS):  # mount_all returns once the rows are mounted, their fields a moment later
                if all(self._made("#" + widget_id) for widget_id in made):
                    break
                await asyncio.sleep(MOUNT_WAIT_S)
            if self.loaded:  # the config in the new fields only: one being typed in keeps what it shows
                self._sync(only=made)
                self._lay_out_behind()
        finally:
            self._mounting -= 1
        if self._unbuilt:
            self.set_timer(BUILD_PAUSE_S, self.build_more)
        elif self.answer is not None and not self.answer.get("ok"):
            self._show_error(self.answer)  # on its field now, if that came in this batch

    def on_mount(self) -> None:
        self.sub_title = "Compose"
        if self._unbuilt:
            self.set_timer(BUILD_PAUSE_S, self.build_more)
        self._start_inspector()
        self._list_init_sources()
        self._list_presets(load_default=self.initial is None)
        if self.initial is not None:
            self._set_config(self.initial)

    # --- workers --------------------------------------------------------------------

    @work(thread=True, exclusive=True, group="compose-inspector")
    def _start_inspector(self) -> None:
        failed = self.app.backend.start_inspector()
        self.app.call_from_thread(self._inspector_started, failed)

    def _inspector_started(self, failed: str | None) -> None:
        self.inspector_state = "ready"
        self.inspector_failure = failed
        self._show_state()
        self._lay_out_behind()

    @work(thread=True, exclusive=True, group="compose-presets")
    def _list_presets(self, load_default: bool) -> None:
        presets = self.app.backend.presets()
        default = self.app.backend.default_preset()
        raw = self.app.backend.preset_config(default) if load_default and default is not None else None
        self.app.call_from_thread(self._presets_listed, presets, default if raw is not None else None, raw)

    def _presets_listed(self, presets: list[tuple[str, Path]], chosen: Path | None, raw: dict | None) -> None:
        select = self.query_one("#preset", Select)
        with self.prevent(Select.Changed):
            current = select.value
            select.set_options([(label, str(path)) for label, path in presets])
            value = str(chosen) if chosen is not None else current
            if value != Select.NULL and any(str(p) == value for _, p in presets):
                select.value = value
        if raw is not None:
            self._set_config(raw)

    def on_screen_resume(self) -> None:
        if self.is_mounted:
            self._list_init_sources()  # runs may have finished since

    @work(thread=True, exclusive=True, group="compose-init-sources")
    def _list_init_sources(self) -> None:
        sources = self.app.backend.init_sources()
        runs = self.app.backend.timed_runs()
        self.app.call_from_thread(self._init_sources_listed, sources, runs)

    def throughput(self, train_flops_per_sample: float | None) -> Throughput | None:
        """This machine's measured training throughput (:func:`measured_throughput`)."""
        return measured_throughput(self._runs[1], self._runs[0], train_flops_per_sample)

    def _init_sources_listed(self, sources: list[tuple[str, str]], runs: tuple[str, list[RunRecord]]) -> None:
        if runs != self._runs:
            self._runs = runs
            self._show_summary()
        if sources == self._init_sources:
            return
        self._init_sources = sources
        self._list_picks()
        if self.loaded:  # the weights-from pick only: a field being typed in keeps its keys
            self._sync(only={wid("train.init_from") + "-pick", wid("train.init_from")})
            self._lay_out_behind()

    def _list_picks(self) -> None:
        select = self._made("#" + wid("train.init_from") + "-pick")
        if not isinstance(select, Select):  # not made yet: it is made with the picks known then
            return
        with self.prevent(Select.Changed):
            select.set_options(self._pick_options("train.init_from"))

    @on(Select.Changed, "#preset")
    def _preset_chosen(self, event: Select.Changed) -> None:
        if event.value != Select.NULL:
            self._load_preset(Path(str(event.value)))

    @work(thread=True, exclusive=True, group="compose-load")
    def _load_preset(self, path: Path) -> None:
        try:
            raw = self.app.backend.preset_config(path)
        except RenError as exc:
            self.app.call_from_thread(self.notify, str(exc), title="cannot load the preset", severity="error")
            return
        self.app.call_from_thread(self._set_config, raw)

    @work(thread=True, exclusive=True, group="compose-inspect")
    def _inspect(self, config: dict[str, Any], generation: int) -> None:
        answer = self.app.backend.inspect(config)
        self.app.call_from_thread(self._answered, answer, generation)

    # --- the config and the form --------------------------------------------------------

    def _made(self, selector: str) -> Widget | None:
        """The widget ``selector`` names, or None while the form has not mounted it yet (or is mounting it: a
        Select's value cannot be set before its own parts are made)."""
        widget = next(iter(self.query(selector)), None)
        return widget if widget is not None and widget.is_mounted else None

    def _set_config(self, raw: dict[str, Any]) -> None:
        self.raw = copy.deepcopy(raw)
        self.loaded = True
        self._sync()
        self._changed()
        self._lay_out_behind()

    def _lay_out_behind(self) -> None:
        """While another screen is in front, lay the form out (and draw it) again shortly after it changed:
        the config shown, the inspector's verdict and counts, the picks."""
        if self.is_current or not self.loaded:
            return
        if self._behind_timer is not None:
            self._behind_timer.stop()
        self._behind_timer = self.set_timer(LAY_OUT_AFTER_S, self._lay_out)

    def _lay_out(self) -> None:
        """Lay the form out while another screen is in front, as Textual does for the screens behind when the
        terminal is resized (``Screen._refresh_layout``): the widgets' sizes and their resize and show
        events are then dealt with before the first opening, not during it."""
        refresh_layout = getattr(self, "_refresh_layout", None)
        if refresh_layout is not None and not self.is_current and self.is_attached:
            refresh_layout(self.app.size)
            self.set_timer(0.1, self._draw_behind)  # once the events the layout posted are dealt with

    def _draw_behind(self) -> None:
        """Draw the form once while another screen is in front, for nothing but the widgets' line caches: the
        first opening then draws what is on screen from them, as every later one does."""
        compositor = getattr(self, "_compositor", None)
        if compositor is not None and not self.is_current and self.is_attached:
            compositor.render_update(full=True)

    def _value(self, key: str) -> Any:
        if key == "stage":
            return stage_of(self.raw)
        if key in ("objectives.mlm", "objectives.itm", "objectives.itc"):
            return get_in(self.raw, key) is not None
        value = get_in(self.raw, key)
        if value is None and key in self._types:
            field = schema_field(key)
            value = None if field.is_required() else field.default
        return value

    def _sync(self, only: set[str] | None = None) -> None:
        """Show the config in the widgets (``only``: those with these ids; without their change events) and the
        sections that apply."""
        with self.prevent(Input.Changed, Select.Changed, Switch.Changed):
            for widget_id, key in self._keys_by_id.items():
                if only is not None and widget_id not in only:
                    continue
                widget = self._made("#" + widget_id)
                if widget is None:  # made, not mounted yet: build_more syncs again once it is
                    continue
                if widget_id.endswith("-pick"):
                    value = get_in(self.raw, key)
                    value = FRESH if value is None and key == "train.init_from" else value
                    known = value in self._picks(key)
                    widget.value = value if known else CUSTOM
                    self.query_one("#row-" + wid(key) + "-custom").set_class(not known, "-shown")
                    continue
                value = self._value(key)
                if isinstance(widget, Select):
                    if value in self._types[key][1]:
                        widget.value = value
                elif isinstance(widget, Switch):
                    widget.value = bool(value)
                elif isinstance(widget, Input):
                    kind, _, optional = self._types.get(key, ("str", (), True))
                    if parse_value(widget.value, kind, optional) != value:
                        widget.value = "" if value is None else str(value)
        groups = get_in(self.raw, "freeze.groups") or []
        frozen = self._made("#" + wid("freeze.groups"))
        if isinstance(frozen, Static):
            frozen.update(Text((", ".join(groups) if groups else "nothing") + "  (f to edit)"))
        self._show_fields()

    def _show_fields(self) -> None:
        for section_id, tag in self._section_tags.items():
            self.query_one("#" + section_id).display = section_shown(tag, self.raw)
        for *_, keys in SECTIONS:
            for key in keys:
                row = self._made("#row-" + wid(key))
                if row is None:
                    continue
                shown = field_shown(key, self.raw)
                row.display = shown
                if picked(key):
                    custom = self.query_one("#row-" + wid(key) + "-custom")
                    custom.display = shown and custom.has_class("-shown")

    def shown_fields(self) -> list[str]:
        return [key for _, tag, keys in SECTIONS if section_shown(tag, self.raw)
                for key in keys if field_shown(key, self.raw)]

    def _edited(self, event: Input.Changed | Select.Changed | Switch.Changed) -> str | None:
        """The key a user's change is to; None for other widgets and for stale events
        (a widget's initial value, or one the form has replaced since)."""
        widget = event.control
        if not self.loaded or event.value != getattr(widget, "value", None):
            return None
        return self._keys_by_id.get(widget.id or "")

    @on(Input.Changed)
    def _input_changed(self, event: Input.Changed) -> None:
        key = self._edited(event)
        if key is None:
            return
        if picked(key):
            self._edit(key, event.value.strip() or None)
            return
        kind, _, optional = self._types[key]
        self._edit(key, parse_value(event.value, kind, optional))

    @on(Switch.Changed)
    def _switch_changed(self, event: Switch.Changed) -> None:
        key = self._edited(event)
        if key is not None:
            self._edit(key, event.value)

    @on(Select.Changed)
    def _select_changed(self, event: Select.Changed) -> None:
        key = self._edited(event)
        if key is None or event.value == Select.NULL:
            return
        if (event.select.id or "").endswith("-pick"):
            self._pick_name(key, str(event.value))
        else:
            self._edit(key, event.value)

    def _pick_name(self, key: str, name: str) -> None:
        custom = self.query_one("#row-" + wid(key) + "-custom")
        custom.set_class(name == CUSTOM, "-shown")
        if name != CUSTOM and get_in(self.raw, key) == (name or None):
            return  # the pick the config has (a pick list just made announces its first value): nothing to redo
        if name == CUSTOM:
            typed = self.query_one("#" + wid(key), Input)
            self._edit(key, typed.value.strip() or None)
            self._show_fields()
            typed.focus()
            return
        if key == "model.vision.name":
            set_in(self.raw, "model.vision.library", "timm" if name in KNOWN_TIMM else "hf")
        self._edit(key, name or None)
        self._sync()

    def _edit(self, key: str, value: Any) -> None:
        """Apply one field's new value to the config; structural keys reshape it (and show the form again).
        A value the config has already changes nothing: a full sync then could put a field being typed in
        back to the config's older value."""
        if self._value(key) == value:  # the default counts as the value shown
            return
        if key == "model.kind":
            self._set_kind(str(value))
        elif key == "stage":
            self._set_stage(str(value))
        elif key in ("objectives.mlm", "objectives.itm", "objectives.itc"):
            set_in(self.raw, key, {} if value else None)
        elif key.endswith(".source") and key.split(".")[1] in TOWERS:
            self._set_source(key.split(".")[1], str(value))
        elif key == "model.vision.library":
            self._set_library(str(value))
        else:
            set_in(self.raw, key, value)
            self._changed()
            return
        self._sync()
        self._changed()

    def _set_kind(self, kind: str) -> None:
        old = self.raw.get("model", {})
        if old.get("kind") == kind:
            return
        model: dict[str, Any] = {"kind": kind}
        if kind != "one_tower":
            model.update({k: old[k] for k in ("text", "vision") if k in old})
        if kind == "two_tower" and "fusion" in old:
            model["fusion"] = old["fusion"]
        self.raw["model"] = model
        objectives = self.raw.get("objectives")
        if objectives:
            if kind == "dual_encoder":
                self.raw["objectives"] = {"itc": objectives.get("itc") or {}}
            elif kind == "one_tower":
                objectives.pop("itc", None)
                if not objectives:
                    self.raw["objectives"] = {"mlm": {}, "itm": {}}

    def _set_stage(self, stage: str) -> None:
        if stage == stage_of(self.raw):
            return
        if stage == "pretrain":
            self.raw.pop("task", None)
            self.raw["objectives"] = {"itc": {}} if kind_of(self.raw) == "dual_encoder" else {"mlm": {}, "itm": {}}
        else:
            self.raw.pop("objectives", None)
            self.raw["task"] = {"name": "vqa"}

    def _set_library(self, library: str) -> None:
        set_in(self.raw, "model.vision.library", library)
        if get_in(self.raw, "model.vision.source", "manual") == "manual" and library == "timm":
            self._set_source("vision", "random")
        names, others = (KNOWN_TIMM, KNOWN_VISION) if library == "timm" else (KNOWN_VISION, KNOWN_TIMM)
        if get_in(self.raw, "model.vision.name") in others:
            set_in(self.raw, "model.vision.name", names[0])

    def _set_source(self, tower: str, source: str) -> None:
        table = dict(get_in(self.raw, f"model.{tower}", {}))
        if table.get("source", "manual") == source:
            return
        table["source"] = source
        if source == "manual":
            table.pop("name", None)
            table.pop("library", None)
        else:
            for key in MANUAL_ONLY_KEYS[tower]:
                table.pop(key, None)
            if not table.get("name"):
                table["name"] = KNOWN_TIMM[0] if table.get("library") == "timm" else KNOWN[tower][0]
        set_in(self.raw, f"model.{tower}", table)

    # --- live feedback ----------------------------------------------------------------

    def _changed(self) -> None:
        """Debounce: inspect the config DEBOUNCE_S after the last change."""
        self.generation += 1
        self._show_state()
        if self._timer is not None:
            self._timer.stop()
        self._timer = self.set_timer(DEBOUNCE_S, self._inspect_now)

    def _inspect_now(self) -> None:
        self._inspect(copy.deepcopy(self.raw), self.generation)

    def _show_state(self) -> None:
        """The inspector line: starting, checking, or the verdict on the config shown."""
        if self.inspector_failure:
            text, error = self.inspector_failure, True
        elif self._answered_generation != self.generation:
            text, error = ("starting model inspector… (it imports torch: a few seconds)"
                           if self.inspector_state == "starting" else "checking…"), False
        elif self.answer is not None and self.answer.get("ok"):
            text, error = "✓ valid", False
        else:
            text, error = "✗ invalid", True
        state = self.query_one("#inspect-state", Static)
        state.set_class(error, "error")
        state.update(Text(text))

    def _answered(self, answer: dict[str, Any], generation: int) -> None:
        if generation != self.generation:
            return
        self._answered_generation = generation
        self.answer = answer
        if answer.get("ok"):
            self.last_ok = answer
        self._show_state()
        self._show_summary()
        self._show_error(answer)
        self._lay_out_behind()

    def _show_summary(self) -> None:
        answer = self.last_ok
        if answer is None:
            return
        params, flops = answer["params"], answer.get("flops_per_sample", {})
        lines = ["Parameters"]
        for part, counts in by_part(params["groups"]).items():
            frozen = " ❄" if counts["total"] and not counts["trainable"] else ""
            lines.append(f"  {part:<10}{counts['total']:>14,}{frozen}")
        lines.append(f"  {'total':<10}{params['total']:>14,}")
        lines.append(f"  {'trainable':<10}{params['trainable']:>14,}")
        if flops:
            lines += ["", *compute_lines(flops, answer.get("config") or self.raw, self.throughput)]
        elif answer.get("flops_error"):
            lines += ["", "Compute: not counted", f"  ({answer['flops_error']})"]
        if answer is not self.answer:
            lines += ["", "(for the last valid config)"]
        self.query_one("#summary", Static).update(Text("\n".join(lines)))

    def _show_error(self, answer: dict[str, Any]) -> None:
        for label in self.query(".field-error"):
            label.display = False
        status = self.query_one("#status", Static)
        status.remove_class("error")
        status.update("")
        if answer.get("ok"):
            return
        message = str(answer.get("error", ""))
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        if len(lines) > 1 and lines[0].endswith("invalid preset."):
            lines = lines[1:]
        field = field_for_error(answer.get("key"), message, self.shown_fields())
        label = self._made("#err-" + wid(field)) if field is not None else None
        if isinstance(label, Static):
            label.update(Text(lines[0] if lines else message))
            label.display = True
            label.scroll_visible()
            if len(lines) > 1:
                status.update(Text(" ".join(lines[1:])))
                status.add_class("error")
            return
        status.add_class("error")
        status.update(Text(" ".join(lines) or message))

    # --- actions ------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "back":
            return self.app.screen is self
        return True

    def action_back(self) -> None:
        """Back to what opened Compose: the screen below (Runs, for a run's config), or Runs when Compose
        is the only screen of its mode (opened with 2 or the palette), as the footer's Back promises."""
        if len(self.app.screen_stack) > 1:
            self.app.pop_screen()
        else:
            self.app.action_screen("runs")

    def action_freeze(self) -> None:
        if not self.raw:
            return
        if self.answer is not None and not self.answer.get("ok"):
            self.notify("fix the config first: Freeze needs its model", severity="warning")
            return
        self.app.push_screen(FreezeScreen(self.raw), self._frozen)

    def _frozen(self, config: dict[str, Any] | None) -> None:
        if config is not None:
            self.raw["freeze"] = copy.deepcopy(config["freeze"])
            self._sync()
            self._changed()

    def action_save(self) -> None:
        if not self.raw:
            return
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(get_in(self.raw, "run.name", "run"))).strip("-.") or "run"
        default = self.app.backend.user_presets_dir() / f"{name}.toml"
        self.app.push_screen(Prompt("Save the config as a preset", str(default), "a .toml path; enter saves"),
                             self._save_to)

    def _save_to(self, path: str | None) -> None:
        if path and path.strip():
            self._save(copy.deepcopy(self.raw), Path(path.strip()).expanduser(), overwrite=False)

    @work(thread=True, exclusive=True, group="compose-save")
    def _save(self, config: dict[str, Any], path: Path, overwrite: bool) -> None:
        if path.exists() and not overwrite:
            self.app.call_from_thread(self._confirm_overwrite, config, path)
            return
        try:
            saved = self.app.backend.save_preset(config, path)
        except (RenError, OSError) as exc:
            self.app.call_from_thread(self.notify, str(exc), title="not saved", severity="error", timeout=10)
            return
        self.app.call_from_thread(self.notify, str(saved), title="preset saved")
        self.app.call_from_thread(self._list_presets, False)

    def _confirm_overwrite(self, config: dict[str, Any], path: Path) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self._save(config, path, overwrite=True)

        self.app.push_screen(Confirm(f"{path} exists. Overwrite it?"), answered)

    def action_queue(self) -> None:
        if not self.raw:
            return
        self.app.push_screen(Prompt("Queue this run on how many GPUs?", "1",
                                    "processes for the run (1 on a CPU machine)"), self._queue_on)

    def _queue_on(self, gpus: str | None) -> None:
        if gpus is None:
            return
        try:
            count = int(gpus.strip())
        except ValueError:
            self.notify(f"{gpus!r} is not a number of GPUs", severity="error")
            return
        self._queue(copy.deepcopy(self.raw), count)

    @work(thread=True, exclusive=True, group="compose-queue")
    def _queue(self, config: dict[str, Any], gpus: int) -> None:
        try:
            records = self.app.backend.queue_config(config, gpus=gpus)
        except (RenError, OSError) as exc:
            self.app.call_from_thread(self.notify, str(exc), title="not queued", severity="error", timeout=10)
            return
        self.app.call_from_thread(self.notify, ", ".join(r.id for r in records), title="queued")
