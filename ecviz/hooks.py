"""Named hook points: identity modules that expose intermediate tensors to observers.

Like TransformerLens' HookPoint: a model calls `self.hook_x(tensor)` where a value is worth seeing; the
call returns its input unchanged, and anything registered with `register_forward_hook` sees it under the
module's dotted name (e.g. `blocks.3.moe.hook_dispatch`). With no hook attached, it costs one call.
A model's points are `model.hook_points` (name -> HookPoint); `ecviz hooks --ckpt DIR` lists them with the
shapes they see and what they mean (`HOOK_DOCS`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

HOOK_DOCS = {  # by the last part of the hook point's name: what it sees, shapes as in `ecviz hooks`
    "hook_t": "(B,) the timestep each image sees (0 noise -> 1 data)",
    "hook_keep": "(B, S') kept token positions; MaskDiT training forwards only",
    "hook_attn": "(B, heads, S, L) cross-attention probabilities",
    "hook_affinity": "(G, g, E) router softmax of each group member token",
    "hook_group": "(G, g) flat index b*S + s of each group member token: which images share a group",
    "hook_dispatch": "(G, E, C) index within the group of the token each expert took per slot (-1: empty)",
    "hook_gate": "(G, E, C) gating weight of that slot (0 where empty)",
    "hook_choice": "(G, g, k) token choice: expert of each of the token's k choices (-1: dropped)",
    "hook_choice_gate": "(G, g, k) token choice: normalised gate of each choice",
}


class HookPoint(nn.Module):
    """Identity module; observers attach with `add_hook(fn)`, fn(tensor, name) -> None."""

    name: str = ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @property
    def active(self) -> bool:
        """Whether anyone listens: lets a layer skip work (e.g. explicit attention maps) that only hooks need."""
        return bool(self._forward_hooks)

    def add_hook(self, fn: Callable[[torch.Tensor, str], None],
                 name: str | None = None) -> torch.utils.hooks.RemovableHandle:
        """Call fn(tensor, name) on every forward; name defaults to this point's name in its model."""
        name = self.name if name is None else name

        def observe(_mod, _inp, out) -> None:  # returns None whatever fn returns: observers never replace output
            fn(out, name)

        return self.register_forward_hook(observe)


def name_hook_points(model: nn.Module) -> dict[str, HookPoint]:
    """Give every HookPoint its dotted name and return them by name."""
    points = {}
    for name, mod in model.named_modules():
        if isinstance(mod, HookPoint):
            mod.name = name
            points[name] = mod
    return points


def find_hook_points(module: nn.Module) -> dict[str, HookPoint]:
    """Every HookPoint under `module` by its dotted name relative to it, renaming nothing (a submodule's points
    keep the names their model gave them)."""
    return {name: mod for name, mod in module.named_modules() if isinstance(mod, HookPoint)}


@contextmanager
def hooks(model: nn.Module, fns: dict[str, Callable[[torch.Tensor, str], None]]) -> Iterator[None]:
    """Attach fns by hook-point name (a name may end in '*' to match a prefix); always detach on exit."""
    points = find_hook_points(model)
    handles = []
    try:
        for pattern, fn in fns.items():
            if pattern.endswith("*"):
                names = [n for n in points if n.startswith(pattern[:-1])]
            else:
                names = [pattern] if pattern in points else []
            if not names:
                raise KeyError(f"no hook point matches {pattern!r}")
            handles += [points[n].add_hook(fn, n) for n in names]
        yield
    finally:
        for h in handles:
            h.remove()
