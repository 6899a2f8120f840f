"""Optimizer classes with torch.optim's interface over fastadam's native kernels.

A step hands every parameter of every group to the kernel in one native call: it
validates all arrays first (a bad gradient leaves everything untouched), then
releases the GIL once and updates all tensors in one parallel region.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from . import _core
from ._common import (
    ADAM,
    SGD as _SGD_ALGORITHM,
    Algorithm,
    Rollback,
    StepGuard,
    check_group,
    check_loaded_entry,
    state_stagger,
    zeros_packed,
)

__all__ = ["Optimizer", "Adam", "AdamW", "SGD"]

Params = Sequence[np.ndarray] | Mapping[str, np.ndarray] | Sequence[Mapping[str, Any]]
Grads = Sequence[np.ndarray | None] | Sequence[Sequence[np.ndarray | None]] | Mapping[str, np.ndarray | None]


class Optimizer:
    """Common machinery: param groups, gradient layout, lazily created state, state_dict.

    Subclasses set ``_algorithm`` (the update rule: its kernel, hyper-parameter table
    and state buffers, fastadam._common) and pass their defaults.
    """

    _algorithm: ClassVar[Algorithm]

    def __init__(self, params: Params, defaults: dict[str, Any]) -> None:
        self.defaults = dict(defaults)
        self._step_name = f"{type(self).__name__}.step()"
        self.param_groups: list[dict[str, Any]] = []
        self._params: list[np.ndarray] = []
        self._names: list[str | None] = []
        self._buffers: dict[str, list[np.ndarray | None]] = {k: [] for k in self._state_keys}
        self._steps = np.zeros(0, dtype=np.int64)  # counted by the plan
        self._group_sizes: list[int] = []
        # The buffers each group needed when every param last had all of them; while it
        # matches, a step skips the Python loop that creates state.
        self._complete_for: list[tuple[str, ...]] | None = None
        self._plan: Any = None
        self._guard = StepGuard(self._step_name)

        if isinstance(params, np.ndarray):
            raise TypeError(
                f"{type(self).__name__}: params must be a list of arrays, a dict name -> array, or a list of "
                "param-group dicts, not a single array; wrap it: [param]"
            )
        if isinstance(params, Mapping):
            groups: list[Any] = [{"params": params}]
        else:
            groups = list(params)
            if not groups:
                raise ValueError(f"{type(self).__name__}: got an empty parameter list")
            if not isinstance(groups[0], Mapping):
                groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)

    @property
    def _state_keys(self) -> tuple[str, ...]:
        return self._algorithm.state_keys

    # ----- groups ------------------------------------------------------------------

    def add_param_group(self, param_group: Mapping[str, Any]) -> None:
        """Add a group: ``{"params": [arrays] or {name: array}, **hyper_parameters}``."""
        if not isinstance(param_group, Mapping) or "params" not in param_group:
            raise TypeError(f"{type(self).__name__}: a param group is a dict with a 'params' entry")
        group = dict(param_group)
        params = group["params"]
        if isinstance(params, np.ndarray):
            params = [params]
        if isinstance(params, Mapping):
            names: list[str | None] = [str(k) for k in params]
            arrays = list(params.values())
        else:
            arrays = list(params)
            names = [None] * len(arrays)
        unknown = set(group) - set(self.defaults) - {"params"}
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown hyper-parameter(s) {sorted(unknown)} in a param group")
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        group["params"] = arrays
        name = f"{type(self).__name__}()"
        _core._check_params(self._params + arrays, name)  # dtypes, layout, and no array given twice
        check_group(self._algorithm, group, f"{name}: param_groups[{len(self.param_groups)}]")
        named = [n for n in names if n is not None]
        if len(set(named)) != len(named) or set(named) & set(self._names):
            raise ValueError(f"{name}: parameter names must be unique")

        self.param_groups.append(group)
        self._params.extend(arrays)
        self._names.extend(names)
        for key in self._state_keys:
            self._buffers[key].extend([None] * len(arrays))
        self._steps = np.concatenate([self._steps, np.zeros(len(arrays), dtype=np.int64)])
        self._group_sizes.append(len(arrays))
        self._complete_for = None
        self._plan = None

    # ----- the step ----------------------------------------------------------------

    def _grad_list(self, grads: Grads) -> Sequence[np.ndarray | None]:
        n = len(self._params)
        # The common call first (a list of arrays): the ABC checks below cost about 0.5 us.
        if type(grads) is list and len(grads) == n and n and type(grads[0]) is np.ndarray:
            return grads
        if isinstance(grads, Mapping):
            if None in self._names:
                raise TypeError(
                    f"{type(self).__name__}.step(): grads by name need params given by name (a dict name -> array)"
                )
            unknown = grads.keys() - set(self._names)
            if unknown:
                raise ValueError(f"{type(self).__name__}.step(): grads has unknown parameter names {sorted(unknown)}")
            return [grads.get(name) for name in self._names]  # type: ignore[arg-type]
        if isinstance(grads, np.ndarray) or not isinstance(grads, Sequence):
            raise TypeError(
                f"{type(self).__name__}.step(): grads must be a list aligned with the params (or a dict by name), "
                f"got {type(grads).__name__}"
            )
        # One list per group ([[gw], [gb]]): arrays are never lists, so lists mean groups.
        if len(grads) == len(self.param_groups) and grads and all(isinstance(g, (list, tuple)) for g in grads):
            sizes = [len(g) for g in grads]  # type: ignore[arg-type]
            if sizes != self._group_sizes:
                raise ValueError(
                    f"{type(self).__name__}.step(): got gradient lists of sizes {sizes} for param groups of sizes "
                    f"{self._group_sizes}"
                )
            return [g for group in grads for g in group]  # type: ignore[union-attr]
        if len(grads) != n:
            raise ValueError(f"{type(self).__name__}.step(): got {len(grads)} gradients for {n} parameters")
        return grads  # type: ignore[return-value]

    def step(self, grads: Grads) -> None:
        """Update every parameter in place from ``grads`` (aligned with the params, one list
        per group, or by name).

        A ``None`` gradient skips its parameter, as torch skips params whose ``.grad``
        is None. All gradients are validated before any array is written. A step called
        while another thread is inside a step of the same optimizer raises RuntimeError.
        """
        with self._guard:
            grad_list = self._grad_list(grads)
            created = Rollback()
            needs = [self._algorithm.needed_keys(group) for group in self.param_groups]
            try:
                for attempt in range(2):
                    if needs != self._complete_for:
                        self._create_state(grad_list, needs, created)
                    if self._plan is None:
                        states = [list(self._buffers[k]) for k in self._state_keys]
                        self._plan = _core._StepPlan(
                            self._algorithm.kind, self._step_name, list(self._params), states, list(self._group_sizes)
                        )
                    if self._plan.step(grad_list, self._steps, self.param_groups):
                        break
                    if attempt:
                        raise RuntimeError(f"{self._step_name}: internal error: a plan built for this step found it stale")
                    self._adopt_param_groups()  # nothing was written: the groups hold other arrays
            except BaseException:
                # A rejected step leaves no trace, not even fresh state; a step that happened
                # (then interrupted, as by Ctrl-C, on its way out) keeps the state it created.
                if created and (self._plan is None or self._plan.completed == 0):
                    created.run()
                    self._plan = None
                self._complete_for = None
                raise

    def _adopt_param_groups(self) -> None:
        """Takes the arrays the param groups hold now: one replaced in ``param_groups[g]["params"]``
        starts with fresh state, as in torch.optim; other changes raise ValueError."""
        name = self._step_name
        if len(self.param_groups) != len(self._group_sizes):
            raise ValueError(
                f"{name}: param_groups has {len(self.param_groups)} groups, the optimizer {len(self._group_sizes)}: "
                "add a group with add_param_group(), which fills in its defaults and checks it"
            )
        arrays: list[np.ndarray] = []
        for g, (group, size) in enumerate(zip(self.param_groups, self._group_sizes)):
            params = group.get("params")
            if not isinstance(params, (list, tuple)) or len(params) != size:
                raise ValueError(
                    f"{name}: param_groups[{g}]['params'] must stay a list of {size} arrays; add params with "
                    "add_param_group(), or build a new optimizer"
                )
            arrays.extend(params)
        _core._check_params(arrays, name)  # dtypes, layout, and no array given twice
        for i, (new, old) in enumerate(zip(arrays, self._params)):
            if new is not old:
                for key in self._state_keys:
                    self._buffers[key][i] = None
                self._steps[i] = 0
        self._params = arrays
        self._plan = None
        self._complete_for = None

    def __getstate__(self) -> dict[str, Any]:
        # copy.deepcopy and pickle: the native plan and the guard are rebuilt, not copied.
        state = self.__dict__.copy()
        state["_plan"] = None
        del state["_guard"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._guard = StepGuard(self._step_name)

    def _create_state(self, grads: Sequence[np.ndarray | None], needs: list[tuple[str, ...]], created: Rollback) -> None:
        missing: dict[str, list[int]] = {key: [] for key in self._state_keys}
        complete = True
        start = 0
        for needed, size in zip(needs, self._group_sizes):
            for i in range(start, start + size):
                for key in needed:
                    if self._buffers[key][i] is None:
                        if grads[i] is None:
                            complete = False
                            continue
                        missing[key].append(i)
            start += size
        if any(missing.values()):
            self._plan = None  # before any change: the plan that steps with new state is a new one
        for kind, (key, indices) in enumerate(missing.items()):
            for i, array in zip(indices, self._zeros_state(kind, indices)):
                # C-level undos (Rollback), each registered before its change
                created.add(functools.partial(self._buffers[key].__setitem__, i, None))
                self._buffers[key][i] = array
                if not self._algorithm.counts_steps:
                    # SGD: count 0 tells the kernel the buffer is new (it becomes the gradient, as torch's clone)
                    created.add(functools.partial(self._steps.__setitem__, i, int(self._steps[i])))
                    self._steps[i] = 0
        self._complete_for = needs if complete else None

    def _zeros_state(self, kind: int, indices: list[int]) -> list[np.ndarray]:
        """New zeroed buffers of state kind number ``kind`` for the params at ``indices``."""
        likes = [(self._params[i].shape, self._params[i].dtype) for i in indices]
        return zeros_packed(likes, stagger=state_stagger(kind))

    # ----- state -------------------------------------------------------------------

    @property
    def state(self) -> dict[int, dict[str, Any]]:
        """Per-parameter state by flat parameter index (live arrays, not copies)."""
        out: dict[int, dict[str, Any]] = {}
        for i in range(len(self._params)):
            entry: dict[str, Any] = {k: self._buffers[k][i] for k in self._state_keys if self._buffers[k][i] is not None}
            if self._algorithm.counts_steps and (entry or self._steps[i]):
                out[i] = {"step": float(self._steps[i]), **entry}
            elif entry:
                out[i] = entry
        return out

    def state_dict(self) -> dict[str, Any]:
        """torch.optim layout: ``{"state": {index: {"step", buffers...}}, "param_groups": [...]}``.

        Arrays are copies, so the dict is a snapshot. To hand it to torch, turn the
        arrays into tensors (``torch.from_numpy``); torch's own state dicts load here as they are.
        """
        state = {i: {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in s.items()} for i, s in self.state.items()}
        groups = []
        start = 0
        for group, size in zip(self.param_groups, self._group_sizes):
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = list(range(start, start + size))
            groups.append(packed)
            start += size
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state dict from ``state_dict()`` or from the same torch optimizer.

        Everything is checked before anything changes: group count and sizes, indices,
        shapes. Buffers are copied into new C-contiguous arrays of the parameter's dtype.
        """
        name = f"{type(self).__name__}.load_state_dict()"
        groups = list(state_dict["param_groups"])
        if len(groups) != len(self.param_groups):
            raise ValueError(f"{name}: the state dict has {len(groups)} param groups, this optimizer {len(self.param_groups)}")
        for saved, size in zip(groups, self._group_sizes):
            if len(saved["params"]) != size:
                raise ValueError(f"{name}: a saved param group has {len(saved['params'])} params, this optimizer's {size}")
        # torch numbers params in group order, as we do.
        order = [int(i) for saved in groups for i in saved["params"]]
        index_of = {saved_index: i for i, saved_index in enumerate(order)}
        new_groups = []
        for group, saved in zip(self.param_groups, groups):
            updated = dict(group)
            updated.update({k: v for k, v in saved.items() if k != "params"})
            if "betas" in updated:
                updated["betas"] = tuple(updated["betas"])
            check_group(self._algorithm, updated, name)
            new_groups.append(updated)
        group_of = [g for g, size in enumerate(self._group_sizes) for _ in range(size)]
        new_buffers: dict[str, list[np.ndarray | None]] = {k: [None] * len(self._params) for k in self._state_keys}
        new_steps = np.zeros(len(self._params), dtype=np.int64)
        for saved_index, entry in state_dict["state"].items():
            if int(saved_index) not in index_of:
                raise ValueError(f"{name}: state for unknown parameter index {saved_index}")
            i = index_of[int(saved_index)]
            param = self._params[i]
            check_loaded_entry(self._algorithm, entry, new_groups[group_of[i]], f"{name}: parameter {saved_index}")
            for key, value in entry.items():
                if key == "step":
                    step = float(value)
                    if step < 0 or step != int(step):
                        raise ValueError(f"{name}: step of parameter {saved_index} must be a whole number >= 0, got {step}")
                    new_steps[i] = int(step)
                elif key in self._state_keys:
                    if value is None:  # torch's SGD saves momentum_buffer None without momentum
                        continue
                    if hasattr(value, "detach") and hasattr(value, "numpy"):  # a torch tensor
                        value = value.detach().cpu().numpy()
                    loaded = np.asarray(value, dtype=param.dtype)
                    if loaded.shape != param.shape:
                        raise ValueError(
                            f"{name}: {key} of parameter {saved_index} has shape {loaded.shape}, the parameter {param.shape}"
                        )
                    new_buffers[key][i] = loaded
                    if not self._algorithm.counts_steps:
                        new_steps[i] = 1  # a loaded momentum buffer is past its first step
                else:
                    raise ValueError(f"{name}: unknown state entry {key!r} for parameter {saved_index}")
        for kind, key in enumerate(self._state_keys):  # copied into the optimizer's own blocks
            indices = [i for i, a in enumerate(new_buffers[key]) if a is not None]
            for i, array in zip(indices, self._zeros_state(kind, indices)):
                array[...] = new_buffers[key][i]
                new_buffers[key][i] = array
        self.param_groups[:] = new_groups
        self._buffers = new_buffers
        self._steps = new_steps
        self._complete_for = None
        self._plan = None

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            lines.extend(f"    {k}: {group[k]}" for k in sorted(group) if k != "params")
        return "\n".join(lines) + "\n)"


class Adam(Optimizer):
    r"""Adam (Kingma & Ba, 2015) with torch.optim.Adam's interface and conventions.

    Per element, with step count :math:`t` (see :mod:`fastadam.reference` for the
    exact order of operations)::

        g = grad (+ weight_decay * p unless decoupled; -grad if maximize)
        m = beta1*m + (1-beta1)*g          v = beta2*v + (1-beta2)*g*g
        p = p - lr/(1-beta1**t) * m / (sqrt(v)/sqrt(1-beta2**t) + eps)

    ``lr`` is in parameter units per step; ``eps`` in gradient units.

    Args:
        params: a list of float32/float64 C-contiguous arrays, a dict name -> array,
            or a list of param-group dicts (``{"params": [...], "lr": ...}``).
        lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay:
            as in ``torch.optim.Adam``.

    ``step(grads)`` takes gradients in the params' structure; arrays are updated in place.
    """

    _algorithm = ADAM

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,  # validated with the group
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        super().__init__(params, defaults)



class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019), as torch.optim.AdamW:
    ``p = p * (1 - lr*weight_decay)`` before the Adam update. Default ``weight_decay=1e-2``."""

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize, decoupled_weight_decay=True)


class SGD(Optimizer):
    """Stochastic gradient descent with momentum and Nesterov momentum, as torch.optim.SGD.

    Per element: ``g = grad (+ weight_decay*p)``; with momentum, ``buf = g`` on the first
    step and ``buf = momentum*buf + (1-dampening)*g`` after; ``g = g + momentum*buf``
    (nesterov) or ``g = buf``; ``p = p - lr*g``. See :mod:`fastadam.reference`.
    """

    _algorithm = _SGD_ALGORITHM

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
        super().__init__(params, defaults)
