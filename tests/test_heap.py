"""neurosdm.heap: malloc set to keep freed memory on Linux/glibc, off with NEUROSDM_RETAIN_HEAP=0."""

import platform
import subprocess
import sys

import pytest

CODE = "from neurosdm.heap import retain_freed_memory; print(retain_freed_memory())"


def _run(env_value):
    env = {"PATH": "/usr/bin:/bin"} | ({"NEUROSDM_RETAIN_HEAP": env_value} if env_value is not None else {})
    return subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env,
                          check=True).stdout.strip()


def test_turned_off_by_the_environment():
    assert _run("0") == "False"


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt is glibc's: elsewhere retain_freed_memory does nothing")
def test_set_on_glibc():
    assert _run(None) == "True"
