"""A CUDA device that does not exist, for the CPU-only torch of CI: tensors that say they are on
cuda:0, compute on the CPU with real values, and fail as PyTorch on a GPU would when an operation
mixes them with CPU tensors.

How: `FakeCuda` is a TorchDispatchMode. Every aten operation runs twice:
- its device semantics: all its tensors on one device (CPU scalars aside), except for the
  operations that take several (copies, advanced indexing with CPU indices:
  MIXED_DEVICE_OPERATIONS); then on PyTorch's own fake tensors (torch._subclasses.fake_tensor:
  the shapes, dtypes and devices an operation would give, without data): arguments on cuda:0 and on the CPU
  as the real ones are; a mix a GPU refuses raises FakeTensorDeviceMismatchError (or the meta
  kernel's own device error) here as it would raise on the GPU. Its outputs' devices say which of
  the real outputs are "on the GPU". Operations whose outputs' shapes depend on the data
  (nonzero, item) cannot run on fake tensors: their outputs take their inputs' device, as on a
  GPU, after the same check that their inputs share one.
- on the CPU, with the CUDA tensors' CPU contents (`FakeCudaTensor.elem`), for the values, so that
  code which reads values (.item(), .tolist(), a branch on a mask) runs on, and results can be
  compared with a plain CPU run.

Moving: `tensor.to(torch.device("cuda", 0))`, `module.to(...)`, `torch.tensor(..., device=...)`
and factories with a CUDA device work inside the mode (they reach aten's _to_copy / empty with a
device), once install_cuda_device_guard() gave this torch the device guard of a CUDA build.
chla moves tensors with plain .to(device) calls, so nothing in chla needed a seam for the layer.

Backward does not run: torch's autograd engine needs a CUDA accelerator for a graph of CUDA
tensors ("Cannot access accelerator device when none is available").

What it catches: a tensor created or left on the CPU and used with the model's CUDA tensors
(indices, masks, position ids, generator draws, loss buffers), anywhere on the paths run under
it. What it cannot: CUDA kernels (numerics, flash-attention, bf16 on the GPU), memory (the
tensors live in CPU memory), NCCL and multi-GPU placement, torch.compile, and host/device
synchronisation costs.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path
from typing import Any

import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorDeviceMismatchError,
    FakeTensorMode,
)
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

CUDA = torch.device("cuda", 0)

# The device guard PyTorch's C++ takes for a CUDA tensor (Python indexing, among others: `x[1:]`)
# exists only in a build with CUDA; without it, "PyTorch is not linked with support for cuda
# devices". c10's no-op guard registered for CUDA, from a 2-line library built once per torch
# version (2 s with g++) and loaded into the process: it stays registered (nothing else changes:
# torch.cuda.is_available() stays False).
GUARD_SOURCE = """#include <c10/core/impl/DeviceGuardImplInterface.h>
C10_REGISTER_GUARD_IMPL(CUDA, c10::impl::NoOpDeviceGuardImpl<c10::DeviceType::CUDA>);
"""


def install_cuda_device_guard() -> None:
    if torch.cuda.is_available():
        raise RuntimeError("a real CUDA device is present: run the GPU layer (pytest -m gpu) instead")
    torch_dir = Path(torch.__file__).parent
    cache = Path(os.environ.get("CHLA_CACHE", Path.home() / ".cache" / "chla")) / "fake_cuda" / torch.__version__
    library = cache / "cuda_noop_guard.so"
    if not library.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        # per-process names: two xdist workers may build it at once on a fresh machine
        source = cache / f"cuda_noop_guard.{os.getpid()}.cpp"
        source.write_text(GUARD_SOURCE)
        partial = cache / f"cuda_noop_guard.{os.getpid()}.so"
        abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
        compiler = os.environ.get("CXX", "c++")
        command = [compiler, "-shared", "-fPIC", "-std=c++17", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
        command += [f"-I{torch_dir / 'include'}", str(source), f"-L{torch_dir / 'lib'}", "-lc10"]
        command += [f"-Wl,-rpath,{torch_dir / 'lib'}", "-o", str(partial)]
        try:
            subprocess.run(command, check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", None) or exc
            why = f"the fake-CUDA layer builds its device guard with {compiler} (or $CXX): {detail}"
            raise RuntimeError(why) from None
        partial.rename(library)  # atomic: a concurrent build renames an equal file
        source.unlink()
    ctypes.CDLL(str(library))


class FakeCudaTensor(torch.Tensor):
    """A tensor on cuda:0 whose contents are the CPU tensor `elem`."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor, device: torch.device):
        tensor = torch.Tensor._make_wrapper_subclass(
            cls,
            elem.shape,
            strides=elem.stride(),
            storage_offset=elem.storage_offset(),
            dtype=elem.dtype,
            layout=elem.layout,
            device=device,
            requires_grad=elem.requires_grad,
        )
        tensor.elem = elem
        return tensor

    def __repr__(self, *, tensor_contents=None) -> str:  # type: ignore[override]
        return f"FakeCudaTensor({self.elem!r}, device={self.device})"

    __torch_function__ = torch._C._disabled_torch_function_impl

    def tolist(self):  # a CUDA tensor copies its values to the host (torch refuses subclasses)
        return self.elem.tolist()

    # `param.data = other` (transformers' resize does it) swaps the tensor under the Python object:
    # the CPU contents follow.
    @property  # type: ignore[override]
    def data(self):
        return torch._C.TensorBase.data.__get__(self)

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        torch._C.TensorBase.data.__set__(self, value)
        self.elem = value.elem if isinstance(value, FakeCudaTensor) else value

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Outside FakeCuda (a test reading a result): the same rules.
        return _run(func, args, kwargs or {})


class DeviceMismatch(RuntimeError):
    """An operation mixed devices as a GPU would refuse."""


class FakeCuda(TorchDispatchMode):
    """While active, cuda:0 exists (see the module docstring)."""

    def __enter__(self):
        # `.to(cuda:0)` first initialises the CUDA runtime (torch.cuda._lazy_init, which fails on
        # a torch without CUDA) unless that thread is already initialising it: say so.
        self._initialising = hasattr(torch.cuda._tls, "is_initializing")
        torch.cuda._tls.is_initializing = True
        # torch.tensor(data, device=cuda:0) builds on the CPU and moves, as under FakeTensorMode
        # (otherwise it allocates on the CUDA backend below this mode)
        self._lift_cpu = torch._C._only_lift_cpu_tensors()
        torch._C._set_only_lift_cpu_tensors(True)
        # module.to(cuda:0) makes new Parameters of the FakeCudaTensors (instead of `param.data =`,
        # which would keep the CPU Parameter's Python object without the CUDA contents)
        self._overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        return super().__enter__()

    def __exit__(self, *exc):
        if not self._initialising:
            del torch.cuda._tls.is_initializing
        torch.__future__.set_overwrite_module_params_on_conversion(self._overwrite)
        torch._C._set_only_lift_cpu_tensors(self._lift_cpu)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


_shadow = FakeTensorMode(allow_non_fake_inputs=False)


def _is_cuda(device: Any) -> bool:
    return isinstance(device, (torch.device, str)) and torch.device(device).type == "cuda"


def _on_cpu(value: Any) -> Any:
    if isinstance(value, FakeCudaTensor):
        return value.elem
    if _is_cuda(value):
        return torch.device("cpu")
    return value


def _shadow_of(value: Any) -> Any:
    """A fake tensor of `value`'s shape, dtype and (claimed) device."""
    if not isinstance(value, torch.Tensor):
        return value
    meta = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
    return FakeTensor(_shadow, meta, value.device)


def _common_device(func, args, kwargs) -> torch.device:
    """The device of an operation fake tensors cannot run: its inputs' one device (CPU scalars
    aside, as PyTorch allows them beside CUDA tensors)."""
    devices = {
        t.device
        for t in pytree.tree_leaves((args, kwargs))
        if isinstance(t, torch.Tensor) and not (t.device.type == "cpu" and t.dim() == 0)
    }
    if len(devices) > 1:
        raise DeviceMismatch(f"{func}: tensors on {sorted(map(str, devices))}")
    return devices.pop() if devices else torch.device("cpu")


# The operations whose CUDA kernels take tensors of several devices: copies between devices, and
# advanced indexing with CPU indices (PyTorch moves them). Every other operation must get all its
# tensors (CPU scalars aside) on one device: checked besides the fake tensors' own rules, which
# miss some operations (the embedding_bag of a weight that requires grad).
MIXED_DEVICE_OPERATIONS = {
    torch.ops.aten.copy_.default,
    torch.ops.aten._to_copy.default,
    torch.ops.aten.index.Tensor,
    torch.ops.aten.index_put_.default,
    torch.ops.aten._index_put_impl_.default,
    torch.ops.aten.index_put.default,
    torch.ops.aten.set_.source_Tensor,
}


def _run(func, args, kwargs):
    # 1. The device semantics, on fake tensors.
    if func not in MIXED_DEVICE_OPERATIONS:
        _common_device(func, args, kwargs)
    try:
        with _shadow:
            shadow_out = func(*pytree.tree_map(_shadow_of, args), **pytree.tree_map(_shadow_of, kwargs))
        out_devices = [t.device if isinstance(t, torch.Tensor) else None for t in pytree.tree_leaves(shadow_out)]
    except FakeTensorDeviceMismatchError as exc:
        raise DeviceMismatch(f"{func}: {exc}") from None
    except (DataDependentOutputException, DynamicOutputShapeException):
        out_devices = None
    except RuntimeError as exc:
        if "device" in str(exc).lower() and ("cuda" in str(exc) or "cpu" in str(exc)):
            raise DeviceMismatch(f"{func}: {exc}") from None
        raise
    # 2. The values, on the CPU.
    inputs = {id(t.elem): t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, FakeCudaTensor)}
    out = func(*pytree.tree_map(_on_cpu, args), **pytree.tree_map(_on_cpu, kwargs))
    leaves, spec = pytree.tree_flatten(out)
    if out_devices is None:
        device = kwargs.get("device") if _is_cuda(kwargs.get("device")) else _common_device(func, args, kwargs)
        out_devices = [device] * len(leaves)
    wrapped = []
    for leaf, device in zip(leaves, out_devices):
        if isinstance(leaf, torch.Tensor) and device is not None and device.type == "cuda":
            # an in-place operation returns its argument: the same FakeCudaTensor
            leaf = inputs[id(leaf)] if id(leaf) in inputs else FakeCudaTensor(leaf, device)
        wrapped.append(leaf)
    return pytree.tree_unflatten(wrapped, spec)
