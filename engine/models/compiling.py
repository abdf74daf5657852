"""``train.compile``: the model under ``torch.compile``, in place.

``Module.compile`` compiles a module's own ``__call__`` and leaves the module where it is, so parameter
names, ``state_dict`` keys, checkpoints, freezing and the layer groups are the same as eager training's.
With ``regions`` (the default) only the repeated blocks are compiled, each block class once and then reused
from the compiler's cache (the regional compilation of the PyTorch recipe and accelerate's
``compile_regions``), which compiles far faster than the whole model; the glue between blocks runs eagerly.
"""

from __future__ import annotations

from torch import nn


def _repeated(container: nn.Module) -> bool:
    """A ModuleList of blocks of one class (the layers of a transformer tower or of the fusion), or a
    Sequential of two or more (the residual blocks of a CNN stage), each block made of modules of its own."""
    blocks = list(container.children())
    least = 1 if isinstance(container, nn.ModuleList) else 2 if isinstance(container, nn.Sequential) else None
    return (least is not None and len(blocks) >= least and len({type(b) for b in blocks}) == 1
            and any(True for _ in blocks[0].children()))


def compile_model(model: nn.Module, *, mode: str = "default", regions: bool = True) -> list[str]:
    """Compile ``model`` in place (``mode``: torch.compile's); returns the names of the compiled modules
    (``""``: the whole model)."""
    if not regions:
        model.compile(mode=mode)
        return [""]
    compiled: list[str] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if _repeated(child):
                for index, block in enumerate(child.children()):
                    block.compile(mode=mode)
                    compiled.append(f"{path}.{index}")
            else:
                visit(child, path)

    visit(model, "")
    return compiled
