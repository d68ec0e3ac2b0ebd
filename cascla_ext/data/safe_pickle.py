"""Read the ``iemocap`` and ``cosmic`` pickles as data only.

``pickle.load`` runs whatever callable a file names (``os.system`` as
readily as ``list``), and CPython's C unpickler allocates whatever length a
corrupt file declares before it reads the bytes (a 170-byte file can ask
for gigabytes). ``load_pickle`` reads instead with ``SafeUnpickler``:

- Only the globals in ``ALLOWED_GLOBALS`` load: the few builtins that
  Python 2 and Python 3 pickles name for sets, bytes, bytearrays and complex
  numbers, ``collections.OrderedDict``, and numpy's array, dtype and scalar
  reconstruction (under ``numpy.core.*`` and ``numpy._core.*``). Any other
  global (``os.system``, ``builtins.eval``, ``copyreg._reconstructor``, a
  class of some package, ...) and every persistent id is refused with a
  ``DataError`` naming the file and the global. Nothing a file names is
  imported.
- Arrays and scalars are of plain dtypes only (bool, ints, floats, complex,
  bytes, str, raw void): object dtypes (``'O'``, or a field of one) are
  refused before any data goes into them, and so are structured, subarray
  and datetime dtypes, whose pickled state numpy applies unchecked (some
  corrupt states crash the process). A dtype's state is set once, right
  after it is made, before anything uses it; an array's data must match its
  shape and dtype byte for byte.
- Memory stays within a small multiple of the file's size: the whole file
  is read (files larger than ``max_bytes``, default ``MAX_PICKLE_BYTES``,
  are refused) and unpickled from memory by the pure-Python unpickler,
  whose reads never return more than the file holds and whose memo is a
  dict, so a declared length of 2**40 fails at once instead of allocating
  it, and a memo index of 2**32 costs one dict entry.
  ``BYTEARRAY8`` (which would allocate first) is read like the others, and
  no array may span more bytes than the file has.
- Tuples nested deeper than ``MAX_NESTING`` (hashing them would overflow
  the C stack) and results nested deeper than that are refused.
- Any other failure of a corrupt file (truncation, a bad opcode, an
  impossible shape, ``MemoryError``, ``RecursionError``, ...) is one
  ``DataError``: ``"<path>: not a readable pickle (<type>: <message>)"``.

``load_pickle(path, allow_unsafe=True)`` (the readers' ``unsafe_pickle=True``,
``--unsafe-pickle`` on the command line) uses plain ``pickle.load`` and
runs whatever the file says: only for a file you trust.
"""

from __future__ import annotations

import io
import math
import pickle
import struct
import sys
import warnings
from collections import OrderedDict
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from .raw import DataError

try:  # numpy >= 2 (also what pickles written by numpy 1.x name, via ``numpy.core``)
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
    from numpy._core.multiarray import scalar as _np_scalar
    from numpy._core.numeric import _frombuffer as _np_frombuffer
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct
    from numpy.core.multiarray import scalar as _np_scalar
    from numpy.core.numeric import _frombuffer as _np_frombuffer

__all__ = ["ALLOWED_GLOBALS", "MAX_NESTING", "MAX_PICKLE_BYTES", "SafeUnpickler", "load_pickle", "safe_loads"]

#: Files larger than this are refused (``load_pickle(max_bytes=...)`` changes it per call).
MAX_PICKLE_BYTES = 4 * 2**30
#: Tuples (and the unpickled result) may nest at most this deep.
MAX_NESTING = 100

_NUMPY_CORE = ("numpy.core", "numpy._core")

#: Every global a pickle may name, and why it is there. Python 2 pickles say
#: ``__builtin__`` where Python 3 says ``builtins``.
ALLOWED_GLOBALS: dict[tuple[str, str], str] = {
    **{(m, "set"): "sets in protocols 0-3" for m in ("builtins", "__builtin__")},
    **{(m, "frozenset"): "frozensets in protocols 0-3" for m in ("builtins", "__builtin__")},
    **{(m, "complex"): "complex numbers" for m in ("builtins", "__builtin__")},
    **{(m, "bytes"): "empty bytes in Python 3 protocols 0-2 (bytes() or bytes(b'...') only)"
       for m in ("builtins", "__builtin__")},
    **{(m, "bytearray"): "bytearrays in protocols 0-4 (from bytes or a latin-1 str only, never a size)"
       for m in ("builtins", "__builtin__")},
    ("_codecs", "encode"): "bytes in Python 3 protocols 0-2 (latin-1 only)",
    ("collections", "OrderedDict"): "ordered dicts",
    ("numpy", "ndarray"): "the array type handed to _reconstruct (not callable itself)",
    ("numpy", "dtype"): "array item types, from a type string; plain kinds only (see _PLAIN_KINDS)",
    **{(f"{c}.multiarray", "_reconstruct"): "arrays in protocols 0-4 (an empty array, then its state)"
       for c in _NUMPY_CORE},
    **{(f"{c}.multiarray", "scalar"): "numpy scalars (np.float32(1.5), np.int64(3), ...)"
       for c in _NUMPY_CORE},
    **{(f"{c}.numeric", "_frombuffer"): "contiguous arrays in protocol 5" for c in _NUMPY_CORE},
}

_HATCH = "pass unsafe_pickle=True (CLI: --unsafe-pickle) only for a file you trust"
#: The dtype kinds an array or scalar may have: bool, signed and unsigned ints, floats, complex, bytes,
#: str and raw bytes (void). Not structured or subarray dtypes, dtypes with metadata, datetimes (numpy's
#: checks of their pickled state are not to be trusted with a corrupt file: some crash the process),
#: object or variable-width string dtypes (they hold pointers).
_PLAIN_KINDS = frozenset("biufcSUV")
_CONTAINERS = (list, tuple, dict, set, frozenset)


class _NdarrayName:
    """What ``numpy.ndarray`` stands for in a pickle: ``_reconstruct``'s first argument, not a callable
    (calling ``numpy.ndarray(shape)`` would allocate whatever shape a file asks for)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "numpy.ndarray"


_NDARRAY = _NdarrayName()


def _printable(text: str, limit: int = 200) -> str:
    return text if text.isprintable() and len(text) <= limit else repr(text[:limit])


def _is_latin1(encoding: Any) -> bool:
    return isinstance(encoding, str) and encoding.lower().replace("-", "").replace("_", "") in (
        "latin1", "iso88591", "l1")


def _bytes(*args):
    if not args:
        return b""
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
        return bytes(args[0])
    raise pickle.UnpicklingError("bytes(...) takes no argument or bytes here")


def _bytearray(*args):
    if not args:
        return bytearray()
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
        return bytearray(args[0])
    if len(args) == 2 and isinstance(args[0], str) and _is_latin1(args[1]):
        return bytearray(args[0], "latin-1")
    raise pickle.UnpicklingError("bytearray(...) takes bytes or a str and 'latin-1' here")


def _codecs_encode(obj, encoding="utf-8", errors="strict"):
    if isinstance(obj, str) and _is_latin1(encoding) and errors == "strict":
        return obj.encode("latin-1")
    raise pickle.UnpicklingError("_codecs.encode(...) takes a str and 'latin1' here")


def _check_dtype(d: Any) -> np.dtype:
    """``d`` if it is a numpy dtype of one of the ``_PLAIN_KINDS``, else raise."""
    if not isinstance(d, np.dtype):
        raise pickle.UnpicklingError(f"expected a numpy dtype, got a {type(d).__name__}")
    if d.hasobject or d.kind == "O":
        raise _ObjectDtype(d)
    if d.kind not in _PLAIN_KINDS or d.fields is not None or d.subdtype is not None or d.metadata is not None:
        raise pickle.UnpicklingError(f"numpy dtype {_describe(d)} is not supported here (only plain numbers, "
                                     "booleans, bytes and str)")
    return d


def _describe(d: Any) -> str:
    try:
        return _printable(repr(str(d)), 80)
    except Exception:  # noqa: BLE001 - a dtype too odd to print is described by its kind
        return f"of kind {getattr(d, 'kind', '?')!r}"


class _ObjectDtype(Exception):
    """A dtype that would hold Python objects (turned into a DataError naming the file)."""

    def __init__(self, d: Any):
        super().__init__(d)
        self.what = _describe(d)


class SafeUnpickler(pickle._Unpickler):
    """An unpickler that builds data only (see the module docstring for what that means).

    It is the pure-Python ``pickle._Unpickler`` (2-4 times slower than the
    C one), because the C one cannot be kept from allocating declared
    lengths or from resizing its memo to any index a file names (on Python
    3.11 a 12-byte file takes 4 GiB), nor can its BUILD opcode be checked
    (numpy's ``dtype.__setstate__`` crashes the process on some corrupt
    states). Read from an in-memory file (``safe_loads``) so that no read
    returns more than the file holds. ``size_limit``: the most bytes one
    array may span (``safe_loads`` passes the size of the data).
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, *, source: str = "<pickle>", size_limit: int = MAX_PICKLE_BYTES):
        super().__init__(file, encoding="latin1")
        self._source = source
        self._size_limit = size_limit
        # Objects whose state may still be set (by BUILD), once: dtypes from numpy.dtype(...) that
        # no array or scalar uses yet, and arrays from _reconstruct. id -> object (kept alive, so an
        # id is not reused while it is here).
        self._fresh_dtypes: dict[int, np.dtype] = {}
        self._fresh_arrays: dict[int, np.ndarray] = {}
        # Tuples holding tuples: id -> (tuple, nesting depth). Tuples not here hold no tuple.
        self._tuple_depth: dict[int, tuple[tuple, int]] = {}
        builtins = {"set": set, "frozenset": frozenset, "complex": complex, "bytes": _bytes,
                    "bytearray": _bytearray}
        numpy_core = {"_reconstruct": self._reconstruct, "scalar": self._scalar, "_frombuffer": self._frombuffer}
        self._globals = {}
        for module, name in ALLOWED_GLOBALS:
            if module in ("builtins", "__builtin__"):
                target = builtins[name]
            elif module == "_codecs":
                target = _codecs_encode
            elif module == "collections":
                target = OrderedDict
            elif module == "numpy":
                target = _NDARRAY if name == "ndarray" else self._dtype
            else:
                target = numpy_core[name]
            self._globals[module, name] = target

    # ------------------------------------------------------------------ refusals

    def _refuse(self, what: str) -> DataError:
        return DataError(f"{self._source}: refused to load {what} from this pickle (pickles are read as "
                         f"data only; {_HATCH})")

    def find_class(self, module: str, name: str) -> Any:
        target = self._globals.get((module, name))
        if target is None:
            raise self._refuse(f"the global {_printable(f'{module}.{name}')}")
        return target

    def persistent_load(self, pid: Any) -> Any:
        raise self._refuse(f"a persistent id ({_printable(str(pid))})")

    # ------------------------------------------------------------------ numpy

    def _use_dtype(self, d: Any) -> np.dtype:
        """A dtype about to be used by an array or a scalar: checked, and no longer open to BUILD
        (its state must not change under whatever uses it)."""
        if isinstance(d, np.dtype):
            self._fresh_dtypes.pop(id(d), None)
        return _check_dtype(d)

    def _nbytes(self, shape: Any, d: np.dtype) -> tuple[tuple[int, ...], int]:
        """(shape, bytes an array of that shape and dtype spans); raises for a shape that is not
        one or spans more than ``size_limit`` bytes."""
        if isinstance(shape, int) and not isinstance(shape, bool):
            shape = (shape,)
        if (not isinstance(shape, tuple) or len(shape) > 64
                or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in shape)):
            raise pickle.UnpicklingError(f"array shape {_printable(repr(shape), 80)} is not a tuple of "
                                         "non-negative ints")
        n = math.prod(shape) * d.itemsize
        if n > self._size_limit:
            raise pickle.UnpicklingError(f"an array of shape {shape} and dtype {d} would span {n} bytes, "
                                         f"more than the {self._size_limit} bytes of the pickle")
        return shape, n

    def _dtype(self, spec: Any, align: Any = False, copy: Any = True) -> np.dtype:
        if isinstance(spec, bytes):
            spec = spec.decode("latin-1")
        if not isinstance(spec, str) or not isinstance(align, int) or not isinstance(copy, int):
            raise pickle.UnpicklingError("numpy.dtype(...) takes a type string here")
        # A new dtype every time (copy=True), so that BUILD never sets the state of a shared one.
        d = _check_dtype(np.dtype(spec, align=bool(align), copy=True))
        self._fresh_dtypes[id(d)] = d
        return d

    def _reconstruct(self, subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
        if subtype is not _NDARRAY:
            raise pickle.UnpicklingError("numpy's _reconstruct builds numpy.ndarray only")
        if isinstance(dtype, (str, bytes)):
            dtype = np.dtype(dtype.decode("latin-1") if isinstance(dtype, bytes) else dtype)
        d = self._use_dtype(dtype)
        shape, _ = self._nbytes(shape, d)
        a = _np_reconstruct(np.ndarray, shape, d)
        self._fresh_arrays[id(a)] = a
        return a

    def _scalar(self, dtype: Any, data: Any = None) -> Any:
        d = self._use_dtype(dtype)
        if not isinstance(data, (bytes, str)) or len(data) != d.itemsize:
            raise pickle.UnpicklingError(f"a numpy scalar of dtype {d} needs {d.itemsize} bytes of data")
        return _np_scalar(d, data)

    def _frombuffer(self, buf: Any, dtype: Any, shape: Any, order: Any = "C", axis_order: Any = None) -> np.ndarray:
        d = self._use_dtype(dtype)
        shape, n = self._nbytes(shape, d)
        if not isinstance(buf, (bytes, bytearray, memoryview)) or memoryview(buf).nbytes != n:
            raise pickle.UnpicklingError(f"array data does not fit shape {shape} of dtype {d}")
        if order not in ("C", "F", "K"):
            raise pickle.UnpicklingError(f"array order {_printable(repr(order), 20)} is not 'C', 'F' or 'K'")
        if axis_order is None:  # numpy < 2.4 takes no axis_order
            return _np_frombuffer(buf, d, shape, order)
        if not isinstance(axis_order, tuple) or sorted(axis_order) != list(range(len(shape))):
            raise pickle.UnpicklingError(f"axis order {_printable(repr(axis_order), 80)} is not a permutation "
                                         f"of the {len(shape)} axes")
        return _np_frombuffer(buf, d, shape, order, axis_order)

    def _set_array_state(self, a: np.ndarray, state: Any) -> None:
        if (not isinstance(state, tuple) or len(state) not in (4, 5)
                or (len(state) == 5 and (type(state[0]) is not int or state[0] != 1))
                or not isinstance(state[-2], int)):
            raise pickle.UnpicklingError("an array's state is not numpy's (1, shape, dtype, is_fortran, data)")
        shape, dtype, _, data = state[-4:]
        d = self._use_dtype(dtype)
        shape, n = self._nbytes(shape, d)
        if not isinstance(data, (bytes, bytearray, str)) or len(data) != n:
            got = f"{len(data)} bytes" if isinstance(data, (bytes, bytearray, str)) else \
                f"a {type(data).__name__}"
            raise pickle.UnpicklingError(f"an array of shape {shape} and dtype {d} needs {n} bytes of "
                                         f"data, got {got}")
        np.ndarray.__setstate__(a, state)

    def _set_dtype_state(self, d: np.dtype, state: Any) -> None:
        # numpy's dtype.__setstate__ trusts its argument (a 6-item state crashes the process), so it only
        # ever gets numpy's own state of ``d`` (a plain dtype), with the file's byte order; the file's
        # state must be that, as numpy writes it: (3, byte order, None, None, None, item size or -1,
        # alignment or -1, flags).
        canon = d.__reduce__()[2]
        if (not isinstance(state, tuple) or len(state) != 8 or type(state[0]) is not int or state[0] != 3
                or any(x is not None for x in state[2:5])):
            raise pickle.UnpicklingError("a numpy dtype's state is not (3, byte order, None, None, None, "
                                         "item size, alignment, flags) (structured dtypes are not supported)")
        endian, elsize, alignment, flags = state[1], state[5], state[6], state[7]
        orders = ("|",) if canon[1] == "|" else ("<", ">", "=")
        if not isinstance(endian, str) or endian not in orders:
            raise pickle.UnpicklingError(f"byte order {_printable(repr(endian), 20)} for numpy dtype {d}")
        if (type(elsize) is not int or elsize not in (-1, d.itemsize) or type(alignment) is not int
                or alignment not in (-1, d.alignment) or type(flags) is not int):
            raise pickle.UnpicklingError(f"item size {_printable(repr(elsize), 20)} or alignment "
                                         f"{_printable(repr(alignment), 20)} do not fit numpy dtype {d}")
        d.__setstate__((3, endian, None, None, None, *canon[5:8]))
        _check_dtype(d)

    # ------------------------------------------------------------------ opcodes

    def load_build(self) -> None:
        stack = self.stack
        state = stack.pop()
        inst = stack[-1]
        if isinstance(inst, np.dtype):
            if self._fresh_dtypes.pop(id(inst), None) is not inst:
                raise pickle.UnpicklingError("BUILD on a numpy dtype that was not just made or is in use")
            self._set_dtype_state(inst, state)
        elif type(inst) is np.ndarray:
            if self._fresh_arrays.pop(id(inst), None) is not inst:
                raise pickle.UnpicklingError("BUILD on a numpy array that _reconstruct did not just make")
            self._set_array_state(inst, state)
        else:
            raise pickle.UnpicklingError(f"BUILD (setting the state of a {type(inst).__name__}) is not "
                                         "allowed here")
    dispatch[pickle.BUILD[0]] = load_build

    def load_bytearray8(self) -> None:
        # The base class allocates the declared length before reading; read first instead.
        n, = struct.unpack("<Q", self.read(8))
        if n > sys.maxsize:
            raise pickle.UnpicklingError(f"BYTEARRAY8 of {n} bytes exceeds the system's maximum size")
        data = self.read(n)
        if len(data) != n:
            raise pickle.UnpicklingError("pickle data was truncated")
        self.append(bytearray(data))
    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8

    def _made_tuple(self, t: tuple) -> None:
        depth = 0
        for x in t:
            if type(x) is tuple and x:
                entry = self._tuple_depth.get(id(x))
                dx = entry[1] if entry is not None else 1
                if dx > depth:
                    depth = dx
        if depth:
            depth += 1
            if depth > MAX_NESTING:
                raise pickle.UnpicklingError(f"tuples nested deeper than {MAX_NESTING} levels")
            self._tuple_depth[id(t)] = (t, depth)

    def load_tuple(self) -> None:
        t = tuple(self.pop_mark())
        self._made_tuple(t)
        self.append(t)
    dispatch[pickle.TUPLE[0]] = load_tuple

    def load_tuple1(self) -> None:
        t = (self.stack[-1],)
        self._made_tuple(t)
        self.stack[-1] = t
    dispatch[pickle.TUPLE1[0]] = load_tuple1

    def load_tuple2(self) -> None:
        t = (self.stack[-2], self.stack[-1])
        self._made_tuple(t)
        self.stack[-2:] = [t]
    dispatch[pickle.TUPLE2[0]] = load_tuple2

    def load_tuple3(self) -> None:
        t = (self.stack[-3], self.stack[-2], self.stack[-1])
        self._made_tuple(t)
        self.stack[-3:] = [t]
    dispatch[pickle.TUPLE3[0]] = load_tuple3


def _children(x: Any):
    return chain.from_iterable(x.items()) if isinstance(x, dict) else iter(x)


def _check_result(root: Any, limit: int = MAX_NESTING) -> None:
    """Raise if ``root`` nests containers deeper than ``limit`` or holds a numpy array or scalar
    whose dtype is not plain (BUILD and the numpy wrappers already prevent that: defence in depth)."""
    def leaf(x: Any) -> None:
        if isinstance(x, (np.ndarray, np.generic)):
            _check_dtype(x.dtype)

    if not isinstance(root, _CONTAINERS):
        leaf(root)
        return
    height: dict[int, int] = {}  # id -> nesting below and including it; every object stays alive in root
    on_path = {id(root)}
    stack = [[root, _children(root), 0]]
    while stack:
        frame = stack[-1]
        for child in frame[1]:
            if isinstance(child, _CONTAINERS):
                cid = id(child)
                h = height.get(cid)
                if h is not None:
                    if len(stack) + h > limit:
                        raise pickle.UnpicklingError(f"data nested deeper than {limit} levels")
                    frame[2] = max(frame[2], h)
                elif cid not in on_path:  # a container inside itself is a cycle, not depth
                    if len(stack) >= limit:
                        raise pickle.UnpicklingError(f"data nested deeper than {limit} levels")
                    on_path.add(cid)
                    stack.append([child, _children(child), 0])
                    break
            else:
                leaf(child)
        else:
            stack.pop()
            on_path.discard(id(frame[0]))
            h = frame[2] + 1
            height[id(frame[0])] = h
            if stack:
                stack[-1][2] = max(stack[-1][2], h)


def _unreadable(source: Any, err: BaseException) -> DataError:
    try:
        msg = " ".join(str(err).split())
    except Exception:  # noqa: BLE001 - a message that cannot be printed is left out
        msg = ""
    if len(msg) > 300:
        msg = msg[:300] + "..."
    if not msg and isinstance(err, EOFError):
        msg = "the data ends before the pickle does"
    return DataError(f"{source}: not a readable pickle ({type(err).__name__}{': ' + msg if msg else ''})")


def safe_loads(data: bytes, source: Any = "<pickle>") -> Any:
    """Unpickle ``data`` as data only (``SafeUnpickler``); every failure is a DataError naming ``source``."""
    unpickler = SafeUnpickler(io.BytesIO(data), source=str(source), size_limit=len(data))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy's deprecations of old type strings are not the file's fault
            obj = unpickler.load()
            _check_result(obj)
        return obj
    except DataError:
        raise
    except _ObjectDtype as err:
        raise DataError(f"{source}: refused to load a numpy array or dtype holding Python objects (dtype "
                        f"{err.what}) from this pickle (pickles are read as data only; {_HATCH})") from None
    except Exception as err:  # noqa: BLE001 - MemoryError, RecursionError, struct.error, ...: all corrupt data
        raise _unreadable(source, err) from None
    finally:
        # The unpickler refers to itself (its bound methods stand for numpy's functions): drop its memo,
        # stack and bookkeeping now rather than when the garbage collector finds the cycle.
        vars(unpickler).clear()


def load_pickle(path: str | Path, allow_unsafe: bool = False, *, max_bytes: int = MAX_PICKLE_BYTES) -> Any:
    """Unpickle ``path`` as data only (Python 2 pickles too: ``encoding="latin1"``) or raise DataError.

    Only ``ALLOWED_GLOBALS`` load; anything else the file names is refused,
    as are object arrays and files over ``max_bytes`` bytes; a corrupt file
    is one DataError, with memory bounded by the file's size.

    ``allow_unsafe=True`` uses plain ``pickle.load``, which runs any code the
    file names: only for a file you trust.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if allow_unsafe:
            with open(path, "rb") as fh:
                try:
                    return pickle.load(fh, encoding="latin1")
                except Exception as err:  # noqa: BLE001 - as safe_loads
                    raise _unreadable(path, err) from None
        if size > max_bytes:
            raise DataError(f"{path}: {size} bytes is more than the {max_bytes} bytes a pickle may have "
                            "(load_pickle's max_bytes)")
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a pickle") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read it ({err.strerror or err})") from None
    return safe_loads(data, path)
