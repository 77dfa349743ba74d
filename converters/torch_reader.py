"""Read PyTorch checkpoint files into numpy arrays without importing torch and without executing pickled code.

`read_torch_checkpoint(source)` accepts a path or the raw bytes of a file written by `torch.save`, in either
format:

* **zip format** (torch >= 1.6): a zip archive `<prefix>/data.pkl` + `<prefix>/data/<key>` (raw storages) +
  `<prefix>/byteorder`; the prefix folder name varies (`archive`, the file stem, ...).
* **legacy format** (torch < 1.6, or `_use_new_zipfile_serialization=False`): five consecutive pickles / blocks:
  magic number, protocol version 1001, sys_info dict, the object pickle, the list of storage keys, then for each
  key an int64 element count followed by the raw storage bytes.

It returns the pickled object rebuilt from plain Python containers (`dict` / `collections.OrderedDict` /
`list` / `tuple` / `set` / `int` / `float` / `str` / `bytes` / `bool` / `None`) in which every tensor or
`nn.Parameter` is an independent, C-contiguous, writable `numpy.ndarray` with the tensor's dtype and shape
(0-d tensors -> 0-d arrays; bfloat16 is upcast to float32; views, storage offsets, strides and storages shared
between tensors are honoured). Pickled numpy scalars and numeric numpy arrays are returned as such.

Safety model. The pickle is read by a restricted `pickle.Unpickler` whose `find_class` never imports anything.
It only hands out (a) fresh, immutable wrappers around this module's own re-implementations of an explicit
allow-list of globals (`_ALLOWED_CALLS`: the torch tensor/parameter rebuild functions,
`collections.OrderedDict`, `torch.Size`, `torch.device`, `_codecs.encode`, `builtins.set/frozenset`, numpy
scalar/array/dtype reconstruction restricted to numeric dtypes, `copyreg` object reconstruction), (b) inert
markers for torch storage types and dtypes, and (c) for every other global (`argparse.Namespace`, Lightning's
`AttributeDict`, but also `os.system`, `builtins.eval`, `builtins.getattr`, `subprocess.Popen`, ...) a freshly
made subclass of `OpaqueObject`. "Calling" such a class (pickle REDUCE / NEWOBJ / INST / BUILD / SETITEMS /
APPENDS) only records its arguments, state and items in the instance; nothing outside this module is ever
called, so a malicious pickle cannot run code.

* `strict=False` (default): unknown globals become `OpaqueObject` instances in the result (e.g. the `args`
  Namespace of a training script, or a pickled bound method in an old learning-rate-scheduler state). The
  arrays you need are unaffected; inspect `obj.qualname`, `obj.args`, `obj.state` for the recorded data.
* `strict=True`: the first global outside the allow-list raises `CheckpointError` naming the file and the
  global.

Every failure (unsafe global in strict mode, truncated or corrupted zip or pickle, a tensor that points outside
its storage, a file that is not a torch checkpoint) raises `jaxcrystal.errors.CheckpointError` whose message
starts with the file name.
"""

from __future__ import annotations

import _compat_pickle
import io
import math
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from jaxcrystal.errors import CheckpointError

__all__ = ["OpaqueObject", "read_torch_checkpoint", "read_torch_checkpoint_from_zip"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
# A tensor may hold more elements than its storage (stride-0 / overlapping views) only up to this many elements,
# so a crafted 1-element storage cannot be expanded into a multi-gigabyte copy.
_MAX_OVERLAPPING_NUMEL = 1 << 20


class _Bad(Exception):
    """Internal: the checkpoint is unacceptable; converted to `CheckpointError` with the file name."""


# --------------------------------------------------------------------------------------------------------------
# dtypes and storages
# --------------------------------------------------------------------------------------------------------------

# torch dtype name -> numpy dtype string ("bfloat16" is handled separately: read as uint16, upcast to float32).
_TORCH_DTYPES = {
    "float32": "f4",
    "float": "f4",
    "float64": "f8",
    "double": "f8",
    "float16": "f2",
    "half": "f2",
    "bfloat16": "bfloat16",
    "int64": "i8",
    "long": "i8",
    "int32": "i4",
    "int": "i4",
    "int16": "i2",
    "short": "i2",
    "int8": "i1",
    "uint8": "u1",
    "uint16": "u2",
    "uint32": "u4",
    "uint64": "u8",
    "bool": "?",
    "complex64": "c8",
    "cfloat": "c8",
    "complex128": "c16",
    "cdouble": "c16",
}

# legacy/typed storage class name -> numpy dtype string; untyped storages are bytes.
_STORAGE_TYPES = {
    "FloatStorage": "f4",
    "DoubleStorage": "f8",
    "HalfStorage": "f2",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
    "ComplexFloatStorage": "c8",
    "ComplexDoubleStorage": "c16",
    "UntypedStorage": "u1",
    "_UntypedStorage": "u1",
}
_STORAGE_MODULES = ("torch", "torch.cuda", "torch.storage")


def _itemsize(code: str) -> int:
    return 2 if code == "bfloat16" else np.dtype(code).itemsize


class _StorageType(NamedTuple):
    """Inert marker for a torch storage class such as `torch.FloatStorage` (element dtype `code`)."""

    name: str
    code: str


class _TorchDType(NamedTuple):
    """Inert marker for a torch dtype global such as `torch.float32`."""

    name: str
    code: str


class _NumpyNdarrayType(NamedTuple):
    """Inert marker for the `numpy.ndarray` class, accepted only as the subtype of `_reconstruct`."""

    name: str


class _Storage:
    """A torch storage: `raw` bytes (None in the legacy probe pass) holding elements of dtype `code`."""

    def __init__(self, raw: bytes | None, code: str, little_endian: bool):
        self.raw, self.code, self.little_endian = raw, code, little_endian
        self._arrays: dict[str, np.ndarray] = {}

    def elements(self, code: str) -> np.ndarray:
        """The storage bytes as a 1-D read-only array of dtype `code` (bfloat16 -> float32)."""
        if code not in self._arrays:
            size = _itemsize(code)
            if len(self.raw) % size:
                raise _Bad(f"storage of {len(self.raw)} bytes cannot hold whole {code} elements")
            order = "<" if self.little_endian else ">"
            if code == "bfloat16":
                bits = np.frombuffer(self.raw, dtype=order + "u2").astype(np.uint32) << 16
                arr = bits.view(np.float32)
            else:
                dtype = np.dtype(code)
                arr = np.frombuffer(self.raw, dtype=dtype.newbyteorder(order) if dtype.itemsize > 1 else dtype)
                arr = arr.astype(dtype.newbyteorder("="), copy=False)
            self._arrays[code] = arr
        return self._arrays[code]


# --------------------------------------------------------------------------------------------------------------
# re-implementations of the allow-listed globals (they validate every argument; none calls back into the pickle)
# --------------------------------------------------------------------------------------------------------------


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or not all(isinstance(v, int) and v >= 0 for v in value):
        raise _Bad(f"tensor {what} must be a tuple of non-negative ints, got {value!r:.80}")
    return tuple(int(v) for v in value)


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, code: str | None = None) -> np.ndarray | None:
    """Array view of `storage` with element `offset`, `size` and element `stride`, copied to a new array."""
    if not isinstance(storage, _Storage):
        raise _Bad(f"tensor storage must come from a persistent storage id, got {type(storage).__name__}")
    if not isinstance(offset, int) or offset < 0:
        raise _Bad(f"tensor storage offset must be a non-negative int, got {offset!r:.80}")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(size) != len(stride):
        raise _Bad(f"tensor size {size} and stride {stride} have different lengths")
    if storage.raw is None:  # legacy probe pass: storages not read yet
        return None
    elements = storage.elements(code or storage.code)
    numel = math.prod(size)
    if numel == 0:
        return np.zeros(size, dtype=elements.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= len(elements):
        raise _Bad(
            f"tensor (offset {offset}, size {size}, stride {stride}) reaches outside its storage of "
            f"{len(elements)} elements"
        )
    if numel > len(elements) and numel > _MAX_OVERLAPPING_NUMEL:
        raise _Bad(f"tensor of size {size} overlaps itself in a storage of {len(elements)} elements")
    view = np.lib.stride_tricks.as_strided(
        elements[offset:], shape=size, strides=tuple(s * elements.itemsize for s in stride), writeable=False
    )
    return np.array(view, order="C")


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    return _tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    if not isinstance(dtype, _TorchDType):
        raise _Bad(f"_rebuild_tensor_v3 needs a torch dtype, got {dtype!r:.80}")
    return _tensor(storage, storage_offset, size, stride, dtype.code)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if data is not None and not isinstance(data, np.ndarray):
        raise _Bad(f"parameter data must be a tensor, got {type(data).__name__}")
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if not (isinstance(func, _Call) and func.qualname in _TENSOR_REBUILDERS and isinstance(args, tuple)):
        raise _Bad(f"_rebuild_from_type_v2 with unsupported rebuild function {func!r:.80}")
    return func(*args)


def _ordered_dict(items=()):
    if isinstance(items, dict):
        return OrderedDict(dict.items(items))  # dict.items: never a method the pickle could have attached
    if isinstance(items, list | tuple) and all(isinstance(p, list | tuple) and len(p) == 2 for p in items):
        return OrderedDict(items)
    raise _Bad(f"OrderedDict from unsupported argument {type(items).__name__}")


def _torch_size(dims=()):
    return _int_tuple(dims, "torch.Size")


def _torch_device(kind, index=None):
    if not isinstance(kind, str) or not (index is None or isinstance(index, int)):
        raise _Bad(f"torch.device from unsupported arguments {kind!r:.40}, {index!r:.40}")
    return kind if index is None else f"{kind}:{index}"


def _codecs_encode(text, encoding="utf-8"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise _Bad(f"_codecs.encode with unsupported arguments ({type(text).__name__}, {encoding!r:.40})")
    return text.encode(encoding)


def _container(kind):
    def build(items=()):
        if not isinstance(items, list | tuple | set | frozenset):
            raise _Bad(f"{kind.__name__} from unsupported argument {type(items).__name__}")
        return kind(items)

    return build


def _numeric_dtype(dtype: Any) -> np.dtype:
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc" or dtype.fields or dtype.subdtype:
        raise _Bad(f"numpy data of unsupported dtype {dtype!r:.80} (only numeric dtypes are read)")
    return dtype


def _numpy_dtype(code, align=False, copy=False):
    if not isinstance(code, str):
        raise _Bad(f"numpy dtype from unsupported argument {code!r:.80}")
    try:
        dtype = np.dtype(code, align=bool(align), copy=True)  # a private copy: BUILD may set its byte order
    except TypeError as exc:
        raise _Bad(f"unknown numpy dtype {code!r:.40}") from exc
    return _numeric_dtype(dtype)


def _numpy_scalar(dtype, data=None):
    dtype = _numeric_dtype(dtype)
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise _Bad(f"numpy scalar of dtype {dtype} needs {dtype.itemsize} bytes")
    return np.frombuffer(data, dtype=dtype)[0]


def _numpy_reconstruct(subtype, shape, code):
    # numpy pickles an array as _reconstruct(ndarray, (0,), b"b") followed by BUILD, which runs numpy's own
    # ndarray.__setstate__ with (version, shape, dtype, is_fortran, raw bytes); the dtype there can only come
    # from `_numpy_dtype`, which refuses object dtypes, so no pickled objects are ever embedded.
    if not isinstance(subtype, _NumpyNdarrayType):
        raise _Bad(f"numpy _reconstruct of unsupported type {subtype!r:.80}")
    return np.ndarray((0,), dtype=np.uint8)


def _copyreg_reconstructor(cls, base, state):
    if not (isinstance(cls, type) and issubclass(cls, OpaqueObject)):
        raise _Bad(f"copyreg._reconstructor of unsupported class {cls!r:.80}")
    return cls.__new__(cls) if state is None else cls.__new__(cls, state)


def _copyreg_newobj(cls, *args):
    return _copyreg_reconstructor(cls, object, None) if not args else cls.__new__(cls, *args)


_TENSOR_REBUILDERS = {
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
}
_ALLOWED_CALLS = {
    **_TENSOR_REBUILDERS,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "collections.OrderedDict": _ordered_dict,
    "torch.Size": _torch_size,
    "torch.device": _torch_device,
    "_codecs.encode": _codecs_encode,
    "builtins.set": _container(set),
    "builtins.frozenset": _container(frozenset),
    "numpy.dtype": _numpy_dtype,
    "numpy.core.multiarray.scalar": _numpy_scalar,
    "numpy._core.multiarray.scalar": _numpy_scalar,
    "numpy.core.multiarray._reconstruct": _numpy_reconstruct,
    "numpy._core.multiarray._reconstruct": _numpy_reconstruct,
    "copyreg._reconstructor": _copyreg_reconstructor,
    "copyreg.__newobj__": _copyreg_newobj,
}


class _Call:
    """Immutable wrapper handed to the unpickler for one allow-listed global; calls this module's version."""

    __slots__ = ("qualname", "_func")

    def __init__(self, qualname: str):
        object.__setattr__(self, "qualname", qualname)
        object.__setattr__(self, "_func", _ALLOWED_CALLS[qualname])

    def __setattr__(self, key, value):
        raise _Bad(f"cannot set attribute {key!r:.40} on {self.qualname}")

    def __call__(self, *args, **kwargs):
        return self._func(*args, **kwargs)

    def __repr__(self):
        return f"<allowed {self.qualname}>"


class OpaqueObject:
    """Inert stand-in for an instance of a class (or the result of a call) outside the allow-list.

    `qualname` is the pickled global ("argparse.Namespace", "posix.system", ...). The instance only records what
    the pickle tried to do with it: `args` / `kwargs` (constructor or call arguments), `state` (the BUILD state,
    e.g. the attribute dict of a Namespace), `dict_items` (list of (key, value) from SETITEM(S)) and
    `list_items` (APPEND(S)). `called` is True when the pickle called the global (REDUCE / INST), False when it
    only allocated an instance (NEWOBJ). Nothing is ever executed.
    """

    __slots__ = ("args", "kwargs", "state", "dict_items", "list_items", "called")
    qualname = "OpaqueObject"

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        for key, value in (
            ("args", args),
            ("kwargs", kwargs),
            ("state", None),
            ("dict_items", []),
            ("list_items", []),
            ("called", False),
        ):
            object.__setattr__(self, key, value)
        return self

    def __init__(self, *args, **kwargs):
        object.__setattr__(self, "called", True)

    def __setattr__(self, key, value):
        raise _Bad(f"cannot set attribute {key!r:.40} on opaque {self.qualname}")

    def __setstate__(self, state):
        object.__setattr__(self, "state", state)

    def __setitem__(self, key, value):
        self.dict_items.append((key, value))

    def append(self, value):
        self.list_items.append(value)

    def extend(self, values):
        self.list_items.extend(values)

    def __repr__(self):
        return f"<OpaqueObject {self.qualname}{' (called)' if self.called else ''}>"


# --------------------------------------------------------------------------------------------------------------
# the restricted unpickler
# --------------------------------------------------------------------------------------------------------------


class _Unpickler(pickle.Unpickler):
    """Unpickler that resolves globals only through the allow-list and storages through `load_storage`."""

    def __init__(self, file, *, strict: bool, load_storage=None):
        super().__init__(file, encoding="utf-8")
        self._strict = strict
        self._load_storage = load_storage
        self._opaque_types: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        # Python 2 names (protocol 2 writes "__builtin__", "copy_reg", "commands" ...), mapped as pickle does.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        qualname = f"{module}.{name}"
        if qualname in _ALLOWED_CALLS:
            return _Call(qualname)
        if module in _STORAGE_MODULES and name in _STORAGE_TYPES:
            return _StorageType(qualname, _STORAGE_TYPES[name])
        if module == "torch" and name in _TORCH_DTYPES:
            return _TorchDType(qualname, _TORCH_DTYPES[name])
        if qualname in ("numpy.ndarray", "numpy.core.multiarray.ndarray", "numpy._core.multiarray.ndarray"):
            return _NumpyNdarrayType(qualname)
        return self._opaque(qualname)

    def _opaque(self, qualname: str) -> type:
        if self._strict:
            raise _Bad(f"refusing global {qualname} (not in the allow-list; strict=True)")
        if qualname not in self._opaque_types:
            self._opaque_types[qualname] = type("Opaque", (OpaqueObject,), {"__slots__": (), "qualname": qualname})
        return self._opaque_types[qualname]

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid:
            raise _Bad(f"unsupported persistent id {pid!r:.80}")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module" and len(pid) == 4:  # legacy: a pickled nn.Module class with its source code
            if not isinstance(pid[1], type) or not issubclass(pid[1], OpaqueObject):
                raise _Bad(f"unsupported module persistent id {pid[1]!r:.80}")
            return pid[1]
        if kind != "storage" or self._load_storage is None:
            raise _Bad(f"unsupported persistent id {kind!r:.40}")
        storage_type = pid[1]
        if not isinstance(storage_type, _StorageType):
            raise _Bad(f"persistent storage id with unsupported storage type {storage_type!r:.80}")
        return self._load_storage(storage_type.code, pid[2:])


def _check_numel(numel: Any) -> int:
    if not isinstance(numel, int) or numel < 0:
        raise _Bad(f"storage size must be a non-negative int, got {numel!r:.80}")
    return numel


def _read_member(archive: zipfile.ZipFile, name: str, archive_bytes: int) -> bytes:
    """One zip member; refuses members that would inflate to more than 64x the archive (zip bombs)."""
    size = archive.getinfo(name).file_size
    if size > 64 * max(archive_bytes, 1 << 16):
        raise _Bad(f"zip member {name!r} would inflate to {size} bytes (archive has {archive_bytes})")
    return archive.read(name)


def _read_zip(data: bytes, strict: bool) -> Any:
    archive = zipfile.ZipFile(io.BytesIO(data))
    names = archive.namelist()
    pickles = [n for n in names if n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1)]
    if not pickles:
        raise _Bad("zip archive without a <prefix>/data.pkl member: not a torch zip checkpoint")
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = _read_member(archive, prefix + "byteorder", len(data)) if prefix + "byteorder" in names else b"little"
    byteorder = byteorder.decode("ascii", errors="replace")
    if byteorder not in ("little", "big"):
        raise _Bad(f"unknown byteorder {byteorder!r:.20}")
    storages: dict[str, _Storage] = {}

    def load_storage(code: str, rest: tuple) -> _Storage:
        if len(rest) != 3:
            raise _Bad(f"zip-format storage id must be (type, key, location, numel), got {len(rest) + 1} fields")
        key, _location, numel = str(rest[0]), rest[1], _check_numel(rest[2])
        if key not in storages:
            member = f"{prefix}data/{key}"
            if member not in names:
                raise _Bad(f"storage {member!r} is missing from the archive")
            raw = _read_member(archive, member, len(data))
            nbytes = numel * _itemsize(code)
            if len(raw) < nbytes:
                raise _Bad(f"storage {member!r} has {len(raw)} bytes, expected {nbytes}")
            storages[key] = _Storage(raw[:nbytes], code, byteorder == "little")
        return storages[key]

    stream = io.BytesIO(_read_member(archive, pickles[0], len(data)))
    return _Unpickler(stream, strict=strict, load_storage=load_storage).load()


def _read_legacy(data: bytes, strict: bool) -> Any:
    stream = io.BytesIO(data)
    try:
        magic = _Unpickler(stream, strict=True).load()
    except Exception as exc:
        raise _Bad("not a PyTorch checkpoint (neither the zip nor the legacy pickle format)") from exc
    if magic != _LEGACY_MAGIC:
        raise _Bad("not a PyTorch checkpoint (the legacy magic number is missing)")
    protocol = _Unpickler(stream, strict=True).load()
    if protocol != _LEGACY_PROTOCOL:
        raise _Bad(f"unsupported legacy protocol version {protocol!r:.40}")
    sys_info = _Unpickler(stream, strict=True).load()
    if not isinstance(sys_info, dict):
        raise _Bad("malformed legacy sys_info block")
    little = bool(sys_info.get("little_endian", True))
    start = stream.tell()

    # Pass 1 (probe): the raw storages follow the object pickle, so first learn each storage's dtype and size.
    specs: dict[str, tuple[str, int]] = {}
    views: dict[str, _Storage] = {}

    def probe_storage(code: str, rest: tuple) -> _Storage:
        if len(rest) != 4:
            raise _Bad(f"legacy storage id must have 5 fields, got {len(rest) + 1}")
        key, _location, numel, _view = str(rest[0]), rest[1], _check_numel(rest[2]), rest[3]
        specs.setdefault(key, (code, numel))
        return _Storage(None, code, little)

    _Unpickler(stream, strict=strict, load_storage=probe_storage).load()
    keys = _Unpickler(stream, strict=True).load()
    if not isinstance(keys, list) or set(map(str, keys)) != set(specs):
        raise _Bad("legacy storage key list does not match the storages used by the pickle")
    storages: dict[str, _Storage] = {}
    order = "<" if little else ">"
    for key in map(str, keys):
        code, numel = specs[key]
        header = stream.read(8)
        if len(header) != 8:
            raise _Bad(f"truncated before storage {key}")
        (count,) = struct.unpack(order + "q", header)
        if count != numel:
            raise _Bad(f"storage {key} holds {count} elements, the pickle expects {numel}")
        raw = stream.read(count * _itemsize(code))
        if len(raw) != count * _itemsize(code):
            raise _Bad(f"truncated inside storage {key}")
        storages[key] = _Storage(raw, code, little)

    # Pass 2: rebuild the object with the storages (views into a root storage are legacy "view_metadata").
    def load_storage(code: str, rest: tuple) -> _Storage:
        root = storages[str(rest[0])]
        view = rest[3]
        if view is None:
            return root
        if not (isinstance(view, tuple) and len(view) == 3 and all(isinstance(v, int) for v in view[1:])):
            raise _Bad(f"malformed legacy storage view {view!r:.80}")
        view_key, offset, size = str(view[0]), view[1], view[2]
        if view_key not in views:
            size_b, offset_b = size * _itemsize(root.code), offset * _itemsize(root.code)
            if offset < 0 or size < 0 or offset_b + size_b > len(root.raw):
                raise _Bad(f"storage view {view_key} reaches outside storage {rest[0]}")
            views[view_key] = _Storage(root.raw[offset_b : offset_b + size_b], root.code, little)
        return views[view_key]

    stream.seek(start)
    return _Unpickler(stream, strict=strict, load_storage=load_storage).load()


def read_torch_checkpoint(source: str | os.PathLike | bytes, *, strict: bool = False, name: str | None = None) -> Any:
    """Read a `torch.save` file (zip or legacy format) into containers with numpy arrays, never running code.

    Args:
      source: path of the checkpoint, or its raw bytes.
      strict: if True, any pickled global outside the allow-list raises `CheckpointError`; if False (default) it
        becomes an inert `OpaqueObject` (see the module docstring).
      name: how to call the file in error messages (default: the path, or "<bytes>").

    Returns:
      The saved object: dicts (`OrderedDict` where torch used one), lists, tuples, scalars, strings and
      `numpy.ndarray` for every tensor (dtype and shape of the tensor; bfloat16 -> float32).

    Raises:
      CheckpointError: unreadable, truncated, corrupted or unsafe file (message starts with `name`).
    """
    if name is None:
        name = "<bytes>" if isinstance(source, bytes | bytearray) else os.fspath(source)
    try:
        data = bytes(source) if isinstance(source, bytes | bytearray) else Path(source).read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{name}: cannot read checkpoint ({exc.strerror or exc})") from exc
    try:
        if data[:4] == b"PK\x03\x04":
            return _read_zip(data, strict)
        if data[257:262] == b"ustar":
            raise _Bad("tar-format torch checkpoint (torch < 0.4) is not supported")
        return _read_legacy(data, strict)
    except Exception as exc:  # every parse failure becomes a CheckpointError naming the file
        detail = (
            str(exc) if isinstance(exc, _Bad) else f"corrupted or truncated checkpoint ({type(exc).__name__}: {exc})"
        )
        raise CheckpointError(f"{name}: {detail}") from exc


def read_torch_checkpoint_from_zip(zip_path: str | os.PathLike, member: str, *, strict: bool = False) -> Any:
    """Read the torch file `member` stored inside the zip archive `zip_path` (e.g. a figshare ALIGNN model zip).

    Errors name both files as `<zip_path>::<member>`.
    """
    name = f"{os.fspath(zip_path)}::{member}"
    try:
        with zipfile.ZipFile(zip_path) as archive:
            data = _read_member(archive, member, os.path.getsize(zip_path))
    except (OSError, zipfile.BadZipFile, KeyError, _Bad) as exc:
        raise CheckpointError(f"{name}: cannot read the member from the zip archive ({exc})") from exc
    return read_torch_checkpoint(data, strict=strict, name=name)
