"""The compiler probe of the build (hypergrad/_toolchain.py) against compilers whose verdict is known:
the system g++, and stand-ins that build a probe library which crashes, computes a wrong answer or
does not compile."""
import os
import shutil
import stat

import pytest

from hypergrad import _toolchain

needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


def _stand_in(tmp_path, name, body):
    """A 'compiler' that ignores the probe's source and builds `body` with g++ to the requested -o path."""
    source = tmp_path / f"{name}.cpp"
    source.write_text(body)
    script = tmp_path / name
    script.write_text(f'#!/bin/sh\nwhile [ "$1" != "-o" ]; do shift; done\nexec g++ -shared -fPIC "{source}" -o "$2"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


@needs_gxx
def test_system_gxx_passes():
    ok, reason = _toolchain.probe("g++")
    assert ok, reason


@needs_gxx
def test_a_compiler_whose_code_crashes_is_rejected_and_the_next_one_chosen(tmp_path):
    bad = _stand_in(tmp_path, "crashing-cxx", 'extern "C" int hypergrad_probe() { volatile int* p = 0; return *p; }')
    ok, reason = _toolchain.probe(bad)
    assert not ok and "crashed" in reason
    chosen, rejected = _toolchain.choose_compiler(bad, alternatives=("g++",))
    assert chosen == "g++" and len(rejected) == 1 and "crashed" in rejected[0]


@needs_gxx
def test_wrong_results_and_build_failures_are_rejected(tmp_path):
    wrong = _stand_in(tmp_path, "wrong-cxx", 'extern "C" int hypergrad_probe() { return 0; }')
    assert "wrongly" in _toolchain.probe(wrong)[1]
    broken = _stand_in(tmp_path, "broken-cxx", "this is not C++")
    ok, reason = _toolchain.probe(broken)
    assert not ok and "could not compile" in reason


def test_no_usable_compiler_gives_every_reason():
    chosen, rejected = _toolchain.choose_compiler("no-such-cxx-1", alternatives=("no-such-cxx-2",))
    assert chosen is None and [r.split()[0] for r in rejected] == ["no-such-cxx-1", "no-such-cxx-2"]
