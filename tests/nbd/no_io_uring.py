"""Run a program with io_uring_setup(2) refused (EPERM), as a kernel with kernel.io_uring_disabled=2 or a
container's seccomp profile refuses it, without touching the machine's sysctl: a seccomp filter on this
process only, then exec. x86_64 only (the syscall number)."""
import ctypes
import os
import struct
import sys

PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
NR_IO_URING_SETUP = 425
AUDIT_ARCH_X86_64 = 0xC000003E
RET_ALLOW, RET_EPERM = 0x7FFF0000, 0x00050000 | 1
LD_W_ABS, JEQ_K, RET_K = 0x20, 0x15, 0x06


def insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


prog = b"".join([
    insn(LD_W_ABS, 0, 0, 4),                       # seccomp_data.arch
    insn(JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
    insn(RET_K, 0, 0, RET_ALLOW),                  # another ABI: leave it alone
    insn(LD_W_ABS, 0, 0, 0),                       # seccomp_data.nr
    insn(JEQ_K, 0, 1, NR_IO_URING_SETUP),
    insn(RET_K, 0, 0, RET_EPERM),
    insn(RET_K, 0, 0, RET_ALLOW),
])
buf = ctypes.create_string_buffer(prog)


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


libc = ctypes.CDLL(None, use_errno=True)
fprog = SockFprog(len(prog) // 8, ctypes.addressof(buf))
if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or \
        libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
    sys.exit(f"seccomp: {os.strerror(ctypes.get_errno())}")
os.execvp(sys.argv[1], sys.argv[1:])
