# Fuzzing what a run takes from outside: every message type through the codec and the
# seal, and the syscall arguments of the scenario API through the kernel paths.
#
# Properties, for any input Hypothesis can think of:
#   - decoding never raises anything but ProtocolError, named by one of the codec's errnos;
#     what decodes re-encodes and decodes to the same message;
#   - a sealed message with any byte changed, or anything not sealed with the run's secret,
#     is EACCES;
#   - a syscall or user access with any arguments either succeeds or fails with one of the
#     kernel's errnos for it, and a refused call leaves the address space, the memory and
#     every invariant as they were.
# Bounded for ./run.sh test (max_examples below, no deadline: a slow CI machine must not
# fail a property); KSMLAB_FUZZ_EXAMPLES=N runs a longer campaign.
from __future__ import annotations

import os
import secrets

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.kernel import mm as mmops
from actors.kernel import syscalls
from actors.kernel.fault import UserAccessError, access_user
from protocol import codec
from protocol.abi import (
    MADV_MERGEABLE,
    MADV_UNMERGEABLE,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    PROT_READ,
    PROT_WRITE,
)
from protocol.auth import Seal
from protocol.codec import ProtocolError
from protocol.messages import ENVELOPE, MESSAGES, VERSION
from shared_mem.layout import PAGE_SIZE
from tests.kernel.conftest import KernelHarness

EXAMPLES = int(os.environ.get("KSMLAB_FUZZ_EXAMPLES", 150))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
CODEC_ERRNOS = {"EBADMSG", "EPROTO", "EINVAL", "EMSGSIZE"}

scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
           | st.text(max_size=20) | st.binary(max_size=40))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


@st.composite
def messages(draw) -> dict:
    """Something shaped like a message: a real type, its fields (or wrong ones), an
    envelope that is usually right."""
    mtype = draw(st.sampled_from(sorted(MESSAGES)) | st.text(max_size=12))
    names = [*MESSAGES.get(mtype, {}), "bogus", *ENVELOPE]
    msg = draw(st.dictionaries(st.sampled_from(names), values, max_size=8))
    if draw(st.booleans()):
        msg.update(v=VERSION, type=mtype, id=draw(st.integers(0, 2**63)), src=draw(st.text(max_size=10)))
    return msg


def _decode_or_errno(data: bytes) -> dict | str:
    try:
        return codec.decode(data)
    except ProtocolError as e:
        return e.name


@FUZZ
@given(messages())
def test_any_message_decodes_or_is_refused_with_a_codec_errno(msg):
    try:
        data = msgpack.packb(msg, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return                                    # not even msgpack: nothing to send
    got = _decode_or_errno(data)
    if isinstance(got, str):
        assert got in CODEC_ERRNOS, got
    else:
        assert codec.decode(codec.encode(got)) == got


@FUZZ
@given(st.binary(max_size=300))
def test_any_bytes_decode_or_are_refused_with_a_codec_errno(data):
    got = _decode_or_errno(data)
    assert isinstance(got, dict) or got in CODEC_ERRNOS, got


SEAL = Seal(secrets.token_bytes(32))


@FUZZ
@given(st.sampled_from(sorted(MESSAGES)), st.data())
def test_a_sealed_message_with_any_byte_changed_is_eacces(mtype, data):
    raw = SEAL.encode(codec.request("ping", 1, "supervisor"))
    i = data.draw(st.integers(0, len(raw) - 1))
    flip = data.draw(st.integers(1, 255))
    bad = raw[:i] + bytes([raw[i] ^ flip]) + raw[i + 1:]
    with pytest.raises(ProtocolError) as e:
        SEAL.decode(bad)
    assert e.value.name == "EACCES"
    with pytest.raises(ProtocolError):
        SEAL.decode(data.draw(st.binary(max_size=64)))


# -- syscall arguments --------------------------------------------------------------------------------
addrs = st.one_of(st.integers(-(2**64), 2**65), st.sampled_from([0, PAGE_SIZE, 1 << 24, (1 << 30) - PAGE_SIZE]),
                  st.integers(0, 64).map(lambda n: (1 << 24) + n * PAGE_SIZE))
lengths = st.one_of(st.integers(-(2**40), 2**64), st.integers(0, 8).map(lambda n: n * PAGE_SIZE + 1))
SYSCALL_ERRNOS = {"EINVAL", "ENOMEM", "EFAULT", "EAGAIN", "EPERM", "EACCES"}


@pytest.fixture(scope="module")
def fuzz_kernel():
    h = KernelHarness()
    try:
        yield h
    finally:
        h.close()


def _state(h: KernelHarness, mm: int, a: int) -> tuple:
    return (list(mmops.vmas(h.k, mm)), h.read(mm, a, 4 * PAGE_SIZE), h.k.km.ptable.nr_live())


@FUZZ
@given(st.sampled_from(["munmap", "mprotect", "madvise", "mmap", "read", "write"]), addrs, lengths,
       st.integers(-8, 64))
def test_any_syscall_arguments_succeed_or_get_a_kernel_errno_and_change_nothing(fuzz_kernel, call, addr, length, arg):
    h = fuzz_kernel
    mm = h.new_mm()
    try:
        a = syscalls.sys_mmap(h.k, mm, 4 * PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
        access_user(h.k, mm, a, 4 * PAGE_SIZE, True, 0x5A)
        before = _state(h, mm, a)
        fns = {
            "munmap": lambda: syscalls.sys_munmap(h.k, mm, addr, length),
            "mprotect": lambda: syscalls.sys_mprotect(h.k, mm, addr, length, arg & 7),
            "madvise": lambda: syscalls.sys_madvise(h.k, mm, addr, length,
                                                    (MADV_MERGEABLE, MADV_UNMERGEABLE, arg)[arg % 3]),
            "mmap": lambda: syscalls.sys_mmap(h.k, mm, length, arg & 7, MAP_PRIVATE | MAP_ANONYMOUS, addr),
            "read": lambda: access_user(h.k, mm, addr, min(length, 1 << 20), False),
            "write": lambda: access_user(h.k, mm, addr, min(length, 1 << 20), True, arg & 0xFF),
        }
        try:
            fns[call]()
        except (syscalls.SyscallError, UserAccessError) as e:
            assert e.errno_name in SYSCALL_ERRNOS, e
            # madvise's ENOMEM is a partial success in the kernel too (the mapped parts are
            # advised); a load or store that faulted part way did what it did before the fault.
            partial = (call == "madvise" and e.errno_name == "ENOMEM") or (
                isinstance(e, UserAccessError) and not e.detail.endswith("user address space"))
            if not partial:
                assert _state(h, mm, a) == before, f"{call} failed with {e} but changed the address space"
        h.check()
        assert not h.reports, [r["title"] for r in h.reports]
    finally:
        h.mmput(mm)
