"""Scoped recording of intermediate outputs, addressed by ``named_modules()`` names such as 'model.17'."""
from __future__ import annotations

import difflib

import torch
import torch.nn as nn

from utils.torch_utils import de_parallel

_SHOWN_NAMES = 40  # valid names quoted in an unknown-name error


class FeatureRecorder:
    """Forward hooks that live exactly as long as a ``with`` block.

    Usage::

        with FeatureRecorder(de_parallel(model), ['model.4', 'model.17']) as rec:
            model(images)
        feats = rec.outputs  # {'model.4': tensor, 'model.17': tensor}, in the order of names

    Hooks are attached on entering and removed on leaving (also when the block raises), and the recorder keeps all
    of its state on itself, so the model carries nothing afterwards: deepcopy, ModelEMA and pickling see a clean
    model. Names refer to the bare model; a DP/DDP wrapper is unwrapped here, and calling the wrapper inside the
    block still records, because the wrapper runs the same submodules. The same recorder may be entered again for
    every step; each entry starts a fresh ``outputs`` dict and leaves the previous one untouched.

    Args:
        model: the module whose submodules are recorded.
        names: ``named_modules()`` names; the output of each is recorded as returned (lists/tuples as they are).
            A module called twice in one forward keeps its last output. Record whole blocks (``model.17``, a Conv,
            a C3): the activations are in place (as in YOLOv5), so the output of a bare BatchNorm inside a Conv is
            overwritten by its activation right after the hook sees it.
        detach: store detached outputs (no gradient path back into the model).

    Raises:
        ValueError: on a name the model does not have; the message lists valid names.
    """

    def __init__(self, model: nn.Module, names, detach: bool = False):
        self.model = de_parallel(model)
        self.names = list(dict.fromkeys([names] if isinstance(names, str) else names))
        self.detach = detach
        self._modules = resolve_modules(self.model, self.names)
        self._handles = []
        self._store = {}

    def __enter__(self):
        if self._handles:
            raise RuntimeError("FeatureRecorder is already active; it cannot be nested in itself")
        self._store = {}
        try:
            for name, module in self._modules.items():
                self._handles.append(module.register_forward_hook(self._hook(name)))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        self._remove()
        return False

    def _remove(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, name):
        store, detach = self._store, self.detach

        def record(module, inputs, output):
            store[name] = _detached(output) if detach else output

        return record

    @property
    def outputs(self) -> dict:
        """{name: output} for the names recorded in the last block, in the order given to the constructor."""
        return {name: self._store[name] for name in self.names if name in self._store}

    def get(self, names=None) -> list:
        """Recorded outputs of ``names`` (default: all names) as a list, in that order."""
        names = self.names if names is None else names
        missing = [n for n in names if n not in self._store]
        if missing:
            raise KeyError(f"nothing recorded for {missing}: those modules did not run in the forward pass inside "
                           f"the 'with' block, or were not among the recorder's names {self.names}")
        return [self._store[n] for n in names]


def _detached(output):
    if isinstance(output, torch.Tensor):
        return output.detach()
    if isinstance(output, (list, tuple)):
        return type(output)(_detached(x) for x in output)
    return output


def resolve_modules(model: nn.Module, names) -> dict:
    """{name: submodule} for ``named_modules()`` names; an unknown name raises ValueError listing valid ones."""
    table = dict(model.named_modules())
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(_unknown_message(unknown, table))
    return {n: table[n] for n in names}


def _unknown_message(unknown, table) -> str:
    shallow = [n for n in table if n and n.count(".") <= 1]  # 'model', 'model.0', ... rather than every conv
    shown = ", ".join(shallow[:_SHOWN_NAMES]) + (f", ... ({len(shallow) - _SHOWN_NAMES} more)"
                                                 if len(shallow) > _SHOWN_NAMES else "")
    hints = {n: difflib.get_close_matches(n, list(table), n=3) for n in unknown}
    hint = "; ".join(f"'{n}': did you mean {', '.join(h)}?" for n, h in hints.items() if h)
    return (f"unknown layer name(s) {unknown}; pass named_modules() names of the bare (de_parallel) model, "
            f"e.g. {shown}" + (f". {hint}" if hint else "") + ". Nested names such as 'model.4.cv3' work too.")
