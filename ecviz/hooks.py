"""Named hook points: identity modules that expose intermediate tensors to observers.

Like TransformerLens' HookPoint: a model calls `self.hook_x(tensor)` where a value is worth seeing; the
call returns its input unchanged, and anything registered with `register_forward_hook` sees it under the
module's dotted name (e.g. `blocks.3.moe.hook_dispatch`). With no hook attached, it costs one call.
A model's points are `model.hook_points` (name -> HookPoint); `ecviz hooks --ckpt DIR` lists them with the
shapes they see and what they mean (`HOOK_DOCS`).

Observing is the default: `hooks(model, {name: fn})` calls fn(tensor, name) and ignores what it returns.
Editing is asked for: `hooks(model, {name: fn}, edit=True)` lets fn return a replacement (None keeps the
value), which the model computes on with, as TransformerLens' hooks do; e.g. zeroing one expert's column of
`hook_gate` removes that expert's contribution, and -1 in `hook_dispatch` empties a slot (expert choice).
Points whose value nothing downstream reads (`hook_group`, token choice's `hook_choice`, `hook_choice_gate`
and `hook_dispatch`, which are views of the routing computed for observers) are observe-only
(`HookPoint.editable` False), and `hooks(..., edit=True)` refuses them rather than ignoring the edit.
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
    "hook_group": "(G, g) flat index b*S + s of each group member token: which images share a group "
                  "(in a MaskDiT forward b*S' + s', counting kept tokens)",
    "hook_dispatch": "(G, E, C) index within the group of the token each expert took per slot (-1: empty)",
    "hook_gate": "(G, E, C) gating weight of that slot (0 where empty)",
    "hook_choice": "(G, g, k) token choice: expert of each of the token's k choices (-1: dropped)",
    "hook_choice_gate": "(G, g, k) token choice: normalised gate of each choice",
}


class HookPoint(nn.Module):
    """Identity module; observers attach with `add_hook(fn)`, fn(tensor, name) -> None, and editors with
    `add_hook(fn, edit=True)`, fn(tensor, name) -> replacement or None. `editable`: whether the model computes
    on with what this point returns (False: a view made for observers, which an edit would not change)."""

    name: str = ""

    def __init__(self, editable: bool = True):
        super().__init__()
        self.editable = editable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @property
    def active(self) -> bool:
        """Whether anyone listens: lets a layer skip work (e.g. explicit attention maps) that only hooks need."""
        return bool(self._forward_hooks)

    @property
    def edited(self) -> bool:
        """Whether a hook may replace the value: one attached with edit=True, or by register_forward_hook
        directly (whose return value PyTorch uses). Lets a layer check an edit (e.g. -1 slots) only then."""
        return any(not getattr(h, "observes", False) for h in self._forward_hooks.values())

    def add_hook(self, fn: Callable[[torch.Tensor, str], torch.Tensor | None], name: str | None = None,
                 edit: bool = False) -> torch.utils.hooks.RemovableHandle:
        """Call fn(tensor, name) on every forward; name defaults to this point's name in its model. With
        edit, a tensor fn returns replaces the value (it must keep its shape); an observer's return is ignored."""
        name = self.name if name is None else name
        if edit and not self.editable:
            raise ValueError(f"hook point {name!r} is observe-only: the model does not compute with its value, "
                             "so an edit would change nothing (see ecviz.hooks)")

        def observe(_mod, _inp, out) -> None:  # returns None whatever fn returns: observers never replace output
            fn(out, name)

        def replace(_mod, _inp, out):
            new = fn(out, name)
            if new is not None and (not isinstance(new, torch.Tensor) or new.shape != out.shape):
                raise ValueError(f"an edit of {name!r} must return a tensor of shape {tuple(out.shape)} or None, "
                                 f"got {tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__}")
            return new

        observe.observes = True
        if edit:  # editors run before every observer (so what is recorded is what the model computed with), the
            # one attached last first: several edits of one point compose from the outermost in
            return self.register_forward_hook(replace, prepend=True)
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
def hooks(model: nn.Module, fns: dict[str, Callable[[torch.Tensor, str], torch.Tensor | None]],
          edit: bool = False) -> Iterator[None]:
    """Attach fns by hook-point name (a name may end in '*' to match a prefix); always detach on exit. A point
    that several patterns match gets each function once. With edit, fns may return replacements (module
    docstring); a pattern naming an observe-only point is refused, one matching some skips those."""
    points = find_hook_points(model)
    handles, attached = [], set()
    try:
        for pattern, fn in fns.items():
            if pattern.endswith("*"):
                names = [n for n in points if n.startswith(pattern[:-1]) and (points[n].editable or not edit)]
            else:
                names = [pattern] if pattern in points else []
            if not names:
                raise KeyError(f"no {'editable ' if edit else ''}hook point matches {pattern!r}")
            for n in names:
                if (n, id(fn)) not in attached:
                    attached.add((n, id(fn)))
                    handles.append(points[n].add_hook(fn, n, edit=edit))
        yield
    finally:
        for h in handles:
            h.remove()
