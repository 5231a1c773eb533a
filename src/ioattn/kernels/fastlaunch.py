"""Kernel launches with less host time than ``kernel[grid](...)``.

Triton's launch path (``JITFunction.run``) binds the arguments, specialises each one, builds a cache key
(a string of the options among it) and then calls the compiled kernel's launcher; Gluon kernels also take
host ``TensorDescriptor`` objects, whose construction validates every field and whose specialisation prints
their shared-memory layout. On an H200's host that is ~40 us of a forward call's ~100 (``scripts/host_time.py
--pieces``).

``Launcher`` keeps, per kernel, the compiled kernels it has launched, keyed by exactly what Triton
specialises on: each argument's specialisation (Triton's own ``native_specialize_impl`` for ints and
tensors; dtype, block shape and layout for a descriptor), the constexpr keyword arguments and the current
device. A key seen before calls the compiled kernel's C launch function itself, skipping the Python of
Triton's ``CudaLauncher`` and of its descriptor wrapper (the descriptors are expanded here as it would);
a new key goes through ``kernel[grid]`` once (which compiles or finds the kernel) and records it. Descriptors
are ``TmaDesc`` tuples: the fields Triton's launcher reads, plus the block shape and layout that a real
descriptor is made from on a miss.

The direct launch is used only where it applies: compiled Triton (not the interpreter), no launch hooks
registered (profilers get Triton's own path and its launch metadata), and ``IOATTN_FAST_LAUNCH`` not 0 when
ioattn is imported.
"""

from __future__ import annotations

import os
from itertools import repeat
from typing import Any, NamedTuple

import torch
from triton import knobs

try:  # Triton's own specialisation of one argument (C++), the function its binder calls
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import JITFunction
except ImportError:  # pragma: no cover - another Triton layout: every launch takes kernel[grid]
    native_specialize_impl = None
    JITFunction = None


class TmaDesc(NamedTuple):
    """A host tensor descriptor as Triton's launcher reads it (``base``, ``shape``, ``strides``,
    ``padding``), with the ``block_shape`` and shared-memory ``layout`` of the descriptor it stands for.
    ``layout`` None: a ``tl`` kernel's descriptor (``triton.tools.tensor_descriptor``)."""

    base: torch.Tensor
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    block_shape: tuple[int, ...]
    layout: Any = None
    padding: str = "zero"

    def real(self):
        """The Triton descriptor object this stands for (what ``kernel[grid]`` takes)."""
        if self.layout is None:
            from triton.tools.tensor_descriptor import TensorDescriptor

            return TensorDescriptor(self.base, list(self.shape), list(self.strides), list(self.block_shape),
                                    padding=self.padding)
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

        return TensorDescriptor(self.base, list(self.shape), list(self.strides), list(self.block_shape),
                                self.layout, padding=self.padding)


# Read once, at import: ``IOATTN_FAST_LAUNCH=0`` sends every launch through Triton's own path.
_ENABLED = os.environ.get("IOATTN_FAST_LAUNCH", "1").strip() != "0"


class PlanTable:
    """Launch plans by key: the dense forward's (``attn_fwd_gluon``), the backward's (``launch``), the
    decode's and the paged varlen call's (``ops.decode``). The op makes a
    call's key once and hands it to the planned function and, on a miss, to the whole path, which records the
    plan. A key is made only for shapes seen before (``sighted``, on a cheap part of the key: a dict lookup of
    the inputs' shapes), so shapes that keep changing pay no key and no recording; a shape's first call takes
    the whole path, its second records, its third and later launch the plan. Each map is cleared when full.
    ``enabled`` is read from ``env`` at import (``0``: no keys, no plans); ``set_plans`` switches every
    table."""

    def __init__(self, env: str, size: int = 1024):
        self.enabled = os.environ.get(env, "1").strip() != "0"
        self.size = size
        self.plans: dict[tuple, Any] = {}
        self._shapes: dict[tuple, None] = {}
        _TABLES.append(self)

    def active(self) -> bool:
        """Whether calls make keys: plans on and the direct launch (which plans replay) on."""
        return self.enabled and _ENABLED

    def sighted(self, shapes: tuple) -> bool:
        """Whether a call with these shapes came before (its key is worth making); marks them seen."""
        if shapes in self._shapes:
            return True
        if len(self._shapes) >= self.size:
            self._shapes.clear()
        self._shapes[shapes] = None
        return False

    def get(self, key: tuple) -> Any:
        return self.plans.get(key)

    def ready(self, key: tuple | None, tensors: tuple) -> Any:
        """The plan under ``key`` if it can launch now, else None: one was recorded, ``tensors`` (every pointer
        the plan passes that the call brings) are 16-byte aligned, as Triton specialised them, and every launch
        it replays (``plan.launches``, as ``recorded`` returns them) takes the direct path (no launch hooks)."""
        plan = None if key is None else self.plans.get(key)
        if plan is None or not aligned(*tensors) or not replayable(plan.launches):
            return None
        return plan

    def keep(self, key: tuple | None, tensors: tuple, made, plan) -> None:
        """Records a plan under ``key`` (None: none) from the launches a whole path just made (``made``, as
        ``recorded`` takes them) where ``tensors`` are 16-byte aligned, so the compiled entries are the ones
        aligned calls take, and every launcher found its compiled kernel; ``plan`` makes the plan from the
        recorded launches."""
        if key is None or not aligned(*tensors):
            return
        launches = recorded(made)
        if launches is not None:
            self.put(key, plan(launches))

    def put(self, key: tuple, plan: Any) -> None:
        if key not in self.plans and len(self.plans) >= self.size:
            self.plans.clear()
        self.plans[key] = plan

    def clear(self) -> None:
        self.plans.clear()
        self._shapes.clear()

    def __len__(self) -> int:
        return len(self.plans)


_TABLES: list[PlanTable] = []


def set_plans(enabled: bool) -> None:
    """Turns launch plans on or off in every table, and drops what they hold (scripts that patch rules a
    plan's key does not see, such as ``common.L2_SECTION_BYTES``, turn them off)."""
    for table in _TABLES:
        table.enabled = enabled
        table.clear()


def clear_plans() -> None:
    """Drops every recorded plan and seen shape (tests start from none)."""
    for table in _TABLES:
        table.clear()


def aligned(*tensors) -> bool:
    """Every given tensor's data 16-byte aligned (None: absent), as Triton specialises pointers and TMA needs:
    a plan replays only for calls whose tensors are aligned as the recorded call's."""
    ptrs = 0
    for t in tensors:
        if t is not None:
            ptrs |= t.data_ptr()
    return ptrs % 16 == 0


def recorded(launches) -> tuple | None:
    """A plan's launches, ((launcher, compiled entry, grid, builder), ...), from launches just made as
    ((launcher, grid, constexprs, builder, arguments), ...); None where a launcher found no compiled kernel to
    replay (its launch went through Triton's own path)."""
    out = []
    for launcher, grid, constexprs, build, args in launches:
        entry = launcher.entry(args, constexprs)
        if entry is None:
            return None
        out.append((launcher, entry, grid, build))
    return tuple(out)


def replayable(launches) -> bool:
    """Whether a plan's launches (``recorded``) can be replayed now: every launcher on the direct path."""
    return all(launcher.direct_ok() for launcher, _, _, _ in launches)


class Recording:
    """What a whole path launched and allocated, for a plan to replay: ``launches`` as ``recorded`` takes them
    ((launcher, grid, constexprs, builder, arguments), in launch order) and ``buffers`` the plan makes a call
    (name: shapes or a length, as the recording function writes them)."""

    def __init__(self):
        self.launches: list[tuple] = []
        self.buffers: dict[str, Any] = {}

    def add(self, launcher, grid, constexprs, build, args) -> None:
        self.launches.append((launcher, grid, constexprs, build, args))


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host code (``triton.cdiv`` is a constexpr function: microseconds a host call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), for host code, like ``triton.next_power_of_2``."""
    return 1 << (n - 1).bit_length()


def arg_specs(args) -> tuple:
    """What Triton's binder specialises each argument on (its compile-time identity): Triton's own
    function for everything but our descriptors, whose dtype, block shape and layout make their type.
    Leading descriptors are keyed apart and the rest go through one ``map`` (no Python frame an argument)."""
    n = 0
    while n < len(args) and type(args[n]) is TmaDesc:
        n += 1
    head = tuple([_desc_key(a) for a in args[:n]])
    try:
        return head, tuple(map(native_specialize_impl, repeat(BaseBackend), args[n:], repeat(False), repeat(True),
                               repeat(True)))
    except TypeError:  # a descriptor after other arguments
        spec = native_specialize_impl
        return tuple([_desc_key(a) if type(a) is TmaDesc else spec(BaseBackend, a, False, True, True) for a in args])


def _desc_key(d: TmaDesc) -> tuple:
    """What makes a descriptor's type for Triton: dtype, block shape, layout (by identity), padding."""
    return d.base.dtype, d.block_shape, id(d.layout), d.padding


class Launcher:
    """``Launcher(kernel)(grid, *args, **constexprs)`` launches like ``kernel[grid](*args, **constexprs)``,
    with ``TmaDesc`` in place of descriptor objects. ``args`` are the kernel's leading parameters (every
    non-constexpr one, in order); ``constexprs`` the rest, by name, as the kernel call would take them."""

    def __init__(self, kernel):
        self.kernel = kernel
        # key -> (compiled kernel, constexpr tail, layouts held, ``_direct_launch``'s answer)
        self.compiled: dict[tuple, tuple[Any, tuple, tuple, tuple | None]] = {}
        self.direct = JITFunction is not None and isinstance(kernel, JITFunction)

    def __call__(self, grid, *args, **constexprs):
        if self.direct_ok():
            return self._direct(grid, args, constexprs)
        return self.kernel[grid](*_real(args), **constexprs)

    def direct_ok(self) -> bool:
        """Whether a launch now takes the direct path: compiled Triton, the fast launch on, no launch hooks."""
        if not (self.direct and _ENABLED and not self.kernel.pre_run_hooks):
            return False
        hooks = knobs.runtime
        return not (_hook_active(hooks.launch_enter_hook) or _hook_active(hooks.launch_exit_hook))

    def entry(self, args, constexprs) -> tuple | None:
        """The recorded compiled kernel these arguments launch (None before their key's first launch, or where
        it is launched through Triton's path). Calls that specialise like these, on the device current now,
        can launch it with ``launch_entry`` and skip the key."""
        return self.compiled.get(_launch_key(args, constexprs)) if self.direct_ok() else None

    def launch_entry(self, entry: tuple, grid, args) -> None:
        """Launches ``entry`` (from ``entry``) with ``args``: call only where ``direct_ok`` holds and the
        arguments specialise as the ones the entry was found for (Triton's specialisation of each, the device)."""
        self._run(entry, torch.cuda.current_device(), grid, args)

    def _direct(self, grid, args, constexprs):
        device = torch.cuda.current_device()
        key = _launch_key(args, constexprs, device)
        entry = self.compiled.get(key)
        if entry is None:
            return self._miss(key, grid, args, constexprs)
        return self._run(entry, device, grid, args)

    @staticmethod
    def _run(entry: tuple, device: int, grid, args):
        kernel, tail, _layouts, launch = entry
        stream = raw_stream(device)
        gx, gy, gz = grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1
        if launch is None:
            hooks = knobs.runtime
            kernel.run(gx, gy, gz, stream, kernel.function, kernel.packed_metadata, None, hooks.launch_enter_hook,
                       hooks.launch_exit_hook, *args, *tail)
            return kernel
        _call_direct(launch, gx, gy, gz, stream, args, tail)
        return kernel

    def _miss(self, key, grid, args, constexprs):
        real = _real(args)
        kernel = self.kernel[grid](*real, **constexprs)
        if hasattr(kernel, "result"):  # an asynchronous compile's future
            kernel = kernel.result()
        # Only constexprs and compile options by keyword: a runtime argument there would be keyed by value.
        params = {p.name: p for p in self.kernel.params}
        if any(name in params and not params[name].is_constexpr for name in constexprs):
            return kernel
        # The compiled launcher takes every parameter in order, constexprs included: bind once to find the
        # constexprs' values (defaults too) after the leading arguments.
        binder = self.kernel.device_caches[key[0]][4]
        bound, _spec, _options = binder(*real, **constexprs)
        values = tuple(bound.values())
        head = values[:len(real)]
        if len(head) == len(real) and all(v is r for v, r in zip(head, real, strict=True)):
            # The layouts are keyed by id(): the entry holds them, so no other object can take their ids.
            layouts = tuple(a.layout for a in args if type(a) is TmaDesc)
            self.compiled[key] = (kernel, values[len(real):], layouts, _direct_launch(kernel, args))
        return kernel


def runtime_key(device: int | None = None) -> tuple:
    """The head of every launch and plan key: the device (the current one by default) and Triton's debug and
    instrumentation knobs, which its compile options take (JITFunction.run)."""
    if device is None:
        device = torch.cuda.current_device()
    return device, knobs.runtime.debug, knobs.compilation.instrumentation_mode


def _launch_key(args, constexprs, device: int | None = None) -> tuple:
    """What ``Launcher`` keys its compiled kernels by: ``runtime_key``, the constexprs and each argument's
    specialisation."""
    return (*runtime_key(device), tuple(constexprs.items()), arg_specs(args))


def _call_direct(launch: tuple, gx: int, gy: int, gz: int, stream: int, args, tail) -> None:
    """Triton's C launch function (``_direct_launch``'s answer) with the descriptors expanded as its wrapper
    would; no hooks (the direct path runs only where none is active)."""
    c_launch, head, descs = launch
    if descs:
        args = list(args)
        for i, meta in descs:
            args[i:i + 1] = _expand(args[i], meta)
    c_launch(gx, gy, gz, stream, *head, *args, *tail)


def _direct_launch(kernel, args) -> tuple | None:
    """(C launch function, its leading arguments after the grid and stream, [(position, descriptor metadata)],
    in descending position) for Triton's NVIDIA launcher (``CudaLauncher``): its compiled ``launch`` and, where
    the kernel takes descriptors, the metadata its ``wrap_handle_tensordesc`` wrapper expands them with.
    None where the launcher is another (the kernel then goes through ``kernel.run``), or needs scratch memory
    allocated a launch."""
    try:
        from triton.backends.nvidia import driver as nvidia

        run = kernel.run
        # The argument layout below is Triton 3.6's NVIDIA launcher's (other launchers keep kernel.run).
        if not isinstance(run, nvidia.CudaLauncher) or nvidia._BASE_ARGS_FORMAT != "iiiKKppOOOOOO":
            return None
        if run.global_scratch_size or run.profile_scratch_size:
            return None
        launch = run.launch
        positions = [i for i, a in enumerate(args) if type(a) is TmaDesc]
        metas: list = []
        if getattr(launch, "__name__", "") == "inner" and launch.__closure__:
            cells = dict(zip(launch.__code__.co_freevars, (c.cell_contents for c in launch.__closure__),
                             strict=True))
            if sorted(cells["tensordesc_indices"]) != positions:
                return None
            metas = list(cells["tensordesc_meta"])
            launch = cells["launcher"]
        elif positions:
            return None
        if not callable(launch) or any(m is not None and m.get("fp4_padded") for m in metas):
            return None
        host_dtype = nvidia.TMA_DTYPE_DEVICE_TO_HOST
        descs = [(i, None if m is None else (m["swizzle"], m["elem_size"], host_dtype[m["elem_type"]],
                                             m["block_size"])) for i, m in zip(positions, metas, strict=True)]
        head = (kernel.function, run.launch_cooperative_grid, run.launch_pdl, None, None, kernel.packed_metadata,
                None, None, None)
    except (AttributeError, ImportError, KeyError, TypeError, ValueError):
        return None
    return launch, head, descs[::-1]


def _expand(d: TmaDesc, meta) -> list:
    """A descriptor as Triton's launcher takes it (``driver.make_tensordesc_arg``): the CUtensorMap made for
    its base, then its shape and strides; or, for a kernel that lowered it to pointers (no metadata), the base,
    shape, strides, the NaN-padding flag, shape and strides again."""
    if meta is None:
        return [d.base, *d.shape, *d.strides, d.padding == "nan", *d.shape, *d.strides]
    swizzle, elem_size, elem_type, block = meta
    tensor_map = _fill_tma(d.base.data_ptr(), swizzle, elem_size, elem_type, block, d.shape, d.strides,
                           1 if d.padding == "nan" else 0)
    return [tensor_map, *d.shape, *d.strides]


def _fill_tma(*args):
    from triton.runtime import driver

    global _fill_tma
    _fill_tma = driver.active.utils.fill_tma_descriptor
    return _fill_tma(*args)


def _real(args) -> list:
    """The arguments as ``kernel[grid]`` takes them: each ``TmaDesc`` as the descriptor it stands for."""
    return [a.real() if type(a) is TmaDesc else a for a in args]


def _hook_active(hook) -> bool:
    """Whether a launch hook would do something (Triton 3.6 keeps a chain of them, empty by default)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def raw_stream(device: int) -> int:
    """The current stream's handle, as Triton's launch path reads it."""
    return torch._C._cuda_getCurrentRawStream(device)
