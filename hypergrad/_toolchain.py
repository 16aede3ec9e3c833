"""The choices setup.py makes before building hypergrad._C: which kernels (the build switches) and
which C++ compiler can build them for this Python (a probe).

Build switches, each with one name (the old FORCE_CUDA is still read, with a note):
    HYPERGRAD_FORCE_CUDA=1   build the CUDA kernels even where no GPU or no matching torch is seen
    HYPERGRAD_FORCE_CPU=1    build the CPU kernels only (wins where both are set)

An extension runs inside the process torch lives in, so its C++ code runs against the libstdc++ that
process has loaded, not the one of the compiler that built it. Code compiled with a newer compiler's
headers then calls into an older library with objects laid out for the newer one. Seen on the first
GPU machine this project ran on (an H100 image: CXX=/opt/gcc/bin/g++, torch 2.11 loading Ubuntu's
libstdc++): every error message that formatted a number (a shape, a count) crashed the Python process
with a segmentation fault inside std::ostream, while the same sources built with the system g++ raised
the intended ValueError.

The probe reproduces exactly that: it compiles a tiny shared library with the candidate compiler,
loads it into a fresh Python that has imported torch, and formats numbers into a std::ostringstream.
A crash, a library that does not load, or a wrong result rejects the compiler.

    python -m hypergrad._toolchain [COMPILER ...]    (prints the verdict for each; default: $CXX or c++, then g++, c++: setup.py's order)
"""
import os
import shutil
import subprocess
import sys
import tempfile

SWITCH_VALUES = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
                 "off": False, "": False}
OLD_SWITCH_NAMES = {"HYPERGRAD_FORCE_CUDA": "FORCE_CUDA"}


def switch(environ, name, read_as=None):
    """The yes/no value of the build switch `name` (unset: no); ValueError naming it for any other value.
    `read_as` is the switch's current name when `name` is an old one read in its place."""
    raw = environ.get(name, "0")
    if raw.strip().lower() not in SWITCH_VALUES:
        raise ValueError(f"{name}={raw!r}: {read_as or name} takes 1 or 0 (or yes/no, true/false, on/off)")
    return SWITCH_VALUES[raw.strip().lower()]


def build_switches(environ):
    """(force_cuda, force_cpu, notes) from the environment; ValueError for a value that is not a
    yes/no. HYPERGRAD_FORCE_CPU wins over HYPERGRAD_FORCE_CUDA; notes say so, and name an old switch
    name that was read."""
    values, notes = {}, []
    for name in ("HYPERGRAD_FORCE_CUDA", "HYPERGRAD_FORCE_CPU"):
        used, old = name, OLD_SWITCH_NAMES.get(name)
        if name not in environ and old is not None and old in environ:
            used = old
            notes.append(f"{used} is read as {name}, its name now")
        values[name] = switch(environ, used, read_as=name)
    if values["HYPERGRAD_FORCE_CUDA"] and values["HYPERGRAD_FORCE_CPU"]:  # e.g. FORCE_CUDA left in an image
        notes.append("HYPERGRAD_FORCE_CUDA and HYPERGRAD_FORCE_CPU are both set: HYPERGRAD_FORCE_CPU wins")
        values["HYPERGRAD_FORCE_CUDA"] = False
    return values["HYPERGRAD_FORCE_CUDA"], values["HYPERGRAD_FORCE_CPU"], notes


PROBE_SOURCE = r"""
#include <sstream>
#include <string>
extern "C" int hypergrad_probe() {
  std::ostringstream s;
  s << "shape [" << 4L << ", " << 11L << "] " << 2.5;
  return s.str() == "shape [4, 11] 2.5" ? 1 : 0;
}
"""
# Run in a fresh interpreter: loads torch first (so its libstdc++ is the one in the process), then the probe.
PROBE_RUNNER = "import ctypes, sys, torch; sys.exit(0 if ctypes.CDLL(sys.argv[1]).hypergrad_probe() == 1 else 3)"


def probe(compiler, python=sys.executable, timeout=120):
    """(ok, reason): whether code built by `compiler` runs correctly in a Python that has loaded torch."""
    path = shutil.which(compiler)
    if path is None:
        return False, f"{compiler} not found"
    with tempfile.TemporaryDirectory(prefix="hypergrad-probe-") as tmp:
        source, library = os.path.join(tmp, "probe.cpp"), os.path.join(tmp, "probe.so")
        with open(source, "w") as fh:
            fh.write(PROBE_SOURCE)
        build = subprocess.run([path, "-shared", "-fPIC", "-O2", source, "-o", library],
                               capture_output=True, text=True, timeout=timeout)
        if build.returncode != 0:
            return False, f"{compiler} could not compile the probe: {build.stderr.strip()[-300:]}"
        run = subprocess.run([python, "-c", PROBE_RUNNER, library], capture_output=True, text=True, timeout=timeout)
    if run.returncode == 0:
        return True, f"{path}: code it builds runs correctly beside torch"
    if run.returncode < 0 or run.returncode in (134, 139):
        what = f"crashed (signal {-run.returncode})" if run.returncode < 0 else f"crashed (exit {run.returncode})"
    elif run.returncode == 3:
        what = "formatted numbers wrongly"
    else:
        what = f"did not load ({(run.stderr.strip().splitlines() or ['exit ' + str(run.returncode)])[-1][:200]})"
    return False, (f"{path}: code it builds {what} beside torch; its C++ headers do not match the libstdc++ "
                   "that torch's process loads (often a compiler newer than the system's)")


def choose_compiler(preferred, alternatives=("g++", "c++"), python=sys.executable):
    """The first of `preferred`, then `alternatives`, whose probe passes: (compiler, [reasons of rejected ones]).
    compiler is None when none passes."""
    rejected, seen = [], set()
    for candidate in (preferred, *alternatives):
        path = shutil.which(candidate) or candidate
        if path in seen:
            continue
        seen.add(path)
        ok, reason = probe(candidate, python=python)
        if ok:
            return candidate, rejected
        rejected.append(reason)
    return None, rejected


def main(argv=None):
    compilers = (argv if argv is not None else sys.argv[1:]) or [os.environ.get("CXX", "c++"), "g++", "c++"]
    status = 0
    for compiler in dict.fromkeys(compilers):
        ok, reason = probe(compiler)
        print(("ok:   " if ok else "FAIL: ") + reason)
        status |= 0 if ok else 1
    return status


if __name__ == "__main__":
    sys.exit(main())
