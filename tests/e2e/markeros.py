"""A test OS small enough to boot under QEMU inside a TCG lab PC: one 512-byte boot sector (GNU as,
16-bit) on a 1 MiB raw disk that paints the whole text screen in a known colour, so a screenshot of the
lab PC shows which guest is on screen and in which state:

  clean  its own colour (A: blue, B: green): sector 1 of its disk does not hold the "written" mark
  wrote  magenta: a key was pressed (or 10 minutes passed); the mark was written to sector 1, read back,
         and the guest powers itself off 3 s later (ACPI PM1a at 0x604, QEMU's pc and q35 machines)
  dirty  red: the mark was already there, so the disk kept an earlier boot's write (it must not)

The disk is imported into bootd as an image; the lab PC's QEMU instance boots its NBD export with
snapshot=on, so after the power-off the instance restarts on a clean disk: clean -> wrote -> clean,
never dirty.
"""
from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

# VGA text attributes (background << 4 | white) and the RGB QEMU draws those backgrounds with.
COLOURS = {"A": 0x1F, "B": 0x2F}
WROTE, DIRTY = 0x5F, 0x4F
RGB = {0x1F: (0, 0, 170), 0x2F: (0, 170, 0), 0x5F: (170, 0, 170), 0x4F: (170, 0, 0)}

ASM = r"""
.code16
.globl _start
.set CLEAN_ATTR, {clean}
.set WROTE_ATTR, {wrote}
.set DIRTY_ATTR, {dirty}
.set MARK, 0xB00D
_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $0x7c00, %sp
    sti
    mov %dl, drive
    mov $0x0003, %ax            # 80x25 colour text, screen cleared
    int $0x10
    mov $0x01, %ah              # no cursor
    mov $0x2000, %cx
    int $0x10
    call readsec
    cmpw $MARK, 0x8000
    je dirty
    mov $CLEAN_ATTR, %bl
    mov $msg_clean, %si
    call paint
    mov $6000, %bp              # wait for a key, at most 6000 x 100 ms
wait:
    mov $0x01, %ah
    int $0x16
    jnz key
    mov $0x86, %ah              # 100 ms
    mov $0x0001, %cx
    mov $0x86a0, %dx
    int $0x15
    dec %bp
    jnz wait
    jmp write
key:
    xor %ah, %ah
    int $0x16
write:
    movw $MARK, 0x8000
    mov $0x0301, %ax            # write 1 sector: C0 H0 S2 (LBA 1) from 0:8000
    call rwsec
    movw $0, 0x8000
    call readsec
    cmpw $MARK, 0x8000
    jne hang
    mov $WROTE_ATTR, %bl
    mov $msg_wrote, %si
    call paint
    mov $30, %bp
pause:
    mov $0x86, %ah
    mov $0x0001, %cx
    mov $0x86a0, %dx
    int $0x15
    dec %bp
    jnz pause
    mov $0x604, %dx             # ACPI soft-off (PM1a control, SLP_EN | SLP_TYP 0)
    mov $0x2000, %ax
    out %ax, %dx
hang:
    hlt
    jmp hang
dirty:
    mov $DIRTY_ATTR, %bl
    mov $msg_dirty, %si
    call paint
    jmp hang

readsec:
    mov $0x0201, %ax
rwsec:                          # %ax = 02/03 01: read/write one sector at CHS 0/0/2 to/from 0:8000
    mov $0x0002, %cx
    xor %dh, %dh
    mov drive, %dl
    mov $0x8000, %bx
    int $0x13
    ret

paint:                          # whole screen in attribute %bl, then the text at %si on row 12
    push %es
    mov $0xb800, %ax
    mov %ax, %es
    xor %di, %di
    mov %bl, %ah
    mov $0x20, %al
    mov $2000, %cx
    rep stosw
    mov $(12 * 160 + 20), %di
text:
    lodsb
    test %al, %al
    jz painted
    mov %bl, %ah
    stosw
    jmp text
painted:
    pop %es
    ret

drive: .byte 0x80
msg_clean: .asciz "BOOTD MARKER {letter} - CLEAN DISK"
msg_wrote: .asciz "BOOTD MARKER {letter} - WROTE, POWER OFF"
msg_dirty: .asciz "BOOTD MARKER {letter} - DIRTY DISK"
. = _start + 510
.byte 0x55, 0xaa
"""


def build_marker_disk(letter: str, out: Path) -> Path:
    """The 1 MiB raw disk of marker guest `letter` (A or B), made with the host's binutils."""
    asm = ASM.format(clean=hex(COLOURS[letter]), wrote=hex(WROTE), dirty=hex(DIRTY), letter=letter)
    with tempfile.TemporaryDirectory() as d:
        src, obj, binary = Path(d) / "m.S", Path(d) / "m.o", Path(d) / "m.bin"
        src.write_text(asm)
        subprocess.run(["as", "--32", "-o", str(obj), str(src)], check=True, capture_output=True)
        subprocess.run(["ld", "-m", "elf_i386", "-Ttext", "0x7c00", "--oformat", "binary", "-e", "_start",
                        "-o", str(binary), str(obj)], check=True, capture_output=True)
        code = binary.read_bytes()
    if len(code) != 512 or code[-2:] != b"\x55\xaa":
        raise RuntimeError(f"marker boot sector is {len(code)} bytes")
    out.write_bytes(code + bytes(1024 * 1024 - 512))
    return out


def read_ppm(path: Path) -> tuple[int, int, bytes]:
    """(width, height, RGB bytes) of a binary PPM (what QEMU's screendump writes)."""
    data = path.read_bytes()
    fields: list[bytes] = []
    pos = 0
    while len(fields) < 4:
        while data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":
            pos = data.index(b"\n", pos) + 1
            continue
        end = pos
        while not data[end:end + 1].isspace():
            end += 1
        fields.append(data[pos:end])
        pos = end
    if fields[0] != b"P6" or fields[3] != b"255":
        raise ValueError(f"{path}: not an 8-bit binary PPM")
    w, h = int(fields[1]), int(fields[2])
    return w, h, data[pos + 1:pos + 1 + w * h * 3]


def colour_share(path: Path, rgb: tuple[int, int, int], tolerance: int = 8) -> float:
    """The share of the screenshot's pixels within `tolerance` of `rgb` (sampled every 4th pixel)."""
    w, h, px = read_ppm(path)
    r0, g0, b0 = rgb
    hits = total = 0
    for i in range(0, w * h * 3, 12):
        total += 1
        if abs(px[i] - r0) <= tolerance and abs(px[i + 1] - g0) <= tolerance and abs(px[i + 2] - b0) <= tolerance:
            hits += 1
    return hits / total if total else 0.0


def screen_state(path: Path, min_share: float = 0.15) -> str:
    """Which marker state the screenshot shows: A, B, wrote, dirty, or "none"."""
    shares = {"A": colour_share(path, RGB[COLOURS["A"]]), "B": colour_share(path, RGB[COLOURS["B"]]),
              "wrote": colour_share(path, RGB[WROTE]), "dirty": colour_share(path, RGB[DIRTY])}
    best = max(shares, key=lambda k: shares[k])
    return best if shares[best] >= min_share else "none"
