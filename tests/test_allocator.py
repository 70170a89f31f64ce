"""`ae.allocator.keep_step_buffers`: glibc serves a step-sized block from its heap and keeps it once
freed, instead of mapping it afresh (and page-faulting it in) every step. Read from glibc itself
(`mallinfo2`) in a fresh process, against glibc's defaults as the negative control."""

from __future__ import annotations

import json
import platform
import subprocess

import pytest

from tests.helpers import PYTHON, REPO, clean_env

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

BLOCK = 8 << 20  # a batch-128 step's largest activation is about this size

PROBE = f"""
import ctypes, json, sys
from ae.allocator import keep_step_buffers

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = Mallinfo2
tuned = keep_step_buffers() if sys.argv[1] == "tuned" else None
block = libc.malloc({BLOCK})
mapped = libc.mallinfo2().hblkhd  # bytes in blocks of their own mapping
libc.free(block)
print(json.dumps({{"tuned": tuned, "mapped": mapped, "kept": libc.mallinfo2().fordblks}}))
"""


def probe(mode: str, **env: str) -> dict:
    done = subprocess.run(
        [PYTHON, "-c", PROBE, mode],
        cwd=REPO,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_step_sized_block_comes_from_the_heap_and_stays_for_the_next_step():
    tuned = probe("tuned")
    assert tuned["tuned"] is True
    assert tuned["mapped"] < BLOCK, tuned  # not a mapping of its own
    assert tuned["kept"] >= BLOCK, tuned  # freed, but kept for the next step


def test_glibc_defaults_map_it_afresh_which_is_what_the_setting_removes():
    default = probe("default")
    assert default["mapped"] >= BLOCK, default


def test_glibcs_own_variables_win():
    assert probe("tuned", MALLOC_MMAP_THRESHOLD_="131072")["tuned"] is False
    assert probe("tuned", MALLOC_TRIM_THRESHOLD_="131072")["tuned"] is False
