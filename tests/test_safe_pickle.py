"""Pickles are read as data only (cascla_ext/data/safe_pickle.py): no code runs, object arrays are
refused, and a corrupt file is one DataError with bounded memory.

The memory and fuzz checks run in a subprocess under an address-space limit (RLIMIT_AS), so that a
regression fails the test instead of taking the machine down or crashing pytest. That subprocess
imports only ``cascla_ext.data``'s pickle modules (numpy, not torch): its baseline is small and the
limit is that baseline plus 1 GiB.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import shlex
import struct
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

from cascla_ext.data import iemocap as iemocap_module
from cascla_ext.data.cosmic import read_cosmic
from cascla_ext.data.iemocap import read_iemocap
from cascla_ext.data.raw import DataError
from cascla_ext.data.readers import read_raw
from cascla_ext.data.safe_pickle import ALLOWED_GLOBALS, load_pickle
from test_readers import IEMOCAP_PKL, fake_cosmic, iemocap_obj, write_pickle

ROOT = Path(__file__).resolve().parents[1]
LINUX = sys.platform.startswith("linux")


class RunsCode:
    """Unpickling this calls ``func(*args)``: what a malicious pickle does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class Plain:
    """A class of some package (pickled as copy_reg._reconstructor in protocols 0-1, NEWOBJ after)."""

    def __init__(self):
        self.x = 1


def writes_marker(marker: Path, returns: str = "M") -> RunsCode:
    """``eval`` of an expression that creates ``marker`` and gives ``returns`` (a harmless payload)."""
    return RunsCode(eval, f"(open({str(marker)!r}, 'w').write('ran'), {returns!r})[1]")


def attacks(marker: Path) -> list[tuple[str, RunsCode]]:
    """(the name the refusal must give, an object whose unpickling would create ``marker``)."""
    return [
        ("system", RunsCode(os.system, f"touch {shlex.quote(str(marker))}")),
        ("eval", writes_marker(marker)),
        ("check_call", RunsCode(subprocess.check_call, ["touch", str(marker)])),  # commands.* in protocols 0-2
    ]


def refused(path: Path, name: str, fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert str(path) in msg and "refused to load the global" in msg and name in msg, msg
    assert "unsafe_pickle=True" in msg and "--unsafe-pickle" in msg, msg
    return msg


# =========================================================================== no code runs

@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_code_is_refused(tmp_path, protocol):
    marker = tmp_path / "marker"
    for name, attack in attacks(marker):
        p = tmp_path / "evil.pkl"
        p.write_bytes(pickle.dumps({"a": [1, attack]}, protocol=protocol))
        refused(p, name, load_pickle, p)
        assert not marker.exists(), f"{name} ran"
    # a class from elsewhere is not data either: copy_reg._reconstructor (protocols 0-1) or the class
    p.write_bytes(pickle.dumps(Plain(), protocol=protocol))
    refused(p, "copy_reg._reconstructor" if protocol < 2 else "Plain", load_pickle, p)
    # nor is a persistent id
    for data in (b"Pfile\n.", b"\x80\x02X\x04\x00\x00\x00fileQ."):
        p.write_bytes(data)
        with pytest.raises(DataError, match="refused to load a persistent id"):
            load_pickle(p)


def test_code_is_refused_by_the_readers(tmp_path):
    marker = tmp_path / "marker"
    for name, attack in attacks(marker):
        p = write_pickle(tmp_path / "iemocap.pkl", iemocap_obj(**{"speakers.d2": ["F", attack]}))
        refused(p, name, read_iemocap, tmp_path)
        refused(p, name, read_raw, "iemocap", p)
        assert not marker.exists()

    cosmic = tmp_path / "cosmic"
    cosmic.mkdir()
    fake_cosmic(cosmic, "iemocap", "cosmic-iemocap", n_dialogues=5)
    roberta, comet = cosmic / "iemocap_features_roberta.pkl", cosmic / "iemocap_features_comet.pkl"
    items = pickle.loads(roberta.read_bytes())
    for name, attack in attacks(marker):
        items[6]["iemocap_00"][0] = attack  # a sentence
        write_pickle(roberta, items)
        refused(roberta, name, read_cosmic, cosmic)
        assert not marker.exists()
    fake_cosmic(cosmic, "iemocap", "cosmic-iemocap", n_dialogues=5)
    write_pickle(comet, [{"iemocap_00": RunsCode(os.system, f"touch {shlex.quote(str(marker))}")}] * 9)
    refused(comet, "system", read_cosmic, cosmic)  # the COMET pickle is read as data only too
    assert not marker.exists()


def test_unsafe_pickle_is_the_explicit_escape_hatch(tmp_path):
    marker = tmp_path / "marker"
    p = write_pickle(tmp_path / "iemocap.pkl", iemocap_obj(**{"speakers.d2": ["F", writes_marker(marker)]}))
    refused(p, "eval", read_iemocap, tmp_path)
    assert not marker.exists()
    c = read_raw("iemocap", tmp_path, unsafe_pickle=True)  # read_raw forwards the option
    assert marker.read_text() == "ran" and c.splits["val"][0].speakers == ["F", "M"]

    marker.unlink()
    cosmic = tmp_path / "cosmic"
    cosmic.mkdir()
    fake_cosmic(cosmic, "iemocap", "cosmic-iemocap", n_dialogues=5)
    roberta = cosmic / "iemocap_features_roberta.pkl"
    items = pickle.loads(roberta.read_bytes())
    items[6]["iemocap_00"][0] = writes_marker(marker, returns="utt 0")
    write_pickle(roberta, items)
    refused(roberta, "eval", read_cosmic, cosmic)
    assert not marker.exists()
    c = read_cosmic(cosmic, unsafe_pickle=True)
    assert marker.read_text() == "ran"
    assert next(d for d in c.dialogues() if d.id == "iemocap_00").texts[0] == "utt 0"


def test_load_pickle_is_still_importable_from_iemocap():
    assert iemocap_module.load_pickle is load_pickle


# =========================================================================== real-looking data loads

def same(a, b) -> bool:
    """``a == b`` for the nested data of these tests, arrays compared by type, dtype, shape and values."""
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and bool((a == b).all())
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def data_sample() -> dict:
    return {
        "f32": np.arange(6, dtype=np.float32).reshape(2, 3), "f64": np.linspace(0, 1, 5),
        "i64": np.arange(-3, 3, dtype=np.int64), "bool": np.array([True, False]),
        "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "permuted": np.arange(24, dtype=np.float32).reshape(2, 3, 4).transpose(1, 0, 2),
        "big-endian": np.arange(3, dtype=">f4"), "empty": np.zeros((0, 4), np.float32),
        "str": np.array(["ab", "c"]), "bytes-array": np.array([b"ab"]),
        "scalars": [np.float32(1.5), np.float64(2.5), np.int64(3), np.bool_(True)],
        "set": {"d1", "d2"}, "frozenset": frozenset({1, 2}), "ordered": collections.OrderedDict(b=1, a=2),
        "bytes": b"\x00\xff", "no-bytes": b"", "bytearray": bytearray(b"xy"), "complex": 1 + 2j,
        "nested": [("a", 1, 2.5, None, True), {"k": [1, [2, [3]]]}],
        "ids": ["Ses01F_impro01", 7],
    }


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_data_loads_as_pickle_would(tmp_path, protocol):
    obj = data_sample()
    p = tmp_path / "data.pkl"
    p.write_bytes(pickle.dumps(obj, protocol=protocol))
    got = load_pickle(p)
    assert same(got, pickle.loads(p.read_bytes())) and same(got, {**obj, "big-endian": got["big-endian"]})
    assert np.array_equal(got["big-endian"], obj["big-endian"])  # (numpy itself may swap it to native)


class Py2Pickler(pickle._Pickler):
    """Writes as Python 2 with numpy 1.x did: str and bytes as 8-bit strings (SHORT_BINSTRING /
    BINSTRING, which load as latin-1 str), ``__builtin__`` names, ``numpy.core.multiarray``."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_8bit(self, obj):
        data = obj if isinstance(obj, bytes) else obj.encode("latin-1")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_8bit
    dispatch[str] = save_8bit


def py2_dumps(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"cnumpy._core.", b"cnumpy.core.")


def test_python2_pickle_of_numpy_arrays(tmp_path):
    obj = [{"d1": [np.full(4, 0.5, np.float32), np.arange(3, dtype=np.float64)]}, {"d1": ["M", "F"]},
           {"d1": [np.int64(3), np.float32(1.5)]}, {"d1", "d2"}, collections.OrderedDict(d1=[0, 5])]
    data = py2_dumps(obj)
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in data and b"cnumpy.core.multiarray\nscalar\n" in data
    assert b"c__builtin__\nset\n" in data and b"cnumpy._core" not in data and b"_codecs" not in data
    p = tmp_path / "py2.pkl"
    p.write_bytes(data)
    got = load_pickle(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy 2 on the numpy.core names
        assert same(got, obj) and same(got, pickle.loads(data, encoding="latin1"))


def test_real_iemocap_pickle_loads_as_pickle_would():
    if not IEMOCAP_PKL.is_file():
        pytest.skip(f"{IEMOCAP_PKL} not present")
    with open(IEMOCAP_PKL, "rb") as fh:
        assert same(load_pickle(IEMOCAP_PKL), pickle.load(fh, encoding="latin1"))


def test_every_allowed_global_is_documented():
    doc = (ROOT / "docs" / "data-formats.md").read_text()
    for module, name in ALLOWED_GLOBALS:
        assert f"`{name}`" in doc or f"{module}.{name}" in doc, (module, name)


# =========================================================================== numpy: no objects, no tricks

@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_object_arrays_are_refused(tmp_path, protocol):
    p = tmp_path / "obj.pkl"
    for obj in (np.array([1, "a"], dtype=object), np.zeros(2, [("a", "f4"), ("b", "O")]), np.dtype(object),
                [np.array([None])]):
        p.write_bytes(pickle.dumps(obj, protocol=protocol))
        with pytest.raises(DataError, match="refused to load a numpy array or dtype holding Python objects"):
            load_pickle(p)
    # through the reader, naming the file
    cosmic = tmp_path / "cosmic"
    cosmic.mkdir()
    fake_cosmic(cosmic, "iemocap", "cosmic-iemocap", n_dialogues=5, comet=False)
    roberta = cosmic / "iemocap_features_roberta.pkl"
    items = pickle.loads(roberta.read_bytes())
    items[2]["iemocap_00"] = np.array(items[2]["iemocap_00"], dtype=object)
    roberta.write_bytes(pickle.dumps(items, protocol=protocol))
    with pytest.raises(DataError, match=f"{roberta}: refused to load a numpy array or dtype holding Python"):
        read_cosmic(cosmic)


def op_global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def op_str(text: str) -> bytes:
    return b"X" + struct.pack("<I", len(text)) + text.encode()


F8 = op_global("numpy", "dtype") + op_str("f8") + b"\x89\x88\x87R"  # numpy.dtype('f8', False, True)
F8_STATE = b"(K\x03" + op_str("<") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t"  # (3, '<', N, N, N, -1, -1, 0)
SCALAR = op_global("numpy.core.multiarray", "scalar")


def test_a_dtype_cannot_change_once_used(tmp_path):
    p = tmp_path / "dtype.pkl"
    # numpy's way: make the dtype, set its state, then use it
    p.write_bytes(b"\x80\x02" + SCALAR + F8 + b"q\x01" + F8_STATE + b"b" + b"C\x08" + b"\0" * 8 + b"\x86R.")
    assert load_pickle(p) == np.float64(0.0)
    # used by a scalar first, then changed: refused
    p.write_bytes(b"\x80\x02" + F8 + b"q\x010" + SCALAR + b"h\x01C\x08" + b"\0" * 8 + b"\x86R0"
                  + b"h\x01" + F8_STATE + b"b.")
    with pytest.raises(DataError, match="BUILD on a numpy dtype that was not just made or is in use"):
        load_pickle(p)
    # a state numpy would not write (structured, a wrong item size) is refused, never handed to numpy
    for state in (b"(K\x03" + op_str("|") + b"N(" + op_str("a") + b"t}K\x08K\x01K\x00t",
                  F8_STATE.replace(b"J\xff\xff\xff\xffJ", b"K\x10J", 1)):
        p.write_bytes(b"\x80\x02" + F8 + state + b"b.")
        with pytest.raises(DataError, match="not a readable pickle"):
            load_pickle(p)
    # BUILD on anything else (here a list) is refused too
    p.write_bytes(b"\x80\x02]}b.")
    with pytest.raises(DataError, match=r"BUILD \(setting the state of a list\) is not allowed"):
        load_pickle(p)


def test_files_over_the_limit_are_refused(tmp_path):
    p = write_pickle(tmp_path / "iemocap.pkl", iemocap_obj())
    size = p.stat().st_size
    with pytest.raises(DataError, match=f"{p}: {size} bytes is more than the 100 bytes"):
        load_pickle(p, max_bytes=100)
    assert load_pickle(p, max_bytes=size) == pickle.loads(p.read_bytes())
    with pytest.raises(DataError, match="file not found"):
        load_pickle(tmp_path / "missing.pkl")


# =========================================================================== bounded memory, in a subprocess

CHILD_PRELUDE = textwrap.dedent("""\
    import json, resource, sys, time, types
    root = sys.argv[1]
    for name, sub in (("cascla_ext", ""), ("cascla_ext.data", "/data")):  # no cascla_ext/__init__ (torch)
        module = types.ModuleType(name)
        module.__path__ = [root + "/cascla_ext" + sub]
        sys.modules[name] = module
    from cascla_ext.data.iemocap import read_iemocap
    from cascla_ext.data.raw import DataError
    from cascla_ext.data.safe_pickle import load_pickle
    with open("/proc/self/status") as fh:
        vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + 2**30, vm + 2**30))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def outcome(fn, *args):
        try:
            fn(*args)
            return "loaded"
        except DataError as err:
            return "DataError" if "\\n" not in str(err) else "DataError over several lines"
        except BaseException as err:  # what must not happen
            return f"{type(err).__name__}: {err}"[:300]
""")
CHILD_END = textwrap.dedent("""\
    result["rss_growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    print(json.dumps(result))
""")


def run_child(body: str, *args: str, timeout: float = 60) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD_PRELUDE + textwrap.dedent(body) + CHILD_END,
                           str(ROOT), *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"the child exited with {proc.returncode}:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def Q(n: int) -> bytes:
    return struct.pack("<Q", n)


def I4(n: int) -> bytes:
    return struct.pack("<I", n)


class Reduces:
    """Pickles as ``func(*args)`` then, if given, BUILD with ``state``: numpy calls with chosen arguments."""

    def __init__(self, func, args, state=None):
        self.r = (func, args) if state is None else (func, args, state)

    def __reduce__(self):
        return self.r


def huge_cases() -> dict[str, bytes]:
    from numpy._core.multiarray import _reconstruct
    from numpy._core.numeric import _frombuffer
    tera = 10**12
    return {
        "BINUNICODE8 of 2**40": b"\x80\x04\x8d" + Q(2**40) + b"abc.",
        "BINBYTES8 of 2**40": b"\x80\x04\x8e" + Q(2**40) + b"abc.",
        "BYTEARRAY8 of 2**40": b"\x80\x05\x96" + Q(2**40) + b"abc.",
        "BINBYTES of 2**31": b"\x80\x03B" + I4(2**31) + b"abc.",
        "BINUNICODE of 2**32-1": b"\x80\x03X" + I4(2**32 - 1) + b"abc.",
        "BINSTRING of 2**31-1": b"\x80\x02T" + I4(2**31 - 1) + b"abc.",
        "LONG4 of 2**31-1": b"\x80\x02\x8b" + I4(2**31 - 1) + b"abc.",
        "FRAME of 2**40 then junk": b"\x80\x04\x95" + Q(2**40) + b"\xff.",
        "_reconstruct of 10**12 items": pickle.dumps(Reduces(_reconstruct, (np.ndarray, (tera,), b"b")), 2),
        "array state of 10**12 floats": pickle.dumps(Reduces(
            _reconstruct, (np.ndarray, (0,), b"b"), (1, (tera,), np.dtype("f4"), False, b"\0" * 8)), 2),
        "_frombuffer of 10**12 floats": pickle.dumps(Reduces(
            _frombuffer, (bytearray(8), np.dtype("f4"), (tera,), "C")), 5),
        # 200000 nested tuples used as a dict key: hashing them would overflow the C stack
        "tuples nested 200000 deep": b"\x80\x02}" + b")" + b"\x85" * 200_000 + b"K\x01s.",
        "lists nested 200000 deep": b"\x80\x02" + b"]" * 200_000 + b"a" * 199_999 + b".",
        # numpy's dtype.__setstate__ crashes on this 6-item state
        "dtype state of 6 items": b"\x80\x02" + F8 + b"(K\x03" + op_str("<") + b"MNN" + b"J\xff\xff\xff\xff" * 2
                                  + b"K\x00tb.",
    }


@pytest.mark.skipif(not LINUX, reason="RLIMIT_AS and /proc/self/status are Linux's")
def test_huge_declared_sizes_fail_fast_with_bounded_memory(tmp_path):
    cases = huge_cases()
    paths = []
    for i, data in enumerate(cases.values()):
        paths.append(tmp_path / f"case{i}.pkl")
        paths[-1].write_bytes(data)
    # loads that are fine but that the C unpickler would make huge: its memo grows to the index named
    fine = {"LONG_BINPUT 2**32-1": b"\x80\x02]r" + I4(2**32 - 1) + b".", "PUT 10**11": b"(lp99999999999\n."}
    for i, data in enumerate(fine.values()):
        paths.append(tmp_path / f"fine{i}.pkl")
        paths[-1].write_bytes(data)
    result = run_child("""
        result = {"outcomes": [], "seconds": []}
        for path in sys.argv[2:]:
            t = time.perf_counter()
            result["outcomes"].append(outcome(load_pickle, path))
            result["seconds"].append(time.perf_counter() - t)
    """, *map(str, paths))
    outcomes = dict(zip([*cases, *fine], result["outcomes"]))
    assert outcomes == {**{k: "DataError" for k in cases}, **{k: "loaded" for k in fine}}
    assert max(result["seconds"]) < 5, dict(zip([*cases, *fine], result["seconds"]))
    assert result["rss_growth_mb"] < 200


def mutants(seed_data: list[bytes], n: int, rng) -> list[bytes]:
    out = []
    for _ in range(n):
        s = bytearray(rng.choice(seed_data))
        for _ in range(rng.randint(1, 4)):
            if not s:
                break
            op, at = rng.random(), rng.randrange(len(s))
            if op < 0.55:
                s[at] = rng.randrange(256)  # flip a byte
            elif op < 0.75:
                s.insert(at, rng.randrange(256))  # insert one
            elif op < 0.85:
                del s[at:]  # truncate
            else:
                del s[at]  # drop one
        out.append(bytes(s))
    return out


@pytest.mark.skipif(not LINUX, reason="RLIMIT_AS and /proc/self/status are Linux's")
def test_fuzzed_pickles_load_or_raise_one_data_error(tmp_path):
    import random
    rng = random.Random(20240601)
    iemocap_seeds = [pickle.dumps(iemocap_obj(), protocol=p) for p in (0, 2, 4, 5)]
    numpy_seeds = [pickle.dumps({"x": np.arange(6, dtype=np.float32).reshape(2, 3), "s": {1, 2},
                                 "y": np.float64(2.5)}, protocol=p) for p in (0, 2, 4, 5)]
    assert 150 < min(map(len, iemocap_seeds)) and max(map(len, iemocap_seeds)) < 600
    (tmp_path / "iemocap").mkdir()
    (tmp_path / "numpy").mkdir()
    for kind, seeds in (("iemocap", iemocap_seeds), ("numpy", numpy_seeds)):
        for i, data in enumerate(mutants(seeds, 300, rng)):
            (tmp_path / kind / f"{i:03d}.pkl").write_bytes(data)
    result = run_child("""
        from pathlib import Path
        result = {"outcomes": {}}
        for kind, read in (("iemocap", read_iemocap), ("numpy", load_pickle)):
            for path in sorted(Path(sys.argv[2], kind).iterdir()):
                result["outcomes"][f"{kind}/{path.name}"] = outcome(read, path)
    """, str(tmp_path))
    outcomes = result["outcomes"]
    assert len(outcomes) == 600
    bad = {k: v for k, v in outcomes.items() if v not in ("loaded", "DataError")}
    assert not bad, bad
    counts = collections.Counter(outcomes.values())
    assert counts["DataError"] > 300 and counts["loaded"] > 0, counts  # the mutants do both
    assert result["rss_growth_mb"] < 200
