"""Freeze: choose the frozen layer groups of a config's model, with live counts.

The model's groups (from the model inspector's parameter report) are shown as a
tree: towers, then embeddings, each layer and the final norm; fusion layers;
pooler and heads. ``space``/``enter`` toggles a node (a tower node toggles all
its groups), ``v``/``t``/``b`` the whole vision tower / text tower / one-tower
backbone, ``r`` the groups a pattern such as ``text.layers[0:6]`` selects. The
counts are computed here from the group table; ``a`` writes the choice back as
compact ``[freeze]`` patterns (``dismiss(new_config)``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import groupby
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Header, Static, Tree
from textual.widgets.tree import TreeNode

from ren_tui.dialogs import Prompt
from ren_tui.widgets.footer import Footer

TOWERS = ("text", "vision", "backbone")
"""Top-level parts that read the inputs; the rest (fusion, pooler, heads) follow them."""


# --- pure functions over the group table -----------------------------------------


def top_of(name: str) -> str:
    """The top-level part of a group name: ``text.layers[3]`` -> ``text``."""
    return name.split(".", 1)[0].split("[", 1)[0]


def by_part(groups: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """``{"total", "trainable"}`` summed per top-level part, in model order."""
    out: dict[str, dict[str, int]] = {}
    for name, group in groups.items():
        part = out.setdefault(top_of(name), {"total": 0, "trainable": 0})
        part["total"] += group["total"]
        part["trainable"] += group["trainable"]
    return out


def _stages(names: list[str]) -> tuple[list[list[list[str]]], list[list[str]]]:
    """The groups in dataflow order: per tower a list of stages (its embedding groups
    as one stage of parallel groups, then each layer), and the stages after the
    towers (each fusion group, the pooler, then all heads as one parallel stage)."""
    towers: dict[str, tuple[list[str], list[list[str]]]] = {}
    joint: list[list[str]] = []
    heads: list[str] = []
    for name in names:
        top, _, part = name.partition(".")
        if top in TOWERS:
            embeddings, layers = towers.setdefault(top, ([], []))
            if "embeddings" in part or part == "modality_type":
                embeddings.append(name)
            else:
                layers.append([name])
        elif top == "heads":
            heads.append(name)
        else:
            joint.append([name])
    if heads:
        joint.append(heads)
    return [([emb] if emb else []) + layers for emb, layers in towers.values()], joint


def frozen_prefix(names: list[str], frozen: set[str]) -> set[str]:
    """The frozen groups with nothing trainable upstream: backpropagation never reaches them."""
    towers, joint = _stages(names)
    prefix: set[str] = set()

    def walk(stages: list[list[str]], clear: bool) -> bool:
        for stage in stages:
            if clear:
                prefix.update(n for n in stage if n in frozen)
            clear = clear and all(n in frozen for n in stage)
        return clear

    clear = all([walk(stages, True) for stages in towers])
    walk(joint, clear)
    return prefix


@dataclass(frozen=True)
class FreezeSummary:
    total: int
    trainable: int
    saved_share: float
    """Estimated share of the training compute that freezing saves (0..2/3)."""

    @property
    def frozen(self) -> int:
        return self.total - self.trainable


def freeze_summary(groups: dict[str, dict[str, int]], frozen: Iterable[str],
                   flops: dict[str, int] | None = None) -> FreezeSummary:
    """Parameter counts with ``frozen`` groups frozen, and the compute they save.

    The saving is an estimate. Training a group costs three units of its forward
    FLOPs ``F_g``: the forward pass, the input gradient and the weight gradient
    (each about one forward). A frozen group skips its weight gradient (1/3 of
    its training FLOPs); a frozen group in the frozen prefix of the network
    (:func:`frozen_prefix`: nothing upstream trains) skips its input gradient
    too (2/3). So ``saved = sum over frozen g of F_g * (2 if g in prefix else 1)``
    over ``3 * sum of F_g``. ``flops`` are the inspector's per-group forward FLOPs;
    without them, parameter counts stand in for ``F_g``.
    """
    frozen = set(frozen) & set(groups)
    names = list(groups)
    weight = flops if flops else {name: g["total"] for name, g in groups.items()}
    prefix = frozen_prefix(names, frozen)
    total = sum(g["total"] for g in groups.values())
    trainable = sum(g["total"] for name, g in groups.items() if name not in frozen)
    budget = 3 * sum(weight.get(name, 0) for name in names)
    saved = sum(weight.get(name, 0) * (2 if name in prefix else 1) for name in frozen)
    return FreezeSummary(total, trainable, saved / budget if budget else 0.0)


def _index(name: str) -> int:
    return int(name.rpartition("[")[2].rstrip("]"))


def compact_patterns(names: list[str], frozen: Iterable[str]) -> list[str]:
    """Few, readable patterns selecting exactly ``frozen``: a whole part -> ``vision``,
    consecutive layers -> ``text.layers[0:6]`` (a slice keeps its meaning when the
    layer count changes), anything else by name."""
    frozen = set(frozen)
    out: list[str] = []
    for top, members_iter in groupby(names, key=top_of):
        members = list(members_iter)
        if not any(n in frozen for n in members):
            continue
        if all(n in frozen for n in members):
            out.append(top)
            continue
        for head, items_iter in groupby(members, key=lambda n: n.partition("[")[0]):
            items = list(items_iter)
            chosen = [n for n in items if n in frozen]
            if "[" not in items[0]:
                out += chosen
                continue
            indices = sorted(_index(n) for n in chosen)
            runs: list[list[int]] = []
            for i in indices:
                if runs and i == runs[-1][1] + 1:
                    runs[-1][1] = i
                else:
                    runs.append([i, i])
            out += [f"{head}[{a}]" if a == b else f"{head}[{a}:{b + 1}]" for a, b in runs]
    return out


def with_freeze(config: dict[str, Any], patterns: list[str]) -> dict[str, Any]:
    """A copy of ``config`` whose ``[freeze]`` is exactly ``patterns``."""
    new = copy.deepcopy(config)
    new["freeze"] = {"groups": list(patterns), "unfreeze": []}
    return new


def format_count(n: int) -> str:
    return f"{n:,}"


def format_flops(n: float) -> str:
    """``1.2 GFLOP`` style."""
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6),
                        ("kFLOP", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} FLOP"


# --- the screen ------------------------------------------------------------------


class GroupTree(Tree[str]):
    """The layer groups; ``space`` and ``enter`` both toggle the node under the cursor."""

    BINDINGS = [Binding("space,enter", "select_cursor", "Toggle", key_display="space")]


class FreezeScreen(Screen["dict[str, Any] | None"]):
    """Pick frozen groups for ``config``; dismisses with the new config (``a``) or None."""

    BINDINGS = [
        Binding("a", "apply", "Apply"),
        Binding("escape", "cancel", "Cancel"),
        Binding("v", "tower('vision')", "Vision tower"),
        Binding("t", "tower('text')", "Text tower"),
        Binding("b", "tower('backbone')", "Backbone"),
        Binding("r", "range", "Range…"),
        Binding("c", "clear", "Clear"),
    ]

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = copy.deepcopy(config)
        self.groups: dict[str, dict[str, int]] = {}
        self.flops: dict[str, int] = {}
        self.frozen: set[str] = set()

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="freeze-body"):
            tree = GroupTree("model", id="groups")
            tree.show_root = False
            tree.auto_expand = False
            yield tree
            with Vertical(id="freeze-side"):
                yield Static("starting model inspector…", id="freeze-state")
                yield Static("", id="freeze-counts")
                yield Static("", id="freeze-patterns")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "Freeze"
        self._load()

    @work(thread=True, exclusive=True, group="freeze-load")
    def _load(self) -> None:
        answer = self.app.backend.inspect(self.config)
        self.app.call_from_thread(self._loaded, answer)

    def _loaded(self, answer: dict[str, Any]) -> None:
        state = self.query_one("#freeze-state", Static)
        if not answer.get("ok"):
            state.add_class("error")
            state.update(Text(f"cannot read the model: {answer.get('error')}"))
            return
        state.remove_class("error")
        state.update("space/enter toggles · a applies · escape cancels")
        self.groups = answer["params"]["groups"]
        self.flops = answer.get("flops_per_sample", {}).get("groups", {})
        self.frozen = set(answer.get("frozen_groups", []))
        self._build_tree()
        self._refresh()
        self.refresh_bindings()

    def _build_tree(self) -> None:
        tree = self.query_one(GroupTree)
        tree.clear()
        for top, members_iter in groupby(self.groups, key=top_of):
            members = list(members_iter)
            if members == [top]:
                tree.root.add_leaf(top, data=top)
                continue
            node = tree.root.add(top, data=f"part:{top}", expand=True)
            for name in members:
                node.add_leaf(name, data=name)
        tree.focus()

    def _members(self, top: str) -> list[str]:
        return [name for name in self.groups if top_of(name) == top]

    def _label(self, node: TreeNode[str]) -> Text:
        data = node.data or ""
        if data.startswith("part:"):
            top = data[5:]
            members = self._members(top)
            n = sum(name in self.frozen for name in members)
            mark = "[x]" if n == len(members) else "[-]" if n else "[ ]"
            total = sum(self.groups[m]["total"] for m in members)
            return Text(f"{mark} {top:<18}{total:>12,}", style="dim" if n == len(members) else "")
        mark = "[x]" if data in self.frozen else "[ ]"
        short = data.partition(".")[2] or data
        width = 20 if node.parent is not None and node.parent.is_root else 16  # numbers line up under the guides
        return Text(f"{mark} {short:<{width}}{self.groups[data]['total']:>12,}",
                    style="dim" if data in self.frozen else "")

    def _refresh(self) -> None:
        tree = self.query_one(GroupTree)

        def relabel(node: TreeNode[str]) -> None:
            for child in node.children:
                child.set_label(self._label(child))
                relabel(child)

        relabel(tree.root)
        summary = freeze_summary(self.groups, self.frozen, self.flops)
        share = 100 / summary.total if summary.total else 0.0
        self.query_one("#freeze-counts", Static).update(Text(
            f"trainable {summary.trainable:>14,} {summary.trainable * share:5.1f}%\n"
            f"frozen    {summary.frozen:>14,} {summary.frozen * share:5.1f}%\n"
            f"total     {summary.total:>14,}\n\n"
            f"training compute saved ≈ {100 * summary.saved_share:.0f}%\n"
            "(an estimate: frozen groups skip their weight gradients; a frozen prefix of the network "
            "skips its input gradients too)"
        ))
        patterns = self.patterns()
        self.query_one("#freeze-patterns", Static).update(
            Text("[freeze] groups = " + (", ".join(patterns) if patterns else "(none)")))

    def patterns(self) -> list[str]:
        return compact_patterns(list(self.groups), self.frozen)

    def _toggle(self, names: list[str]) -> None:
        """Freeze ``names``, or unfreeze them when all are frozen already."""
        if not names:
            return
        if all(name in self.frozen for name in names):
            self.frozen -= set(names)
        else:
            self.frozen |= set(names)
        self._refresh()

    @on(Tree.NodeSelected)
    def _selected(self, event: Tree.NodeSelected[str]) -> None:
        data = event.node.data or ""
        self._toggle(self._members(data[5:]) if data.startswith("part:") else [data])

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "tower":  # only the parts this model has
            return bool(self._members(str(parameters[0])))
        return True

    def action_tower(self, top: str) -> None:
        self._toggle(self._members(top))

    def action_clear(self) -> None:
        self.frozen.clear()
        self._refresh()

    def action_range(self) -> None:
        if self.groups:
            self.app.push_screen(Prompt("Freeze or unfreeze the groups matching", "text.layers[0:6]",
                                        "a name, prefix (vision), glob (*.embeddings) or slice (text.layers[0:6])"),
                                 self._range_chosen)

    def _range_chosen(self, pattern: str | None) -> None:
        if pattern and pattern.strip():
            self._resolve(pattern.strip())

    @work(thread=True, exclusive=True, group="freeze-range")
    def _resolve(self, pattern: str) -> None:
        """The model inspector applies the pattern (engine.freeze's matching, which needs torch)."""
        answer = self.app.backend.inspect(with_freeze(self.config, [pattern]))
        self.app.call_from_thread(self._resolved, pattern, answer)

    def _resolved(self, pattern: str, answer: dict[str, Any]) -> None:
        if not answer.get("ok"):
            self.notify(str(answer.get("error")), title=pattern, severity="error", timeout=8)
            return
        self._toggle(answer.get("frozen_groups", []))

    def action_apply(self) -> None:
        if not self.groups:
            self.dismiss(None)
            return
        self.dismiss(with_freeze(self.config, self.patterns()))

    def action_cancel(self) -> None:
        self.dismiss(None)
