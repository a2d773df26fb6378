"""Runs Gluon kernels on CPU tensors, one program after the other, so their values can be tested without a
GPU (Triton's interpreter runs Triton kernels but not Gluon ones).

What it checks: the kernel's arithmetic as written (index math, int32 wrap-around, bit tricks, joins and
reshapes, masks, MMAs as fp32 matmuls of the 16-bit operands), every load and store inside its tensor's
storage (an out-of-bounds access raises :class:`EmulationError` instead of reading garbage), and the ordering
rules of the asynchronous operations, taken at their worst:

* a ``warpgroup_mma(..., is_async=True)`` reads its shared-memory operands until a ``warpgroup_mma_wait``
  retires it: writing them before then, or using its accumulator other than as the next MMA's, raises;
* a ``cp.async`` copy lands only at the ``wait_group`` that covers its committed group: reading or writing
  its destination before then raises;
* a generic-proxy write to shared memory (``store``, ``allocate_shared_memory(..., value)``) must be
  followed by ``fence_async_shared()`` before a wgmma reads it;
* ``gl.warp_specialize`` runs its partitions as threads that take turns, switching only where one blocks
  on an mbarrier (deterministic); a wait no arrive can satisfy raises (a deadlock).

What it does not check: layouts (a kernel that does not compile still does not; ``compile_report.py``
compiles them for sm_90), the hardware's cos/sin approximations (exact ones here), races between the warps
of one partition (each partition runs as one sequential thread; Triton inserts the CTA barriers).

Use: ``emulated(kernel)[grid](*args, **constexprs)`` with CPU tensors, as one launches the kernel. Gluon (and
Triton) functions the kernel calls are emulated as they are reached through its module's globals.
"""

from __future__ import annotations

import functools
import threading
import types
from types import SimpleNamespace

import torch

from triton.experimental.gluon import language as real_gl
from triton.experimental.gluon.language.extra import libdevice as real_libdevice
from triton.experimental.gluon.language.nvidia.ampere import async_copy as real_async_copy
from triton.experimental.gluon.language.nvidia import hopper as real_hopper
from triton.experimental.gluon.language.nvidia.hopper import mbarrier as real_mbarrier
import triton.language as real_tl


class EmulationError(RuntimeError):
    """What the kernel did that it must not: an access out of bounds, a race with an asynchronous
    operation, a deadlock."""


# --------------------------------------------------------------------------------------------------
# values
# --------------------------------------------------------------------------------------------------

_INT32 = (-2 ** 31, 2 ** 31 - 1)


def _scalar_tensor(value) -> torch.Tensor:
    """A Python scalar as Triton types it: int32 where it fits, else int64; floats fp32; bools int1."""
    if isinstance(value, bool):
        return torch.tensor(value)
    if isinstance(value, int):
        return torch.tensor(value, dtype=torch.int32 if _INT32[0] <= value <= _INT32[1] else torch.int64)
    return torch.tensor(value, dtype=torch.float32)


def _raw(x):
    """The torch tensor (or Python scalar) behind an operand."""
    if isinstance(x, Tensor):
        return x.t
    if isinstance(x, _InFlight):
        x.fail_if_used()
    return x


class _Type:
    layout = None  # layouts are not emulated


class Tensor:
    """A Gluon/Triton register tensor (or scalar): a torch tensor with Triton's integer semantics (division
    and remainder truncate, shifts and products wrap at the type's width)."""

    __slots__ = ("t",)
    type = _Type()

    def __init__(self, t: torch.Tensor):
        self.t = t

    # -- conversions
    @property
    def dtype(self):
        return self.t.dtype

    @property
    def shape(self):
        return list(self.t.shape)

    def to(self, dtype, bitcast=False, **_):
        if bitcast:
            return Tensor(self.t.view(dtype))
        return Tensor(self.t.to(dtype))

    def __bool__(self):
        return bool(self.t)

    def __index__(self):
        return int(self.t)

    def __int__(self):
        return int(self.t)

    def __getitem__(self, idx):
        return Tensor(self.t[idx])

    def __repr__(self):
        return f"emulated {self.t!r}"

    # -- arithmetic
    def _binary(self, other, op, reflected=False):
        a, b = _operands(self, other)
        return Tensor(op(b, a) if reflected else op(a, b))

    def __add__(self, o): return self._binary(o, _wrapping(torch.add))
    def __radd__(self, o): return self._binary(o, _wrapping(torch.add), True)
    def __sub__(self, o): return self._binary(o, _wrapping(torch.sub))
    def __rsub__(self, o): return self._binary(o, _wrapping(torch.sub), True)
    def __mul__(self, o): return self._binary(o, _wrapping(torch.mul))
    def __rmul__(self, o): return self._binary(o, _wrapping(torch.mul), True)
    def __truediv__(self, o): return self._binary(o, _true_div)
    def __rtruediv__(self, o): return self._binary(o, _true_div, True)
    def __floordiv__(self, o): return self._binary(o, _trunc_div)
    def __rfloordiv__(self, o): return self._binary(o, _trunc_div, True)
    def __mod__(self, o): return self._binary(o, torch.fmod)
    def __rmod__(self, o): return self._binary(o, torch.fmod, True)
    def __and__(self, o): return self._binary(o, torch.bitwise_and)
    def __rand__(self, o): return self._binary(o, torch.bitwise_and, True)
    def __or__(self, o): return self._binary(o, torch.bitwise_or)
    def __ror__(self, o): return self._binary(o, torch.bitwise_or, True)
    def __xor__(self, o): return self._binary(o, torch.bitwise_xor)
    def __rxor__(self, o): return self._binary(o, torch.bitwise_xor, True)
    def __lshift__(self, o): return self._binary(o, _wrapping(torch.bitwise_left_shift))
    def __rlshift__(self, o): return self._binary(o, _wrapping(torch.bitwise_left_shift), True)
    def __rshift__(self, o): return self._binary(o, torch.bitwise_right_shift)
    def __rrshift__(self, o): return self._binary(o, torch.bitwise_right_shift, True)
    def __lt__(self, o): return self._binary(o, torch.lt)
    def __le__(self, o): return self._binary(o, torch.le)
    def __gt__(self, o): return self._binary(o, torch.gt)
    def __ge__(self, o): return self._binary(o, torch.ge)
    def __eq__(self, o): return self._binary(o, torch.eq)
    def __ne__(self, o): return self._binary(o, torch.ne)
    def __neg__(self): return Tensor(-self.t)
    def __invert__(self): return Tensor(~self.t)
    __hash__ = None


def _bits(dtype: torch.dtype) -> int:
    return 1 if dtype == torch.bool else torch.empty(0, dtype=dtype).element_size() * 8


def _promote(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """Triton's result type of a binary op on two tensors (0-d ones included, unlike torch's rule)."""
    if a == b:
        return a
    if a.is_floating_point and b.is_floating_point:
        if torch.float64 in (a, b):
            return torch.float64
        return torch.float32  # fp32 with anything narrower, and bf16 with fp16
    if a.is_floating_point or b.is_floating_point:  # an integer tensor with a float one: fp32 (or fp64)
        return torch.float64 if torch.float64 in (a, b) else torch.float32
    if torch.bool in (a, b):
        other = b if a == torch.bool else a
        return other
    if _bits(a) != _bits(b):
        return a if _bits(a) > _bits(b) else b
    return a if not a.is_signed else b  # same width: unsigned wins, as in C


def _operands(x: "Tensor", other):
    """Both operands as torch tensors of the result type. A Python scalar takes the tensor's type where its
    kind matches and the value fits (ints), as a Triton constant does."""
    a = x.t
    if isinstance(other, (Tensor, _InFlight)):
        b = _raw(other)
    elif isinstance(other, bool):
        b = torch.tensor(other)
    elif isinstance(other, int):
        if a.dtype.is_floating_point:
            b = torch.tensor(other, dtype=a.dtype)
        elif a.dtype != torch.bool and torch.iinfo(a.dtype).min <= other <= torch.iinfo(a.dtype).max:
            b = torch.tensor(other, dtype=a.dtype)
        else:
            b = _scalar_tensor(other)
    elif isinstance(other, float):
        b = torch.tensor(other, dtype=a.dtype if a.dtype.is_floating_point else torch.float32)
    else:
        raise EmulationError(f"an operand of type {type(other).__name__}")
    dtype = _promote(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


def _wrapping(op):
    """``op`` on integers computed in int64 and cast back: wraps at the type's width like the GPU."""
    def apply(a, b):
        if a.dtype.is_floating_point or a.dtype == torch.bool:
            return op(a, b)
        return op(a.to(torch.int64), b.to(torch.int64)).to(a.dtype)
    return apply


def _true_div(a, b):
    if not a.dtype.is_floating_point:
        a, b = a.float(), b.float()
    return a / b


def _trunc_div(a, b):
    """Triton's ``//``: C division (toward zero) on integers."""
    if a.dtype.is_floating_point:
        return torch.floor(a / b)
    return torch.div(a, b, rounding_mode="trunc")


def _t(x) -> torch.Tensor:
    """An operand as a torch tensor."""
    x = _raw(x)
    return x if isinstance(x, torch.Tensor) else _scalar_tensor(x)


class PointerType:
    def __init__(self, element_ty):
        self.element_ty = element_ty


class Pointer:
    """A pointer (or a tensor of pointers): the tensor's storage, and element offsets into it."""

    def __init__(self, storage: torch.UntypedStorage, element_ty: torch.dtype, offsets: torch.Tensor, name: str):
        self.storage, self.element_ty, self.offsets, self.name = storage, element_ty, offsets, name

    @classmethod
    def of(cls, tensor: torch.Tensor, name: str) -> "Pointer":
        return cls(tensor.untyped_storage(), tensor.dtype, torch.tensor(tensor.storage_offset(), dtype=torch.int64),
                   name)

    @property
    def dtype(self):
        return PointerType(self.element_ty)

    @property
    def shape(self):
        return list(self.offsets.shape)

    def __add__(self, other):
        return Pointer(self.storage, self.element_ty, self.offsets + _t(other).to(torch.int64), self.name)

    __radd__ = __add__

    def to(self, ptr_type, bitcast=False, **_):
        new = ptr_type.element_ty
        old_size, new_size = _itemsize(self.element_ty), _itemsize(new)
        byte = self.offsets * old_size
        if bool((byte % new_size != 0).any()):
            raise EmulationError(f"{self.name}: a {new} pointer at a byte offset that is not a multiple of {new_size}")
        return Pointer(self.storage, new, byte // new_size, self.name)

    def typed(self) -> torch.Tensor:
        """The storage as a flat tensor of the element type."""
        count = self.storage.nbytes() // _itemsize(self.element_ty)
        return torch.empty(0, dtype=self.element_ty).set_(self.storage, 0, (count,), (1,))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _checked(ptr: Pointer, mask, what: str):
    """(flat storage, offsets, mask) broadcast together, every unmasked offset inside the storage."""
    flat = ptr.typed()
    offsets = ptr.offsets
    if mask is None:
        mask_t = torch.ones_like(offsets, dtype=torch.bool)
    else:
        mask_t = _t(mask).to(torch.bool)
    offsets, mask_t = torch.broadcast_tensors(offsets, mask_t)
    outside = mask_t & ((offsets < 0) | (offsets >= flat.numel()))
    if bool(outside.any()):
        bad = offsets[outside]
        raise EmulationError(f"{what} through {ptr.name} out of bounds: element offsets {bad.min().item()}.."
                             f"{bad.max().item()} of a storage of {flat.numel()} {ptr.element_ty} elements "
                             f"({int(outside.sum())} accesses)")
    return flat, offsets, mask_t


def load(ptr: Pointer, mask=None, other=None, **_):
    flat, offsets, mask_t = _checked(ptr, mask, "load")
    values = flat[torch.where(mask_t, offsets, 0)]
    if mask is not None:
        fill = torch.zeros((), dtype=values.dtype) if other is None else _t(other).to(values.dtype)
        values = torch.where(mask_t, values, fill)
    return Tensor(values)


def store(ptr: Pointer, value, mask=None, **_):
    flat, offsets, mask_t = _checked(ptr, mask, "store")
    values = torch.broadcast_to(_t(value).to(ptr.element_ty), offsets.shape)
    flat[offsets[mask_t]] = values[mask_t]


# --------------------------------------------------------------------------------------------------
# shared memory and the asynchronous operations
# --------------------------------------------------------------------------------------------------

class _InFlightOps(threading.local):
    """What the calling partition (thread) has in flight: its MMA groups and its cp.async groups (this
    ``__init__`` runs once in each thread that uses it)."""

    def __init__(self):
        self.mmas, self.copies, self.uncommitted = [], [], []


ASYNC = _InFlightOps()
# Shared by the partitions: the shared-memory regions (allocation, leading index) that in-flight MMAs read,
# that cp.async copies will write, and that generic stores wrote without a fence since (-> the writer).
_PENDING_READS: dict = {}
_PENDING_WRITES: dict = {}
_UNFENCED: dict = {}
_MBARRIERS: dict = {}  # data_ptr of an initialized mbarrier -> MBarrier


class SharedMemory:
    """A shared-memory descriptor: a torch tensor, and the regions of its allocation it spans (one per
    index of the allocation's leading dimension, what ``.index`` selects)."""

    def __init__(self, data: torch.Tensor, alloc: int, regions: frozenset, indexable: bool):
        self.data, self.alloc, self.regions, self.indexable = data, alloc, regions, indexable

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def shape(self):
        return list(self.data.shape)

    def index(self, i):
        i = int(_t(i))
        regions = frozenset({(self.alloc, i)}) if self.indexable else self.regions
        return SharedMemory(self.data[i], self.alloc, regions, False)

    def permute(self, order):
        return SharedMemory(self.data.permute(*[int(o) for o in order]), self.alloc, self.regions, False)

    def _check(self, what, writes: bool):
        for region in self.regions:
            if _PENDING_WRITES.get(region):
                raise EmulationError(f"shared memory {what} while a cp.async copy into it has not landed "
                                     "(async_copy.wait_group first)")
            if writes and _PENDING_READS.get(region):
                raise EmulationError(f"shared memory {what} while an MMA reading it is in flight "
                                     "(warpgroup_mma_wait until it has retired)")

    def store(self, value):
        value = _t(value)
        if value.dtype != self.data.dtype:
            raise EmulationError(f"storing {value.dtype} into {self.data.dtype} shared memory")
        self._check("written", writes=True)
        self.data.copy_(value)
        for region in self.regions:
            _UNFENCED[region] = threading.current_thread()

    def load(self, layout=None):
        self._check("read", writes=False)
        return Tensor(self.data.clone())


_ALLOCATIONS = [0]


def allocate_shared_memory(element_ty, shape, layout=None, value=None):
    _ALLOCATIONS[0] += 1
    shape = [int(s) for s in shape]
    alloc = _ALLOCATIONS[0]
    smem = SharedMemory(torch.zeros(shape, dtype=element_ty), alloc,
                        frozenset((alloc, i) for i in range(shape[0])), True)
    if value is not None:
        smem.store(value)
    return smem


def fence_async_shared(cluster=False):
    """Orders the calling partition's generic stores before later async-proxy reads (wgmma)."""
    me = threading.current_thread()
    for region in [r for r, writer in _UNFENCED.items() if writer is me]:
        del _UNFENCED[region]


class _InFlight:
    """The accumulator of an MMA issued asynchronously and not yet retired: only another MMA may take it."""

    def __init__(self, value: torch.Tensor, reads: frozenset):
        self.value, self.reads, self.retired = value, reads, False

    def fail_if_used(self, *_):
        raise EmulationError("the accumulator of an MMA still in flight is used (warpgroup_mma_wait first)")

    def __getattr__(self, name):
        self.fail_if_used()

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __getitem__ = fail_if_used
    __bool__ = __neg__ = fail_if_used


def warpgroup_mma(a, b, acc, *, use_acc=True, is_async=False, **_):
    state = ASYNC
    operands = [x for x in (a, b) if isinstance(x, SharedMemory)]
    for smem in operands:
        smem._check("read by wgmma", writes=False)
        if any(region in _UNFENCED for region in smem.regions):
            raise EmulationError("wgmma reads shared memory stored to without fence_async_shared() since")
    acc_t = acc.value if isinstance(acc, _InFlight) else _t(acc)
    a_t = a.data if isinstance(a, SharedMemory) else _t(a)
    result = torch.matmul(a_t.float(), b.data.float())
    if use_acc:
        result = result + acc_t
    if not is_async:
        _retire(state, 0)
        return Tensor(result)
    reads = frozenset().union(*(smem.regions for smem in operands))
    for region in reads:
        _PENDING_READS[region] = _PENDING_READS.get(region, 0) + 1
    mma = _InFlight(result, reads)
    state.mmas.append(mma)
    return mma


def _retire(state, keep: int):
    while len(state.mmas) > keep:
        mma = state.mmas.pop(0)
        mma.retired = True
        for region in mma.reads:
            _PENDING_READS[region] -= 1


def warpgroup_mma_wait(num_outstanding=0, deps=None):
    if deps is None:
        raise EmulationError("warpgroup_mma_wait deps must be given")
    _retire(ASYNC, int(num_outstanding))
    out = [Tensor(dep.value) if isinstance(dep, _InFlight) and dep.retired else dep for dep in deps]
    return out[0] if len(out) == 1 else tuple(out)


def async_load(smem: SharedMemory, pointer: Pointer, mask=None, **_):
    """cp.async: global memory is read now (the kernel does not write what it copies); the copy lands in
    shared memory at the ``wait_group`` that covers its group."""
    value = torch.broadcast_to(load(pointer, mask, None).t, smem.data.shape).to(smem.dtype)
    smem._check("written by cp.async", writes=True)
    for region in smem.regions:
        _PENDING_WRITES[region] = _PENDING_WRITES.get(region, 0) + 1
    ASYNC.uncommitted.append((smem, value))


def commit_group():
    state = ASYNC
    state.copies.append(state.uncommitted)
    state.uncommitted = []


def wait_group(num_outstanding=0):
    state = ASYNC
    while len(state.copies) > int(num_outstanding):
        for smem, value in state.copies.pop(0):
            for region in smem.regions:
                _PENDING_WRITES[region] -= 1
            smem.data.copy_(value)


# --------------------------------------------------------------------------------------------------
# mbarriers and warp specialization
# --------------------------------------------------------------------------------------------------

class _Turns:
    """The partitions of a ``warp_specialize`` region take turns: one runs until it ends or blocks on an
    mbarrier, then the next one (in partition order) that can go on runs. None can while some wait: a
    deadlock, raised in every partition."""

    def __init__(self):
        self.cond = threading.Condition()
        self.active = None  # the partition thread whose turn it is (None: no region running)
        self.threads, self.waiting, self.error = [], {}, None

    def can_run(self, thread) -> bool:
        return thread in self.waiting and self.waiting[thread]() or thread not in self.waiting

    def pass_turn(self, ending: bool):
        """With the lock held, by the active thread that blocks (``ending`` False) or ends."""
        me = threading.current_thread()
        live = [t for t in self.threads if t is not me or not ending]
        live = [t for t in live if t is me or t.is_alive()]
        k = self.threads.index(me)
        order = self.threads[k + 1:] + self.threads[:k + 1]
        self.active = next((t for t in order if t in live and self.can_run(t)), None)
        if self.active is None and live and self.error is None:
            self.error = EmulationError("deadlock: every partition waits on an mbarrier that nothing will arrive on")
        self.cond.notify_all()

    def wait_turn(self):
        me = threading.current_thread()
        while self.active is not me:
            if self.error is not None:
                raise self.error
            self.cond.wait()


TURNS = _Turns()


class MBarrier:
    def __init__(self, count: int):
        self.count = self.pending = count
        self.phase = 0  # the current (incomplete) phase


def _mbarrier_of(smem: SharedMemory) -> MBarrier:
    bar = _MBARRIERS.get(smem.data.data_ptr())
    if bar is None:
        raise EmulationError("an mbarrier operation on shared memory that mbarrier.init did not set up")
    return bar


def mbarrier_init(smem: SharedMemory, count):
    _MBARRIERS[smem.data.data_ptr()] = MBarrier(int(count))


def mbarrier_invalidate(smem: SharedMemory):
    _MBARRIERS.pop(smem.data.data_ptr(), None)


def mbarrier_arrive(smem: SharedMemory, *, count=1, pred=True, **_):
    if not bool(_t(pred)):
        return
    bar = _mbarrier_of(smem)
    bar.pending -= int(count)
    if bar.pending <= 0:
        bar.phase ^= 1
        bar.pending = bar.count


def mbarrier_wait(smem: SharedMemory, phase, pred=True, deps=()):
    """Returns once the phase of parity ``phase`` has completed (a fresh barrier's parity 1 at once)."""
    if not bool(_t(pred)):
        return
    bar, parity = _mbarrier_of(smem), int(_t(phase)) & 1
    done = lambda: bar.phase != parity  # noqa: E731
    if done():
        return
    if TURNS.active is None:
        raise EmulationError("deadlock: an mbarrier wait outside warp_specialize that nothing will satisfy")
    me = threading.current_thread()
    with TURNS.cond:
        TURNS.waiting[me] = done
        TURNS.pass_turn(ending=False)
        try:
            TURNS.wait_turn()
        finally:
            del TURNS.waiting[me]


def warp_specialize(functions_and_args, worker_num_warps, worker_num_regs=None):
    """Runs every partition in a thread of its own, taking turns (:class:`_Turns`); returns what the
    default (first) partition returns."""
    results, errors = {}, []

    def body(k, fn, args):
        try:
            with TURNS.cond:
                TURNS.wait_turn()
            results[k] = fn(*args)
            state = ASYNC
            if state.mmas or state.copies or state.uncommitted:
                raise EmulationError(f"partition {k} ended with MMAs or cp.async copies in flight")
        except BaseException as error:  # noqa: BLE001 - re-raised by the launching thread
            errors.append(error)
            with TURNS.cond:
                TURNS.error = TURNS.error or error
        finally:
            with TURNS.cond:
                TURNS.pass_turn(ending=True)

    threads = [threading.Thread(target=body, args=(k, fn, args), daemon=True)
               for k, (fn, args) in enumerate(functions_and_args)]
    with TURNS.cond:
        TURNS.threads, TURNS.waiting, TURNS.error, TURNS.active = threads, {}, None, None
    for t in threads:
        t.start()
    with TURNS.cond:  # (once every partition is alive: none is taken for ended)
        TURNS.active = threads[0]
        TURNS.cond.notify_all()
    for t in threads:
        t.join()
    with TURNS.cond:
        TURNS.active, TURNS.threads = None, []
    if errors:
        raise errors[0]
    return results[0]


# --------------------------------------------------------------------------------------------------
# the language
# --------------------------------------------------------------------------------------------------

class _Layout:
    """Layouts are accepted and ignored."""

    def __init__(self, *args, **kwargs):
        pass

    @staticmethod
    def get_default_for(*args, **kwargs):
        return _Layout()


def _constexpr(value=None):
    return value


def _pair(a, b):
    """Two operands of an elementwise function as torch tensors of their result type."""
    if isinstance(a, Tensor):
        return _operands(a, b)
    if isinstance(b, Tensor):
        b_t, a_t = _operands(b, a)
        return a_t, b_t
    return _t(a), _t(b)


def _minimum(a, b):
    if not isinstance(a, Tensor) and not isinstance(b, Tensor):
        return min(a, b)
    return Tensor(torch.minimum(*_pair(a, b)))


def _maximum(a, b):
    if not isinstance(a, Tensor) and not isinstance(b, Tensor):
        return max(a, b)
    return Tensor(torch.maximum(*_pair(a, b)))


def _where(cond, a, b):
    return Tensor(torch.where(_t(cond).to(torch.bool), *_pair(a, b)))


def _fma(a, b, c):
    """One rounding, as the hardware's: the product of two fp32 is exact in fp64."""
    a_t, b_t, c_t = _t(a), _t(b), _t(c)
    return Tensor((a_t.double() * b_t.double() + c_t.double()).float())


def _join(a, b):
    a, b = torch.broadcast_tensors(_t(a), _t(b))
    return Tensor(torch.stack([a, b], dim=-1))


def _split(x):
    x = _t(x)
    if x.shape[-1] != 2:
        raise EmulationError(f"split takes a last dimension of 2, got {list(x.shape)}")
    return Tensor(x[..., 0]), Tensor(x[..., 1])


def _program(axis):
    return Tensor(torch.tensor(PROGRAM.ids[int(axis)], dtype=torch.int32))


def _num_programs(axis):
    return Tensor(torch.tensor(PROGRAM.grid[int(axis)], dtype=torch.int32))


def _cdiv(a, b):
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (a + b - 1) // b
    return -(-a // b)


PROGRAM = SimpleNamespace(ids=(0, 0, 0), grid=(1, 1, 1))

_DTYPES = dict(float32=torch.float32, float16=torch.float16, bfloat16=torch.bfloat16, float64=torch.float64,
               int1=torch.bool, int8=torch.int8, int16=torch.int16, int32=torch.int32, int64=torch.int64,
               uint8=torch.uint8, uint16=torch.uint16, uint32=torch.uint32, uint64=torch.uint64)

gl = SimpleNamespace(
    **_DTYPES,
    constexpr=_constexpr, BlockedLayout=_Layout, SliceLayout=_Layout, NVMMASharedLayout=_Layout,
    NVMMADistributedLayout=_Layout, SwizzledSharedLayout=_Layout, DistributedLinearLayout=_Layout,
    program_id=_program, num_programs=_num_programs,
    arange=lambda start, end, layout=None: Tensor(torch.arange(int(start), int(end), dtype=torch.int32)),
    zeros=lambda shape, dtype, layout=None: Tensor(torch.zeros([int(s) for s in shape], dtype=dtype)),
    load=load, store=store, where=_where, minimum=_minimum, maximum=_maximum, fma=_fma, cdiv=_cdiv,
    static_range=lambda *a: range(*[int(x) for x in a]), join=_join, split=_split,
    reshape=lambda x, shape, **_: Tensor(_t(x).reshape([int(s) for s in shape])),
    permute=lambda x, dims: Tensor(_t(x).permute(*[int(d) for d in dims])),
    convert_layout=lambda x, layout, **_: x, pointer_type=PointerType,
    allocate_shared_memory=allocate_shared_memory, warp_specialize=warp_specialize,
    barrier=lambda: None, thread_barrier=lambda: None,
)

libdevice = SimpleNamespace(
    rint=lambda x: Tensor(torch.round(_t(x))),  # half to even, as rint
    fast_cosf=lambda x: Tensor(torch.cos(_t(x))), fast_sinf=lambda x: Tensor(torch.sin(_t(x))),
)
async_copy = SimpleNamespace(async_load=async_load, async_copy_global_to_shared=async_load,
                             commit_group=commit_group, wait_group=wait_group)
mbarrier = SimpleNamespace(init=mbarrier_init, invalidate=mbarrier_invalidate, arrive=mbarrier_arrive,
                           wait=mbarrier_wait, MBarrierLayout=_Layout)
hopper = SimpleNamespace(fence_async_shared=fence_async_shared, warpgroup_mma=warpgroup_mma,
                         warpgroup_mma_wait=warpgroup_mma_wait, mbarrier=mbarrier)


@functools.lru_cache(maxsize=None)
def _substitutes() -> dict:
    """id(real Gluon/Triton object) -> its emulation, for the globals of emulated functions."""
    pairs = [(real_gl, gl), (real_tl, gl), (real_libdevice, libdevice), (real_async_copy, async_copy),
             (real_mbarrier, mbarrier), (real_hopper, hopper),
             (real_hopper.fence_async_shared, fence_async_shared), (real_hopper.warpgroup_mma, warpgroup_mma),
             (real_hopper.warpgroup_mma_wait, warpgroup_mma_wait)]
    for name in ("async_load", "async_copy_global_to_shared"):
        if hasattr(real_async_copy, name):
            pairs.append((getattr(real_async_copy, name), async_load))
    for name in ("barrier", "thread_barrier"):
        if hasattr(real_gl, name):
            pairs.append((getattr(real_gl, name), gl.barrier))
    try:
        from triton.language.extra import libdevice as real_tl_libdevice
        pairs.append((real_tl_libdevice, libdevice))
    except ImportError:
        pass
    return {id(real): emu for real, emu in pairs}


def _emulate_function(jit_fn, cache: dict, replace: dict):
    """The Python function behind a Gluon/Triton JIT function, its globals pointing at the emulation (and at
    ``replace``'s objects by name), the JIT functions it calls emulated the same way."""
    if id(jit_fn) in cache:
        return cache[id(jit_fn)]
    substitutes = _substitutes()
    fn = jit_fn.fn
    scope = dict(fn.__globals__)
    emulated_fn = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    cache[id(jit_fn)] = emulated_fn
    for name, value in fn.__globals__.items():
        if name in replace:
            scope[name] = replace[name]
        elif id(value) in substitutes:
            scope[name] = substitutes[id(value)]
        elif _is_jit(value):
            scope[name] = _emulate_function(value, cache, replace)
    return emulated_fn


def _is_jit(value) -> bool:
    return callable(getattr(value, "fn", None)) and type(value).__module__.startswith("triton")


def _argument(value, name: str):
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu":
            raise EmulationError(f"{name}: the emulator runs on CPU tensors, got {value.device}")
        return Pointer.of(value, name)
    if isinstance(value, (bool, int, float)):
        return Tensor(_scalar_tensor(value))
    return value


class emulated:
    """``emulated(kernel)[grid](*args, **constexprs)``: the kernel's programs one after the other on CPU.

    ``replace``: objects that the kernel's functions find under these global names instead (a fault to
    inject, e.g. a ``warpgroup_mma_wait`` that leaves one more MMA in flight, to see that it is caught)."""

    def __init__(self, kernel, replace: dict | None = None):
        self.kernel = kernel
        self.fn = _emulate_function(kernel, {}, dict(replace or {}))
        self.params = list(kernel.fn.__code__.co_varnames[:kernel.fn.__code__.co_argcount])

    def __getitem__(self, grid):
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))

        def launch(*args, **kwargs):
            named = dict(zip(self.params, args))
            constexprs = {k: v for k, v in kwargs.items() if k in self.params}
            call = {name: _argument(value, name) for name, value in named.items()}
            call.update(constexprs)  # constexprs stay Python values
            for pid in ((x, y, z) for x in range(grid[0]) for y in range(grid[1]) for z in range(grid[2])):
                PROGRAM.ids, PROGRAM.grid = pid, grid
                try:
                    self.fn(**call)
                    state = ASYNC
                    if state.mmas or state.copies or state.uncommitted:
                        raise EmulationError("the program ended with MMAs or cp.async copies in flight")
                finally:
                    _reset()
        return launch


def _reset():
    """Forget what one program left behind (so a failing program does not poison the next)."""
    state = ASYNC
    state.mmas.clear()
    state.copies.clear()
    state.uncommitted.clear()
    for shared in (_PENDING_READS, _PENDING_WRITES, _UNFENCED, _MBARRIERS):
        shared.clear()


__all__ = ["EmulationError", "emulated"]
