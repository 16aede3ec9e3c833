"""Build of hypergrad._C, the compiled core of hypergrad (see shared DESIGN: rules of the build).

C++ kernels are always built. CUDA kernels are built when
  * HYPERGRAD_FORCE_CUDA=1 (even on a machine without a GPU; FORCE_CUDA=1, its old name, still works), or
  * torch is a CUDA build and a CUDA toolkit whose major version matches torch.version.cuda is
    found (CUDA_HOME, CUDA_PATH, nvcc on PATH, or /usr/local/cuda, in that order).
HYPERGRAD_FORCE_CPU=1 skips them. Before anything is compiled, the C++ compiler is probed (hypergrad/_toolchain.py):
code it builds must run correctly beside torch, else g++ or c++ from PATH replaces it. Without a visible GPU and without TORCH_CUDA_ARCH_LIST the
CUDA kernels are compiled for the data-centre GPUs this project targets (8.0 and 9.0, with PTX); on a GPU they have no
image for (a V100, a T4), hypergrad runs the pure-PyTorch twins with a warning (hypergrad/_ops.py).
"""
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup


def _log(message):
    print(f"[hypergrad build] {message}", file=sys.stderr)


def _is_toolkit(path):
    """A folder with nvcc and the CUDA runtime headers: a toolkit an extension can be built with."""
    return bool(path) and all(os.path.exists(os.path.join(path, *p)) for p in
                              (("bin", "nvcc"), ("include", "cuda_runtime.h")))


def _find_cuda_home():
    """CUDA_HOME, CUDA_PATH, /usr/local/cuda, then the toolkit around nvcc on PATH.

    torch's own guess follows `which nvcc`, which on some machines is a wrapper script in
    /usr/local/bin: the toolkit it runs is elsewhere, and linking against /usr/local fails.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for path in candidates:
        if _is_toolkit(path):
            return path
    return None


def _nvcc_version(cuda_home):
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def _toolchain():
    """hypergrad/_toolchain.py, loaded without importing the package (whose _C is not built yet)."""
    spec = importlib.util.spec_from_file_location(
        "hypergrad_toolchain", os.path.join(os.path.dirname(os.path.abspath(__file__)), "hypergrad", "_toolchain.py"))
    toolchain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toolchain)
    return toolchain


def _plan_cuda():
    """Decides whether to build the CUDA kernels; returns (build, cuda_home, nvcc_version)."""
    import torch

    try:
        force_cuda, force_cpu, notes = _toolchain().build_switches(os.environ)
    except ValueError as exc:
        sys.exit(f"[hypergrad build] {exc}")
    for note in notes:
        _log(note)
    if force_cpu:
        _log("HYPERGRAD_FORCE_CPU=1: building the CPU kernels only")
        return False, None, None
    cuda_home = _find_cuda_home()
    version = _nvcc_version(cuda_home) if cuda_home else None
    if force_cuda:
        if version is None:
            sys.exit("[hypergrad build] HYPERGRAD_FORCE_CUDA=1 but no nvcc was found: set CUDA_HOME to the "
                     "CUDA toolkit (the folder holding bin/nvcc)")
        _log(f"HYPERGRAD_FORCE_CUDA=1: building CUDA kernels with nvcc {version} from {cuda_home}")
        return True, cuda_home, version
    if torch.version.cuda is None:
        _log(f"torch {torch.__version__} is a CPU build: building the CPU kernels only")
        return False, None, None
    if version is None:
        _log(f"torch is built for CUDA {torch.version.cuda} but no CUDA toolkit was found "
             "(set CUDA_HOME): building the CPU kernels only")
        return False, None, None
    if version.split(".")[0] != torch.version.cuda.split(".")[0]:
        _log(f"nvcc {version} in {cuda_home} does not match torch's CUDA {torch.version.cuda}: "
             "building the CPU kernels only (HYPERGRAD_FORCE_CUDA=1 overrides)")
        return False, None, None
    _log(f"building CUDA kernels with nvcc {version} from {cuda_home}")
    return True, cuda_home, version


def _choose_cxx():
    """Builds with a C++ compiler whose code runs correctly beside torch (the probe of
    hypergrad/_toolchain.py); when $CXX (default c++) fails it, g++ or c++ from PATH takes over as
    both CC and CXX, and with none the build stops with the reasons."""
    toolchain = _toolchain()
    try:
        if toolchain.switch(os.environ, "HYPERGRAD_SKIP_COMPILER_PROBE"):
            return
    except ValueError as exc:
        sys.exit(f"[hypergrad build] {exc}")
    preferred = os.environ.get("CXX", "c++")
    compiler, rejected = toolchain.choose_compiler(preferred)
    if compiler is None:
        sys.exit("[hypergrad build] no C++ compiler found whose code runs beside torch:\n  " + "\n  ".join(rejected)
                 + "\nInstall the system's g++ (the one that matches the libstdc++ torch loads) and set CXX to it, or "
                   "set HYPERGRAD_SKIP_COMPILER_PROBE=1 to build anyway")
    if compiler != preferred:
        for reason in rejected:
            _log(reason)
        _log(f"building with {compiler} instead (CC and CXX)")
        os.environ["CXX"] = os.environ["CC"] = compiler


def _extensions():
    _choose_cxx()
    build_cuda, cuda_home, cuda_version = _plan_cuda()
    if build_cuda:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
        import torch
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
            _log("no GPU visible and TORCH_CUDA_ARCH_LIST unset: compiling for 8.0;9.0+PTX")
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    here = os.path.dirname(os.path.abspath(__file__))
    sources = [os.path.relpath(p, here) for p in
               sorted(glob.glob(os.path.join(here, "csrc", "*.cpp")))
               + sorted(glob.glob(os.path.join(here, "csrc", "cpu", "*.cpp")))]
    macros = [("HYPERGRAD_TORCH_VERSION", f'"{torch.__version__}"')]
    cxx_flags = ["-O3", "-fopenmp-simd"]
    # Linked with libstdc++ named as a dependency (the C driver that links Python extensions leaves it
    # out): a libstdc++ older than the one the code needs is then a clear ImportError, never a crash.
    link_flags = ["-lstdc++"] if sys.platform.startswith("linux") else []
    if not build_cuda:
        return [CppExtension("hypergrad._C", sources, define_macros=macros,
                             extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)]
    sources += [os.path.relpath(p, here) for p in sorted(glob.glob(os.path.join(here, "csrc", "cuda", "*.cu")))]
    macros += [("HYPERGRAD_CUDA_VERSION", f'"{cuda_version}"'), ("HYPERGRAD_WITH_CUDA", "1")]
    return [CUDAExtension("hypergrad._C", sources, define_macros=macros,
                          extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]}, extra_link_args=link_flags)]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension
    return BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None or _has_ninja_module())


def _has_ninja_module():
    try:
        import ninja  # noqa: F401
        return True
    except ImportError:
        return False


setup(
    packages=find_packages(include=["hypergrad", "hypergrad.*", "tgda_attack", "tgda_attack.*"]),
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext()},
)
