"""The wheel's layout and the compiled module's linkage, checked on a real build."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    cmd = [
        sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-build-isolation", "--no-deps",
        "--disable-pip-version-check", "-q", "-w", str(out), "-C", f"build-dir={out / 'build'}",
        # The layout is what is tested here; CUDA compilation is covered where it matters.
        "-C", "cmake.define.ENSEL_CUDA=OFF",
    ]  # fmt: skip
    subprocess.run(cmd, check=True)
    (path,) = out.glob("ensel-*.whl")
    return zipfile.ZipFile(path)


@pytest.fixture(scope="module")
def wheel_files(wheel) -> list[str]:
    return wheel.namelist()


def test_wheel_requires_only_the_core_and_offers_the_al_extra(wheel):
    """An embedding user installs torch and numpy (triton where torch does not bring it), not
    the active-learning layer's torchvision, scikit-learn, tqdm and matplotlib."""
    (metadata,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    requires = [line.split(":", 1)[1].strip() for line in wheel.read(metadata).decode().splitlines()
                if line.startswith("Requires-Dist:")]  # fmt: skip
    name = lambda req: req.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip()  # noqa: E731
    core = sorted(name(r) for r in requires if "extra ==" not in r)
    al = sorted(name(r) for r in requires if "extra == \"al\"" in r)
    assert core == ["numpy", "torch", "triton"], requires
    assert al == ["matplotlib", "scikit-learn", "torchvision", "tqdm"], requires


def test_wheel_ships_kernels_inside_the_package(wheel_files):
    assert "ensel/kernels/__init__.py" in wheel_files
    assert not any(name.startswith("kernels/") for name in wheel_files), "a top-level `kernels` would clash on PyPI"


def test_wheel_has_the_module_and_the_api(wheel_files):
    assert any(name.startswith("ensel/_C.") and name.endswith(".so") for name in wheel_files)
    for module in ("__init__", "api", "accumulator", "scores", "reference", "outofcore", "backends/__init__",
                   "al/__init__", "al/loop", "al/commands"):
        assert f"ensel/{module}.py" in wheel_files


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf (binutils) is not installed")
def test_module_does_not_link_libtorch():
    from ensel import _C

    needed = subprocess.run(["readelf", "-d", _C.__file__], capture_output=True, text=True, check=True).stdout
    assert "NEEDED" in needed
    assert "torch" not in needed and "c10" not in needed


NVCC = shutil.which("nvcc")


def test_cuda_is_compiled_in_when_nvcc_exists():
    from ensel import _C

    assert _C.cuda_compiled == (NVCC is not None)


def _cuobjdump() -> str | None:
    """cuobjdump from PATH, the CUDA toolkit beside nvcc, or the copy that triton ships."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    candidates = [Path("/usr/local/cuda/bin/cuobjdump"), *Path("/usr/local").glob("cuda-*/bin/cuobjdump")]
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump")
    except ImportError:
        pass
    return next((str(c) for c in candidates if c.is_file()), None)


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the module was built without CUDA")
def test_cuda_runtime_is_linked_and_answers_without_a_gpu():
    from ensel import _C

    assert _C.cuda_runtime_version() >= 12000
    count, error = _C.cuda_device_count()  # no GPU here: an error message, not a crash
    assert count > 0 or error


@pytest.mark.skipif(NVCC is None or _cuobjdump() is None, reason="needs nvcc and cuobjdump")
def test_cuda_objects_target_sm80_and_sm90():
    from ensel import _C

    listing = subprocess.run([_cuobjdump(), "--list-elf", _C.__file__], capture_output=True, text=True, check=True)
    assert "sm_80" in listing.stdout and "sm_90" in listing.stdout, listing.stdout
