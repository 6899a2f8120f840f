"""Optimizer classes with torch.optim's interface over fastadam's native kernels.

A step hands every parameter of every group to the kernel in one native call: it
validates all arrays first (a bad gradient leaves everything untouched), then
releases the GIL once and updates all tensors in one parallel region.
"""

from __future__ import annotations

import functools
import math
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
    check_max_grad_norm,
    check_mixed_precision,
    state_stagger,
    zeros_packed,
)
from .quantized import QUANT_BLOCK, QuantizedState, convert_entry, is_quantized_entry, read_quantized_entry

__all__ = ["Optimizer", "Adam", "AdamW", "SGD", "Adam8bit", "AdamW8bit", "Adam4bit", "AdamW4bit"]

Params = Sequence[np.ndarray] | Mapping[str, np.ndarray] | Sequence[Mapping[str, Any]]
Grads = Sequence[np.ndarray | None] | Sequence[Sequence[np.ndarray | None]] | Mapping[str, np.ndarray | None]


_NARROW_KINDS = ("bfloat16", "float16")
_FLOAT16, _FLOAT32 = np.dtype(np.float16), np.dtype(np.float32)


def _to_numpy(value: Any) -> Any:
    """A torch tensor's values as a NumPy array (bfloat16 through float32: exact); else as is."""
    if hasattr(value, "detach") and hasattr(value, "numpy"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return value


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
        # a buffer per state key and param: an array, None, or (quantized optimizers) a QuantizedState
        self._buffers: dict[str, list[Any]] = {k: [] for k in self._state_keys}
        self._steps = np.zeros(0, dtype=np.int64)  # counted by the plan
        self._group_sizes: list[int] = []
        # The buffers each group needed when every param last had all of them; while it
        # matches, a step skips the Python loop that creates state.
        self._complete_for: list[tuple[str, ...]] | None = None
        self._plan: Any = None
        self._guard = StepGuard(self._step_name)
        self._masters: list[np.ndarray | None] = []  # Adam(master_weights=True): fp32 copies
        self.max_grad_norm: float | None = None
        self.last_step_skipped = False  # the last step met an inf/NaN gradient and wrote nothing
        self._narrow_grads = False  # bf16/fp16 gradients seen: steps take the mixed path
        self._narrow_params = False  # a bf16/fp16 param (the only 2-byte floats fastadam takes): the mixed path
        self._precision_checked: list[tuple[Any, ...]] | None = None  # group settings last checked (mixed steps)

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

    _takes_narrow: ClassVar[bool] = False  # bfloat16/float16 params (Adam's mixed precision)

    def _check_precision(self, group: Mapping[str, Any], arrays: Sequence[np.ndarray], where: str) -> None:
        """Adam checks its mixed-precision keys against the group's params; SGD has none."""

    def _mixed(self, group: Mapping[str, Any]) -> bool:
        return False

    def _state_dtype(self, group: Mapping[str, Any], param: np.ndarray) -> np.dtype[Any]:
        return param.dtype

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
        _core._check_params(self._params + arrays, name, self._takes_narrow)  # dtypes, layout, and no array given twice
        where = f"{name}: param_groups[{len(self.param_groups)}]"
        check_group(self._algorithm, group, where)
        self._check_precision(group, arrays, where)
        named = [n for n in names if n is not None]
        if len(set(named)) != len(named) or set(named) & set(self._names):
            raise ValueError(f"{name}: parameter names must be unique")

        self.param_groups.append(group)
        self._params.extend(arrays)
        self._names.extend(names)
        for key in self._state_keys:
            self._buffers[key].extend([None] * len(arrays))
        self._masters.extend([None] * len(arrays))
        self._narrow_params = any(a.itemsize == 2 for a in self._params)
        self._steps = np.concatenate([self._steps, np.zeros(len(arrays), dtype=np.int64)])
        self._group_sizes.append(len(arrays))
        self._complete_for = None
        self._plan = None
        self._precision_checked = None

    # ----- the step ----------------------------------------------------------------

    def _grad_list(self, grads: Grads, what: str = "grads") -> Sequence[np.ndarray | None]:
        n = len(self._params)
        # The common call first (a list of arrays): the ABC checks below cost about 0.5 us.
        if type(grads) is list and len(grads) == n and n and type(grads[0]) is np.ndarray:
            return grads
        if isinstance(grads, Mapping):
            if None in self._names:
                raise TypeError(
                    f"{type(self).__name__}.step(): {what} by name need params given by name (a dict name -> array)"
                )
            unknown = grads.keys() - set(self._names)
            if unknown:
                raise ValueError(f"{type(self).__name__}.step(): {what} has unknown parameter names {sorted(unknown)}")
            return [grads.get(name) for name in self._names]  # type: ignore[arg-type]
        if isinstance(grads, np.ndarray) or not isinstance(grads, Sequence):
            raise TypeError(
                f"{type(self).__name__}.step(): {what} must be a list aligned with the params (or a dict by name), "
                f"got {type(grads).__name__}"
            )
        # One list per group ([[gw], [gb]]): arrays are never lists, so lists mean groups.
        if len(grads) == len(self.param_groups) and grads and all(isinstance(g, (list, tuple)) for g in grads):
            sizes = [len(g) for g in grads]  # type: ignore[arg-type]
            if sizes != self._group_sizes:
                raise ValueError(
                    f"{type(self).__name__}.step(): got {'gradient' if what == 'grads' else what} lists of sizes {sizes} for param groups of sizes "
                    f"{self._group_sizes}"
                )
            return [g for group in grads for g in group]  # type: ignore[union-attr]
        if len(grads) != n:
            raise ValueError(f"{type(self).__name__}.step(): got {len(grads)} entries in {what} for {n} parameters")
        return grads  # type: ignore[return-value]

    def step(
        self, grads: Grads, *, grad_scale: float | None = None, params_out: Grads | None = None
    ) -> float | None:
        """Update every parameter in place from ``grads`` (aligned with the params, one list
        per group, or by name).

        A ``None`` gradient skips its parameter, as torch skips params whose ``.grad``
        is None. All gradients are validated before any array is written. A step called
        while another thread is inside a step of the same optimizer raises RuntimeError.

        Adam only (mixed precision, docs/design.md): ``grad_scale`` divides the gradients
        (loss scaling); ``params_out``, in the params' structure (None entries allowed),
        receives bfloat16/float16 copies of updated float32 params. Returns the global L2
        norm of the gradients (after unscaling) when ``grad_scale`` or ``max_grad_norm`` is
        set, else None. A gradient holding inf/NaN then skips the whole step: nothing is
        written, step counts stay, ``last_step_skipped`` is True and the norm is not finite.
        """
        with self._guard:
            grad_list = self._grad_list(grads)
            if (
                grad_scale is None
                and params_out is None
                and self.max_grad_norm is None
                and not self._narrow_grads
                and not self._narrow_params
                and not any(map(self._mixed, self.param_groups))
            ):
                self.last_step_skipped = False
                try:
                    self._plan_step(grad_list)
                    return None
                except TypeError:
                    # The plan takes gradients of the param's dtype; bf16/fp16 gradients of
                    # fp32 params (nothing was written) take the mixed path from now on.
                    if not self._takes_narrow or not any(isinstance(g, np.ndarray) and g.dtype.name in _NARROW_KINDS for g in grad_list):
                        raise
                    self._narrow_grads = True
            return self._mixed_step(grad_list, grad_scale, params_out)

    def _plan_step(self, grad_list: Sequence[np.ndarray | None]) -> None:
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

    def _mixed_step(
        self, grad_list: Sequence[np.ndarray | None], grad_scale: float | None, params_out: Grads | None
    ) -> float | None:
        """Adam's mixed-precision step: one native call (``_core._adam_step_groups``) over the
        params with a gradient; fp32 master weights and their low-precision copy, bf16 states,
        loss scaling, global-norm clipping, stochastic rounding. docs/design.md, "Mixed precision"."""
        name = self._step_name
        if self._algorithm.kind != "adam":
            raise TypeError(f"{name}: grad_scale and params_out are Adam's (mixed precision); SGD takes neither")
        self._adopt_if_changed()
        outs = self._grad_list(params_out, "params_out") if params_out is not None else None
        # The hyper-parameters are checked by the native call; the mixed-precision keys here,
        # when they changed since the last step.
        settings = [
            (id(g), g.get("master_weights"), g.get("state_dtype"), g.get("stochastic_rounding"), self.max_grad_norm)
            for g in self.param_groups
        ]
        if settings != self._precision_checked:
            start = 0
            for g, (group, size) in enumerate(zip(self.param_groups, self._group_sizes)):
                self._check_precision(group, self._params[start : start + size], f"{name}: param_groups[{g}]")
                start += size
            self._precision_checked = settings
        group_of = self._group_of
        idx = [i for i, g in enumerate(grad_list) if g is not None]
        any_master = any(s[1] for s in settings)
        for i in idx if any_master or outs is not None else ():
            if self.param_groups[group_of[i]].get("master_weights"):
                grad = grad_list[i]
                if isinstance(grad, np.ndarray) and grad.dtype not in (self._params[i].dtype, _FLOAT16, _FLOAT32) and grad.dtype.name != "bfloat16":
                    raise TypeError(
                        f"{name}: the gradient of params[{i}] has dtype {grad.dtype}; a param with master weights "
                        f"({self._params[i].dtype}) takes bfloat16, float16 or float32 gradients"
                    )
            if outs is not None and outs[i] is not None and self.param_groups[group_of[i]].get("master_weights"):
                raise ValueError(
                    f"{name}: params_out[{i}] is given for a param with master_weights=True, whose own array already "
                    "receives the rounded fp32 master; pass None there"
                )
        created = Rollback()
        needs = [self._algorithm.needed_keys(group) for group in self.param_groups]
        marker = int(self._steps[idx[0]]) if idx else 0
        try:
            if needs != self._complete_for:
                self._create_state(grad_list, needs, created)
            for i in idx if any_master or any(m is not None for m in self._masters) else ():
                wants_master = self.param_groups[group_of[i]].get("master_weights")
                if wants_master and self._masters[i] is None:
                    created.add(functools.partial(self._masters.__setitem__, i, None))
                    self._masters[i] = self._params[i].astype(np.float32)  # exact widening
                elif not wants_master and self._masters[i] is not None:
                    # master_weights turned off: the param goes on from its own value, and a
                    # later master starts from it, not from a stale copy
                    created.add(functools.partial(self._masters.__setitem__, i, self._masters[i]))
                    self._masters[i] = None
            max_sqs = self._buffers["max_exp_avg_sq"]
            masters = [self._masters[i] for i in idx]
            params = [p if m is None else m for p, m in zip([self._params[i] for i in idx], masters)]
            if outs is None and not any_master:
                out_arrays: list[np.ndarray | None] = [None] * len(idx)
            else:
                out_arrays = [self._params[i] if m is not None else (outs[i] if outs is not None else None) for i, m in zip(idx, masters)]
            seeds = {i for i in idx if self.param_groups[group_of[i]].get("stochastic_rounding")} if any(s[3] for s in settings) else set()
            def native_step(labels: list[str] | None) -> float | None:
                return _core._adam_step_groups(name, *args, labels)  # type: ignore[arg-type, call-arg]

            args = [
                params,
                [grad_list[i] for i in idx],
                [self._buffers["exp_avg"][i] for i in idx],
                [self._buffers["exp_avg_sq"][i] for i in idx],
                [max_sqs[i] if self.param_groups[group_of[i]].get("amsgrad") else None for i in idx],
                out_arrays,
                self._steps,
                idx,
                [group_of[i] for i in idx],
                self.param_groups,
                grad_scale,
                self.max_grad_norm,
                [i if i in seeds else None for i in idx] if seeds else None,
            ]
            try:
                norm = native_step(None)
            except (TypeError, ValueError):
                # Again with the user's names for the tensors (nothing was written): the error
                # names params[i] of the optimizer, not the i-th tensor of this call.
                labels = [
                    (f"params[{i}]" if self._names[i] is None else f"params[{self._names[i]!r}]")
                    + ("" if m is None else f" ({self._params[i].dtype.name}, with float32 master weights)")
                    for i, m in zip(idx, masters)
                ]
                native_step(labels)
                raise
        except BaseException:
            if created and (not idx or int(self._steps[idx[0]]) == marker):  # the step did not happen
                created.run()
            self._complete_for = None
            raise
        skipped = norm is not None and not math.isfinite(norm)
        if skipped and created:
            created.run()  # a skipped step leaves no trace, as torch's GradScaler skipping step()
            self._complete_for = None
        self.last_step_skipped = skipped
        return norm

    @property
    def _group_of(self) -> list[int]:
        """The group of each param, by flat index."""
        if len(self._group_of_cache) != len(self._params):
            self._group_of_cache = [g for g, size in enumerate(self._group_sizes) for _ in range(size)]
        return self._group_of_cache

    _group_of_cache: list[int] = []

    def _adopt_if_changed(self) -> None:
        """As the plan's check: arrays replaced in ``param_groups`` start with fresh state."""
        flat = [p for group in self.param_groups for p in group.get("params", ())]
        if len(flat) != len(self._params) or any(a is not b for a, b in zip(flat, self._params)):
            self._adopt_param_groups()

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
        _core._check_params(arrays, name, self._takes_narrow)  # dtypes, layout, and no array given twice
        for i, (new, old) in enumerate(zip(arrays, self._params)):
            if new is not old:
                for key in self._state_keys:
                    self._buffers[key][i] = None
                self._masters[i] = None
                self._steps[i] = 0
        self._params = arrays
        self._narrow_params = any(a.itemsize == 2 for a in arrays)
        self._plan = None
        self._complete_for = None
        self._precision_checked = None

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
            for i, array in zip(indices, self._zeros_state(kind, indices, self.param_groups)):
                # C-level undos (Rollback), each registered before its change
                created.add(functools.partial(self._buffers[key].__setitem__, i, None))
                self._buffers[key][i] = array
                if not self._algorithm.counts_steps:
                    # SGD: count 0 tells the kernel the buffer is new (it becomes the gradient, as torch's clone)
                    created.add(functools.partial(self._steps.__setitem__, i, int(self._steps[i])))
                    self._steps[i] = 0
        self._complete_for = needs if complete else None

    def _zeros_state(self, kind: int, indices: list[int], groups: Sequence[Mapping[str, Any]]) -> list[Any]:
        """New zeroed buffers of state kind number ``kind`` for the params at ``indices``,
        of the state dtype their group in ``groups`` asks for."""
        group_of = [g for g, size in enumerate(self._group_sizes) for _ in range(size)]
        likes = [(self._params[i].shape, self._state_dtype(groups[group_of[i]], self._params[i])) for i in indices]
        return zeros_packed(likes, stagger=state_stagger(kind))

    # ----- state -------------------------------------------------------------------

    @property
    def state(self) -> dict[int, dict[str, Any]]:
        """Per-parameter state by flat parameter index (live arrays, not copies)."""
        out: dict[int, dict[str, Any]] = {}
        for i in range(len(self._params)):
            entry: dict[str, Any] = {k: self._buffers[k][i] for k in self._state_keys if self._buffers[k][i] is not None}
            if self._masters[i] is not None:
                entry["master_param"] = self._masters[i]
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
            if updated.get("state_dtype") is not None:  # a torch dtype from fastadam.torch: NumPy's
                updated["state_dtype"] = _state_dtype_of(updated["state_dtype"], name)
            check_group(self._algorithm, updated, name)
            new_groups.append(updated)
        group_of = [g for g, size in enumerate(self._group_sizes) for _ in range(size)]
        start = 0
        for group, size in zip(new_groups, self._group_sizes):
            self._check_precision(group, self._params[start : start + size], name)
            start += size
        new_masters: list[np.ndarray | None] = [None] * len(self._params)
        new_buffers: dict[str, list[Any]] = {k: [None] * len(self._params) for k in self._state_keys}
        new_steps = np.zeros(len(self._params), dtype=np.int64)
        for saved_index, entry in state_dict["state"].items():
            if int(saved_index) not in index_of:
                raise ValueError(f"{name}: state for unknown parameter index {saved_index}")
            i = index_of[int(saved_index)]
            param = self._params[i]
            entry = self._loaded_entry(entry, param, f"{name}: parameter {saved_index}")
            check_loaded_entry(self._algorithm, entry, new_groups[group_of[i]], f"{name}: parameter {saved_index}")
            for key, value in entry.items():
                if key == "step":
                    step = float(value)
                    if step < 0 or step != int(step):
                        raise ValueError(f"{name}: step of parameter {saved_index} must be a whole number >= 0, got {step}")
                    new_steps[i] = int(step)
                elif key == "master_param" and not new_groups[group_of[i]].get("master_weights"):
                    raise ValueError(
                        f"{name}: parameter {saved_index} has a master_param but its group has master_weights=False: "
                        "build the optimizer with master_weights=True to load it (or drop the entry)"
                    )
                elif key == "master_param":
                    master = np.array(_to_numpy(value), dtype=np.float32)  # a copy: the optimizer's own
                    if master.shape != param.shape:
                        raise ValueError(f"{name}: master_param of parameter {saved_index} has shape {master.shape}, the parameter {param.shape}")
                    new_masters[i] = master
                elif key in self._state_keys:
                    if value is None:  # torch's SGD saves momentum_buffer None without momentum
                        continue
                    if isinstance(value, QuantizedState):  # checked by _loaded_entry
                        new_buffers[key][i] = value
                        continue
                    loaded = np.asarray(_to_numpy(value), dtype=self._state_dtype(new_groups[group_of[i]], param))
                    if loaded.shape != param.shape:
                        raise ValueError(
                            f"{name}: {key} of parameter {saved_index} has shape {loaded.shape}, the parameter {param.shape}"
                        )
                    new_buffers[key][i] = loaded
                    if not self._algorithm.counts_steps:
                        new_steps[i] = 1  # a loaded momentum buffer is past its first step
                elif is_quantized_entry({key: value}) or key == "param_shape":
                    raise ValueError(
                        f"{name}: parameter {saved_index} has quantized states ({key}): load the state dict into "
                        "fastadam.AdamW8bit/AdamW4bit (the optimizer that saved it), or convert it with "
                        "fastadam.dequantize_state_dict(sd) first"
                    )
                else:
                    raise ValueError(f"{name}: unknown state entry {key!r} for parameter {saved_index}")
        for kind, key in enumerate(self._state_keys):  # copied into the optimizer's own blocks
            indices = [i for i, a in enumerate(new_buffers[key]) if a is not None]
            for i, array in zip(indices, self._zeros_state(kind, indices, new_groups)):
                loaded = new_buffers[key][i]
                if isinstance(array, QuantizedState):
                    array.codes.reshape(-1)[...] = loaded.codes.reshape(-1)
                    array.absmax[...] = loaded.absmax
                else:
                    array[...] = loaded
                new_buffers[key][i] = array
        self.param_groups[:] = new_groups
        self._precision_checked = None
        self._buffers = new_buffers
        self._masters = new_masters
        self._steps = new_steps
        self._complete_for = None
        self._plan = None

    def _loaded_entry(self, entry: Mapping[str, Any], param: np.ndarray, where: str) -> Mapping[str, Any]:
        """A loaded state entry in this optimizer's layout (the quantized optimizers convert it)."""
        return entry

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            lines.extend(f"    {k}: {group[k]}" for k in sorted(group) if k != "params")
        return "\n".join(lines) + "\n)"


def _state_dtype_of(value: object, where: str) -> np.dtype[Any] | None:
    """``state_dtype`` as a NumPy dtype (None: the default); TypeError when it is not one."""
    if value is None:
        return None
    if type(value).__module__ == "torch":  # a torch dtype, from a fastadam.torch state dict
        value = str(value).removeprefix("torch.")
        if value == "bfloat16":
            import ml_dtypes

            value = ml_dtypes.bfloat16
    try:
        dtype: np.dtype[Any] | None = np.dtype(value)  # type: ignore[call-overload]
    except TypeError:
        dtype = None
    if dtype is None or dtype.name not in ("float32", "float64", "bfloat16", "float16"):
        raise TypeError(
            f"{where}: state_dtype must be None, numpy.float32 or ml_dtypes.bfloat16 (float16 for float16 params, "
            f"float64 for float64 params), got {value!r}"
        )
    return dtype


class Adam(Optimizer):
    r"""Adam (Kingma & Ba, 2015) with torch.optim.Adam's interface and conventions.

    Per element, with step count :math:`t` (see :mod:`fastadam.reference` for the
    exact order of operations)::

        g = grad (+ weight_decay * p unless decoupled; -grad if maximize)
        m = beta1*m + (1-beta1)*g          v = beta2*v + (1-beta2)*g*g
        p = p - lr/(1-beta1**t) * m / (sqrt(v)/sqrt(1-beta2**t) + eps)

    ``lr`` is in parameter units per step; ``eps`` in gradient units.

    Args:
        params: a list of C-contiguous arrays (float32, float64, ``ml_dtypes.bfloat16`` or
            float16), a dict name -> array, or a list of param-group dicts
            (``{"params": [...], "lr": ...}``).
        lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay:
            as in ``torch.optim.Adam``.
        max_grad_norm: clip the global L2 norm of all gradients to this (torch's
            ``clip_grad_norm_`` coefficient, fused into the step); ``step()`` returns the norm.
        master_weights: (group key) bfloat16/float16 params keep a float32 copy in the state
            (``state[i]["master_param"]``); the step updates it and writes it, rounded, to the param.
        state_dtype: (group key) the dtype of ``exp_avg``/``exp_avg_sq``: None (float32 for
            float32 and narrower params, float64 for float64), or ``ml_dtypes.bfloat16``.
        stochastic_rounding: (group key) bfloat16 params without master weights are rounded
            stochastically (unbiased; deterministic in the param's index, step and element).

    ``step(grads, *, grad_scale=None, params_out=None)`` takes gradients in the params'
    structure (bfloat16/float16 gradients for float32 params too); arrays are updated in place.
    """

    _algorithm = ADAM
    _takes_narrow = True

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
        max_grad_norm: float | None = None,
        master_weights: bool = False,
        state_dtype: Any = None,
        stochastic_rounding: bool = False,
    ) -> None:
        name = f"{type(self).__name__}()"
        clip = check_max_grad_norm(max_grad_norm, name)
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,  # validated with the group
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay,
            master_weights=master_weights,
            state_dtype=_state_dtype_of(state_dtype, name),
            stochastic_rounding=stochastic_rounding,
        )
        self._max_grad_norm = clip
        super().__init__(params, defaults)
        self.max_grad_norm = self._max_grad_norm

    def _mixed(self, group: Mapping[str, Any]) -> bool:
        # (bf16/fp16 params: self._narrow_params; a dtype's .name costs microseconds, too much per param per step)
        return bool(group.get("master_weights") or group.get("stochastic_rounding")) or group.get("state_dtype") is not None

    def _state_dtype(self, group: Mapping[str, Any], param: np.ndarray) -> np.dtype[Any]:
        dtype = _state_dtype_of(group.get("state_dtype"), self._step_name)
        if dtype is not None:
            return dtype
        return param.dtype if param.dtype == np.float64 else np.dtype(np.float32)

    def _check_precision(self, group: Mapping[str, Any], arrays: Sequence[np.ndarray], where: str) -> None:
        state = _state_dtype_of(group.get("state_dtype"), where)
        clips = (getattr(self, "max_grad_norm", None) or getattr(self, "_max_grad_norm", None)) is not None
        check_mixed_precision(group, [p.dtype.name for p in arrays], None if state is None else state.name, clips, where)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019), as torch.optim.AdamW:
    ``p = p * (1 - lr*weight_decay)`` before the Adam update. Default ``weight_decay=1e-2``.
    Mixed-precision keywords as for :class:`Adam`."""

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
        max_grad_norm: float | None = None,
        master_weights: bool = False,
        state_dtype: Any = None,
        stochastic_rounding: bool = False,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize, decoupled_weight_decay=True,
            max_grad_norm=max_grad_norm, master_weights=master_weights, state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
        )


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


def check_min_size(value: object, keyword: str, where: str) -> int:
    """``min_8bit_size``/``min_4bit_size`` as an int >= 0; TypeError/ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{where}: {keyword} must be an int (elements), got {value!r}")
    if value < 0:
        raise ValueError(f"{where}: {keyword} must be >= 0 (elements), got {value}")
    return int(value)


def refuse_quantized_extras(amsgrad: object, state_dtype: object, bits: int, where: str) -> None:
    """The keywords of Adam that quantized states do not take: a ValueError naming why."""
    if amsgrad:
        raise ValueError(
            f"{where}: amsgrad=True is not available with {bits}-bit states (its max_exp_avg_sq has no quantized "
            "form); use fastadam.AdamW(amsgrad=True)"
        )
    if state_dtype is not None:
        raise ValueError(
            f"{where}: state_dtype={state_dtype!r} does not apply: the states of large params are {bits}-bit codes and "
            "those of small ones float32; use fastadam.AdamW(state_dtype=...) for bfloat16 states"
        )


class Adam8bit(Adam):
    r"""Adam with 8-bit blockwise-quantized states (Dettmers et al., "8-bit Optimizers via
    Block-wise Quantization", 2022): :class:`Adam`'s update, with ``exp_avg``/``exp_avg_sq``
    of each param of at least ``min_8bit_size`` elements kept as one uint8 code per element
    and one float32 absmax per block of 256 elements, about 2 bytes per element for both
    states against fp32 Adam's 8.

    Each step dequantizes a block (code value times absmax), runs the float32 update, and
    quantizes the new moments to the nearest code of the dynamic map over the block's new
    absmax (signed map for ``exp_avg``, unsigned for ``exp_avg_sq``; a value exactly halfway
    goes to the larger code), in one pass; the param update uses this step's float32
    moments. Same bits as :func:`fastadam.reference.adam_step_multi` with QuantizedState
    states, on every SIMD path and thread count (docs/design.md, "Quantized states").

    Params below ``min_8bit_size`` (default 4096, bitsandbytes' default and name) keep
    float32 states: on tiny tensors such as biases and norm weights the per-block absmax and
    the coarse codes cost the most (a 64-element bias pays a whole absmax, and its few
    values share one scale), while they are a negligible share of a model's memory.
    bitsandbytes and torchao do the same. ``min_8bit_size=0`` quantizes every param.

    ``opt.state[i]`` of a quantized param holds ``step``, ``exp_avg_codes`` (uint8, the
    param's shape), ``exp_avg_absmax`` (float32, one per block), ``exp_avg_sq_codes`` and
    ``exp_avg_sq_absmax`` (live arrays); ``state_dict()``/``load_state_dict()`` carry them.
    ``load_state_dict`` also takes a plain fp32 state dict (fastadam.Adam's or torch's; it
    quantizes the moments of large params) and turns a small param's quantized state into
    float32. :func:`fastadam.dequantize_state_dict` and :func:`fastadam.quantize_state_dict`
    convert between the two layouts.

    Args: as :class:`Adam` (``master_weights``, ``stochastic_rounding``, ``max_grad_norm``,
    ``grad_scale``/``params_out`` of ``step()`` work as there) except that ``amsgrad=True``
    and ``state_dtype`` raise ValueError, and float64 params of quantized size TypeError.
        min_8bit_size: params of fewer elements keep float32 states.
    """

    _bits: ClassVar[int] = 8
    _min_keyword: ClassVar[str] = "min_8bit_size"

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
        max_grad_norm: float | None = None,
        master_weights: bool = False,
        state_dtype: Any = None,
        stochastic_rounding: bool = False,
        min_8bit_size: int = 4096,
    ) -> None:
        self._init_quantized(params, lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay,
                             max_grad_norm, master_weights, state_dtype, stochastic_rounding, min_8bit_size)

    def _init_quantized(
        self, params: Params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float, amsgrad: bool,
        maximize: bool, decoupled_weight_decay: bool, max_grad_norm: float | None, master_weights: bool,
        state_dtype: Any, stochastic_rounding: bool, min_size: int,
    ) -> None:
        name = f"{type(self).__name__}()"
        refuse_quantized_extras(amsgrad, state_dtype, self._bits, name)
        self._min_size = check_min_size(min_size, self._min_keyword, name)  # before the groups are checked
        Adam.__init__(
            self, params, lr, betas, eps, weight_decay, False, maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay, max_grad_norm=max_grad_norm,
            master_weights=master_weights, stochastic_rounding=stochastic_rounding,
        )

    @property
    def bits(self) -> int:
        """Bits per code of the quantized states (8 or 4)."""
        return self._bits

    @property
    def min_size(self) -> int:
        """Params of fewer elements keep float32 states (``min_8bit_size``/``min_4bit_size``)."""
        return self._min_size

    def _quantizes(self, param: np.ndarray) -> bool:
        return bool(param.size >= self._min_size)

    def _mixed(self, group: Mapping[str, Any]) -> bool:
        return True  # quantized states take the mixed path (_core._adam_step_groups), not the plan

    def _state_dtype(self, group: Mapping[str, Any], param: np.ndarray) -> np.dtype[Any]:
        # small params: float32 (float64 for float64 ones, as fastadam.Adam)
        return param.dtype if param.dtype == np.float64 else np.dtype(np.float32)

    def _check_precision(self, group: Mapping[str, Any], arrays: Sequence[np.ndarray], where: str) -> None:
        refuse_quantized_extras(group.get("amsgrad"), group.get("state_dtype"), self._bits, where)
        super()._check_precision(group, arrays, where)
        for j, a in enumerate(arrays):
            if a.dtype == np.float64 and self._quantizes(a):
                raise TypeError(
                    f"{where}: params[{j}] is float64 with {a.size} elements; {self._bits}-bit states are for float32, "
                    f"bfloat16 and float16 params: keep float64 params in fastadam.Adam/AdamW (or raise "
                    f"{self._min_keyword} above their size)"
                )

    def _mixed_step(
        self, grad_list: Sequence[np.ndarray | None], grad_scale: float | None, params_out: Grads | None
    ) -> float | None:
        for g, group in enumerate(self.param_groups):
            if group.get("amsgrad"):  # (set between steps: the settings check below does not look at it)
                refuse_quantized_extras(True, None, self._bits, f"{self._step_name}: param_groups[{g}]")
        return super()._mixed_step(grad_list, grad_scale, params_out)

    def _zeros_state(self, kind: int, indices: list[int], groups: Sequence[Mapping[str, Any]]) -> list[Any]:
        """New zeroed states of kind ``kind`` (0: exp_avg, 1: exp_avg_sq) for the params at
        ``indices``: a QuantizedState (codes and absmax) for each param of quantized size,
        a float32 array for the others, all in one block per kind (the 4K-aliasing placement)."""
        group_of = self._group_of
        likes: list[tuple[tuple[int, ...], np.dtype[Any]]] = []
        for i in indices:
            p = self._params[i]
            if self._quantizes(p):
                n = int(p.size)
                likes.append((p.shape if self._bits == 8 else ((n + 1) // 2,), np.dtype(np.uint8)))
                likes.append(((-(-n // QUANT_BLOCK[self._bits]),), np.dtype(np.float32)))
            else:
                likes.append((p.shape, self._state_dtype(groups[group_of[i]], p)))
        arrays = iter(zeros_packed(likes, stagger=state_stagger(kind)))
        out: list[Any] = []
        for i in indices:
            first = next(arrays)
            out.append(QuantizedState(first, next(arrays), self._bits, kind == 0) if self._quantizes(self._params[i]) else first)
        return out

    @property
    def state(self) -> dict[int, dict[str, Any]]:
        """Per-parameter state by flat parameter index (live arrays): ``step``, then for a
        quantized param ``exp_avg_codes``, ``exp_avg_absmax``, ``exp_avg_sq_codes``,
        ``exp_avg_sq_absmax`` (4-bit: and ``param_shape``), for a small one ``exp_avg``,
        ``exp_avg_sq``; ``master_param`` with master weights."""
        out = super().state
        for i, entry in out.items():
            if not any(isinstance(v, QuantizedState) for v in entry.values()):
                continue
            expanded: dict[str, Any] = {}
            for key, value in entry.items():
                if isinstance(value, QuantizedState):
                    expanded[f"{key}_codes"] = value.codes
                    expanded[f"{key}_absmax"] = value.absmax
                else:
                    expanded[key] = value
            if self._bits == 4:
                expanded["param_shape"] = tuple(self._params[i].shape)
            out[i] = expanded
        return out

    def _loaded_entry(self, entry: Mapping[str, Any], param: np.ndarray, where: str) -> Mapping[str, Any]:
        """The entry in this optimizer's layout: quantized states (checked; QuantizedState
        views under ``exp_avg``/``exp_avg_sq``, copied into the optimizer's blocks by the
        caller) for a param of quantized size, float32 ``exp_avg``/``exp_avg_sq`` otherwise."""
        want = self._bits if self._quantizes(param) else None
        quantized = is_quantized_entry(entry) or entry.get("param_shape") is not None
        if quantized:
            _, _, _ = read_quantized_entry(entry, where, tuple(param.shape))
            bits = 4 if entry.get("param_shape") is not None else 8
            if bits != self._bits:
                raise ValueError(
                    f"{where}: the state is {bits}-bit and {type(self).__name__} keeps {self._bits}-bit states: convert "
                    "the state dict with fastadam.dequantize_state_dict(sd) first (float32 states, which it quantizes)"
                )
        elif want is None:
            return entry
        converted = convert_entry(entry, want, where, tuple(param.shape))
        if want is None:
            return converted
        m, v, _ = read_quantized_entry(converted, where, tuple(param.shape))
        out = {k: val for k, val in converted.items() if not (k.startswith("exp_avg") or k == "param_shape")}
        out["exp_avg"], out["exp_avg_sq"] = m, v
        return out


class AdamW8bit(Adam8bit):
    """:class:`Adam8bit` with decoupled weight decay, as :class:`AdamW` (``p = p * (1 -
    lr*weight_decay)`` before the update; default ``weight_decay=1e-2``): bitsandbytes' and
    torchao's ``AdamW8bit``."""

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
        max_grad_norm: float | None = None,
        master_weights: bool = False,
        state_dtype: Any = None,
        stochastic_rounding: bool = False,
        min_8bit_size: int = 4096,
    ) -> None:
        self._init_quantized(params, lr, betas, eps, weight_decay, amsgrad, maximize, True, max_grad_norm,
                             master_weights, state_dtype, stochastic_rounding, min_8bit_size)


class Adam4bit(Adam8bit):
    """:class:`Adam8bit` with 4-bit states: two codes a byte (the even element in the high
    nibble, torchao's packing) and one float32 absmax per block of 128 elements, about 1.06
    bytes per element for both states. ``exp_avg`` takes the 4-bit dynamic map (3 exponent
    bits), ``exp_avg_sq`` torchao's linear map ``k/16``, k = 1..16 (no zero). Params below
    ``min_4bit_size`` (default 4096) keep float32 states. ``state[i]`` of a quantized param
    also holds ``param_shape`` (flat codes do not give it)."""

    _bits: ClassVar[int] = 4
    _min_keyword: ClassVar[str] = "min_4bit_size"

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
        max_grad_norm: float | None = None,
        master_weights: bool = False,
        state_dtype: Any = None,
        stochastic_rounding: bool = False,
        min_4bit_size: int = 4096,
    ) -> None:
        self._init_quantized(params, lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay,
                             max_grad_norm, master_weights, state_dtype, stochastic_rounding, min_4bit_size)


class AdamW4bit(Adam4bit):
    """:class:`Adam4bit` with decoupled weight decay (default ``weight_decay=1e-2``): torchao's ``AdamW4bit``."""

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
        max_grad_norm: float | None = None,
        master_weights: bool = False,
        state_dtype: Any = None,
        stochastic_rounding: bool = False,
        min_4bit_size: int = 4096,
    ) -> None:
        self._init_quantized(params, lr, betas, eps, weight_decay, amsgrad, maximize, True, max_grad_norm,
                             master_weights, state_dtype, stochastic_rounding, min_4bit_size)
