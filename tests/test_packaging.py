"""The runtime is what ships to a device: it must import without torch, and the package layout must not leak
top-level `runtime`/`export`/`train` modules into site-packages."""

import subprocess
import sys

from conftest import REPO

IMPORT_ALL_RUNTIME = r"""
import importlib, pkgutil, sys
import edgepix.runtime as rt
names = [m.name for m in pkgutil.walk_packages(rt.__path__, "edgepix.runtime.")]
for name in names:
    importlib.import_module(name)
assert len(names) >= 4, names
print("modules", len(names))
print("torch" in sys.modules, "torchvision" in sys.modules, "transformers" in sys.modules)
"""


def test_every_runtime_module_imports_without_torch_or_transformers():
    r = subprocess.run([sys.executable, "-c", IMPORT_ALL_RUNTIME], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False False False", r.stdout


def test_top_level_folders_are_not_importable_outside_the_repo(tmp_path):
    code = ("import importlib.util as u, edgepix.runtime, edgepix.train, edgepix.export, edgepix.benchmarks;"
            "print([u.find_spec(n) is None for n in ('runtime', 'export', 'train', 'benchmarks')])")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[True, True, True, True]"


def test_edgepix_runtime_resolves_to_the_repository_folder(tmp_path):
    r = subprocess.run([sys.executable, "-c", "import edgepix.runtime as r; print(r.__file__)"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == str(REPO / "runtime" / "__init__.py")


def test_every_python_package_folder_is_listed_in_pyproject():
    """A sub-package missing from pyproject's `packages` works in an editable install but not in a wheel."""
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    folders = {v: k for k, v in config["package-dir"].items()}
    found = set()
    for folder, package in folders.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            found.add(".".join([package, *rel.parts]) if rel.parts else package)
    assert found == listed, f"in the tree but not listed: {found - listed}; listed but absent: {listed - found}"


def test_opencv_comes_with_the_cpu_and_gpu_extras_not_with_the_base_package():
    """A system's own OpenCV (JetPack's, Debian's python3-opencv, with GStreamer) must survive `pip install edgepix`:
    the wheel is in the extras that make a runtime on a plain machine, not in the base dependencies."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.lower().startswith("opencv")]
    for extra in ("cpu", "gpu"):
        assert [d for d in project["optional-dependencies"][extra] if d.startswith("opencv-python>=")], extra


# A stand-in for an install without OpenCV (`pip install edgepix` with neither the cpu extra nor the system's
# python3-opencv): the interpreter refuses to import cv2.
WITHOUT_OPENCV = r"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "cv2":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
from edgepix.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_without_opencv_every_verb_fails_in_one_line_that_says_how_to_get_it(tmp_path):
    for args in (["segment", str(tmp_path / "m.onnx")], ["doctor"], ["--help"]):
        r = subprocess.run([sys.executable, "-c", WITHOUT_OPENCV, *args], capture_output=True, text=True, timeout=60)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1, (args, r.stderr)
        assert "'cv2'" in lines[0] and "pip install 'edgepix[cpu]'" in lines[0], lines
        assert "apt-get install python3-opencv" in lines[0] and "--system-site-packages" in lines[0], lines
