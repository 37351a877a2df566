"""What `pip install scott-kernels` gives.

Without extras, the `mimjepa` command must show its help and, for a command, name the extra to
install instead of failing on an import. The wheel (built here, C++ only, from a copy of the
checkout) holds the run-time packages and nothing else: `scott_kernels` (its modules and the
native module), `mimjepa` and its configs, and the metadata; no tests, no benchmarks, and no
development tooling (the static machine-code analysis lives in benchmarks/static/).
"""

import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the training extra's modules made unimportable, as in an install without [train]
BLOCK = "import sys; [sys.modules.__setitem__(m, None) for m in ('yaml', 'safetensors', 'tqdm', 'torchvision')]; "


def _mimjepa(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]))
    code = BLOCK + f"from mimjepa.cli import main; sys.exit(main({list(args)!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_help_without_the_train_extra():
    result = _mimjepa("--help")
    assert result.returncode == 0, result.stderr
    assert "pretrain" in result.stdout and "demo" in result.stdout


@pytest.mark.parametrize("command", [["demo"], ["probe", "checkpoint=x.safetensors"]])
def test_commands_name_the_missing_extra(command):
    result = _mimjepa(*command)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'scott-kernels[train]'" in lines[0], result.stderr


# ---- the wheel ------------------------------------------------------------------------------
# What a wheel build reads from the checkout; everything else (build trees, caches, virtual
# environments, built modules) stays behind. Tests and benchmarks are copied on purpose: the wheel
# must leave them out even though they sit next to the packages.
_SOURCES = ["setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "CMakeLists.txt", "csrc", "scott_kernels",
            "python", "tests", "benchmarks"]
_IGNORE = shutil.ignore_patterns("__pycache__", "*.py[cod]", "*.so", "*.pyd", "*.egg-info", ".pytest_cache",
                                 ".benchmarks", "build", "dist")
# Modules that must never ship, named so a failure says which; any other module that nothing in
# the wheel imports fails the reachability check below as well.
_DEVELOPMENT = {"codegen", "static_cost", "launches", "conftest"}
# Modules users run as commands (`python -m ...`, documented in the README) or import by name, besides the console
# scripts the wheel's entry_points.txt names: run-time entry points that nothing needs to import.
_COMMANDS = {"scott_kernels.compare",
             # imported by name: by users (README) and by the registration hook once timm is imported
             "scott_kernels.timm_models"}


def _missing_build_tools() -> list[str]:
    """What pyproject.toml's build requirements need here for a build without isolation."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])
    missing = [m for m in ("setuptools", "pybind11") if importlib.util.find_spec(m) is None]
    # setuptools >= 70.1 builds wheels itself; older ones need the wheel package
    if "setuptools" not in missing and importlib.util.find_spec("setuptools.command.bdist_wheel") is None \
            and importlib.util.find_spec("wheel") is None:
        missing.append("wheel")
    return missing + [t for t in ("cmake", "ninja") if shutil.which(t, path=path) is None]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[list[str], Path]:
    """(file list, unpacked copy) of the wheel `pip wheel --no-deps --no-build-isolation` builds
    (C++ only)."""
    missing = _missing_build_tools()
    if missing:
        pytest.skip(f"building the wheel needs {', '.join(missing)} (pip install -e '.[test]' installs them)")
    work = tmp_path_factory.mktemp("wheel")
    src, out = work / "src", work / "dist"
    src.mkdir()
    for name in _SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=_IGNORE)
        elif path.is_file():
            shutil.copy2(path, src / name)
    env = dict(os.environ, SCOTT_NO_CUDA="1", PATH=os.pathsep.join([str(Path(sys.executable).parent),
                                                                    os.environ.get("PATH", "")]))
    env.pop("SCOTT_REQUIRE_CUDA", None)
    env.pop("PYTHONPATH", None)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work, timeout=900)
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    wheels = sorted(out.glob("scott_kernels-*.whl"))
    assert len(wheels) == 1, f"expected one wheel in {out}, found {wheels}"
    with zipfile.ZipFile(wheels[0]) as z:
        z.extractall(work / "unpacked")   # for the import check: the sources as the wheel ships them
        return z.namelist(), work / "unpacked"


def _unexpected(files: list[str]) -> list[str]:
    """Files outside the run-time layout: scott_kernels/*.py and one native module, mimjepa/*.py and
    mimjepa/configs/*.yaml, the .dist-info metadata."""
    allowed = [r"scott_kernels/[A-Za-z_]\w*\.py", r"scott_kernels/_C(\.[\w-]+)?\.(so|pyd)",
               r"mimjepa/[A-Za-z_]\w*\.py", r"mimjepa/configs/[\w-]+\.yaml",
               r"scott_kernels-[^/]+\.dist-info/(METADATA|WHEEL|RECORD|entry_points\.txt|top_level\.txt|"
               r"LICEN[CS]E[^/]*|licenses/.+)"]
    return [f for f in files if not any(re.fullmatch(a, f) for a in allowed)]


def _imports(path: Path, package: str, modules: set[str]) -> set[str]:
    """Modules of the wheel a module imports anywhere (module level or inside a function)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n in modules}
    return out


def _unreachable(root: Path, files: list[str], commands=frozenset()) -> list[str]:
    """Modules that no import chain from the packages, the console scripts and ``commands``
    reaches: shipped, but dead at run time (development tooling that slipped in)."""
    modules = {f[:-3].replace("/", ".").removesuffix(".__init__"): root / f for f in files
               if f.endswith(".py") and "/" in f and ".dist-info/" not in f}
    entry = next((root / f for f in files if f.endswith(".dist-info/entry_points.txt")), None)
    roots = {m for m in modules if "." not in m or m.endswith(".__main__")} | set(commands)
    if entry is not None:
        roots |= {line.split("=", 1)[1].split(":")[0].strip() for line in entry.read_text().splitlines()
                  if "=" in line}
    seen, todo = set(), [m for m in roots if m in modules]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        package = m if modules[m].name == "__init__.py" else m.rpartition(".")[0]
        todo += sorted(_imports(modules[m], package, set(modules)) - seen)
    return sorted(set(modules) - seen)


def test_wheel_holds_only_the_runtime_packages(wheel):
    files, _ = wheel
    assert not _unexpected(files), f"files outside the run-time layout: {_unexpected(files)}"
    stems = {Path(f).stem for f in files if f.endswith(".py")}
    shipped = sorted(stems & _DEVELOPMENT) + sorted(s for s in stems if s.startswith("test_"))
    assert not shipped, f"development modules in the wheel: {shipped}"
    assert sum(bool(re.fullmatch(r"scott_kernels/_C(\.[\w-]+)?\.(so|pyd)", f)) for f in files) == 1, \
        "the wheel must hold exactly one native module scott_kernels/_C"
    for required in ("scott_kernels/__init__.py", "mimjepa/__init__.py", "mimjepa/cli.py"):
        assert required in files, f"{required} missing from the wheel"
    assert any(f.startswith("mimjepa/configs/") for f in files), "mimjepa's configs missing from the wheel"
    # every shipped module of the source packages, no more: what setup.py's packages list says
    source = {f"scott_kernels/{p.name}" for p in (ROOT / "scott_kernels").glob("*.py")}
    source |= {f"mimjepa/{p.name}" for p in (ROOT / "python" / "mimjepa").glob("*.py")}
    assert source == {f for f in files if f.endswith(".py")}, sorted(source ^ {f for f in files if f.endswith(".py")})


def test_wheel_modules_are_all_imported(wheel):
    files, root = wheel
    dead = _unreachable(root, files, _COMMANDS)
    assert not dead, f"modules in the wheel that nothing imports (development tooling?): {dead}"


def test_reachability_check_finds_a_stray_module(tmp_path):
    """The check itself: a module nothing imports is reported, imported ones are not."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("from .a import f\n")
    (tmp_path / "pkg" / "a.py").write_text("def f():\n    from . import b\n    import pkg.c\n")
    (tmp_path / "pkg" / "cmd.py").write_text("from .d import g\n")
    for name in ("b", "c", "d", "tool"):
        (tmp_path / "pkg" / f"{name}.py").write_text("")
    files = [f"pkg/{n}.py" for n in ("__init__", "a", "b", "c", "cmd", "d", "tool")]
    assert _unreachable(tmp_path, files) == ["pkg.cmd", "pkg.d", "pkg.tool"]
    assert _unreachable(tmp_path, files, {"pkg.cmd"}) == ["pkg.tool"]
    assert _unexpected(["scott_kernels/ops.py", "benchmarks/static/codegen.py", "tests/test_x.py"]) == [
        "benchmarks/static/codegen.py", "tests/test_x.py"]
