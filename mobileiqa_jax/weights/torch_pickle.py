"""Reads a `torch.save` file (the authors' `.pkl`, a `.pth`) with numpy, without PyTorch.

Since PyTorch 1.6 `torch.save` writes a zip: `<root>/data.pkl` is a pickle of the saved object
in which every tensor is a call to `torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, ...)` and every storage a persistent id ('storage', torch.<Type>Storage, key, device,
numel) whose bytes are the zip record `<root>/data/<key>`. This module unpickles that with an
unpickler that admits only what rebuilding plain tensors needs, as
`torch.load(weights_only=True)` does for a state dict, and makes each tensor a numpy array: a
view, with the tensor's offset, shape and strides, of its storage read into memory (tensors
that share a storage share it, as torch's do).

Anything else the pickle asks for (e.g. `os.system` through `__reduce__`, a model class) is
refused with `UnsafePickleError`, before it is called: loading a weights file must never run
code. Scoring the authors' weights therefore needs no torch install and imports no torch.

Not read: the pre-1.6 (non-zip) format and tensor subclasses; both are named in the error.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any

import numpy as np


class UnsafePickleError(pickle.UnpicklingError):
  """A pickle asks for something other than tensors and storages: refused, never called."""


def _bfloat16() -> Any:
  import ml_dtypes  # pylint: disable=g-import-not-at-top  # jax's dependency; only if needed.
  return ml_dtypes.bfloat16


# torch.<Name>Storage (legacy typed storages, what torch.save still pickles) -> numpy dtype.
_STORAGE_DTYPES: dict[str, Any] = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": _bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128, "UntypedStorage": np.uint8,
}


class _StorageType:
  """Stands for `torch.<Name>Storage` in the pickle: only its dtype is kept."""

  def __init__(self, name: str):
    self.name = name

  @property
  def dtype(self) -> np.dtype:
    dtype = _STORAGE_DTYPES[self.name]
    return np.dtype(dtype() if dtype is _bfloat16 else dtype)


class _Storage:
  """One storage record: a flat numpy array of its dtype, owned by this load."""

  def __init__(self, array: np.ndarray):
    self.array = array


def _rebuild_tensor_v2(storage: _Storage, storage_offset: int, size: tuple[int, ...],
                       stride: tuple[int, ...], requires_grad: Any = False,
                       backward_hooks: Any = None, metadata: Any = None) -> np.ndarray:
  """The tensor as torch rebuilds it: a strided view of its storage (shared, as in torch)."""
  del requires_grad, backward_hooks, metadata  # Not part of the values.
  flat = storage.array
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride):
    raise pickle.UnpicklingError(f"a tensor of size {size} and stride {stride} is malformed.")
  if 0 in size:
    return np.zeros(size, flat.dtype)
  last = int(storage_offset) + sum((n - 1) * s for n, s in zip(size, stride))
  if storage_offset < 0 or last >= flat.size:
    # A view past its storage would read other memory: a corrupt or forged file.
    raise pickle.UnpicklingError(f"a tensor (offset {storage_offset}, size {size}, stride "
                                 f"{stride}) reaches past its storage of {flat.size} elements.")
  # A view, not a copy: the storage was read into memory of its own, and tensors that share
  # a storage in torch share it here too (what torch.load returns). One copy of the weights
  # fewer at start-up.
  return np.lib.stride_tricks.as_strided(
      flat[int(storage_offset):], shape=size, strides=tuple(s * flat.itemsize for s in stride))


def _rebuild_parameter(data: np.ndarray, requires_grad: Any = False,
                       backward_hooks: Any = None) -> np.ndarray:
  """An `nn.Parameter` saved as such is its data."""
  del requires_grad, backward_hooks
  return data


# (module, name) -> what the unpickler returns for it: the whole vocabulary of a weights file.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _Unpickler(pickle.Unpickler):
  """Admits `_ALLOWED` only; storages come from the zip's data/ records."""

  def __init__(self, file: Any, archive: zipfile.ZipFile | None, root: str, byteorder: str):
    super().__init__(file)
    self._archive = archive
    self._root = root
    self._byteorder = byteorder
    self._storages: dict[str, _Storage] = {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    raise UnsafePickleError(f"it asks for {module}.{name}, which a weights file never needs "
                            "(only tensors, storages and OrderedDict are admitted)")

  def persistent_load(self, pid: Any) -> _Storage:
    if (not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage"
        or not isinstance(pid[1], _StorageType) or self._archive is None):
      raise UnsafePickleError(f"it holds a persistent id {str(pid)[:80]!r} that is not a "
                              "tensor storage")
    storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
    if key not in self._storages:  # Tensors sharing a storage share its array.
      dtype = storage_type.dtype.newbyteorder("<" if self._byteorder == "little" else ">")
      array = self._read(f"{self._root}data/{key}", dtype, numel)
      self._storages[key] = _Storage(array.astype(array.dtype.newbyteorder("="), copy=False))
    return self._storages[key]

  def _read(self, name: str, dtype: np.dtype, numel: int) -> np.ndarray:
    """A storage record's first `numel` elements, read straight into a new array.

    torch.save stores records uncompressed: they are read from the file at their offset with
    one readinto (no intermediate bytes, no CRC pass over hundreds of MB); others through
    zipfile.
    """
    info = self._archive.getinfo(name)
    out = np.empty(numel, dtype)
    want = numel * dtype.itemsize
    if info.file_size < want:
      raise pickle.UnpicklingError(f"storage {name} holds {info.file_size} bytes, fewer than "
                                   f"its {numel} elements of {dtype.name}.")
    buffer = memoryview(out.view(np.uint8))  # Bytes: float16/bfloat16 have no buffer code.
    if info.compress_type == zipfile.ZIP_STORED:
      raw = self._archive.fp
      # The local header (30 bytes, then the name and an extra field) precedes the data.
      raw.seek(info.header_offset)
      header = raw.read(30)
      if header[:4] != b"PK\x03\x04":
        raise pickle.UnpicklingError(f"zip record {name} has no local header.")
      name_len, extra_len = struct.unpack("<HH", header[26:30])
      raw.seek(info.header_offset + 30 + name_len + extra_len)
      got = raw.readinto(buffer)
    else:
      with self._archive.open(name) as f:
        got = f.readinto(buffer)
    if got != want:
      raise pickle.UnpicklingError(f"storage {name}: read {got} of {want} bytes.")
    return out


def load(path: str | os.PathLike) -> Any:
  """The object a `torch.save` zip file holds, tensors as numpy arrays; no torch needed.

  Raises:
    UnsafePickleError: the pickle asks for anything but tensors, storages and OrderedDict
      (the message names it); nothing it asks for is called.
    pickle.UnpicklingError: a file that is not a torch.save zip (the old non-zip format
      included) or whose records are inconsistent.
  """
  path = os.fspath(path)
  if not zipfile.is_zipfile(path):
    # Still unpickle it, restricted: an arbitrary pickle must be refused as unsafe, not run.
    with open(path, "rb") as f:
      _Unpickler(f, None, "", "little").load()
    raise pickle.UnpicklingError(
        "it is not a torch.save zip file (PyTorch >= 1.6); an older torch.save file needs "
        "PyTorch to read: re-save it with torch.save, or as .safetensors")
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
    if len(pickles) != 1:
      raise pickle.UnpicklingError("it is a zip file but not a torch.save one (no single "
                                   "data.pkl record)")
    root = pickles[0][: -len("data.pkl")]
    byteorder = "little"
    if f"{root}byteorder" in names:
      byteorder = archive.read(f"{root}byteorder").decode("ascii").strip()
    # data.pkl is read whole first: the storages are then read from the same file handle.
    data = archive.read(pickles[0])
    return _Unpickler(io.BytesIO(data), archive, root, byteorder).load()
