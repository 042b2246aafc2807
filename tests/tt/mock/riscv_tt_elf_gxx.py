"""Stand-in for Tenstorrent's RISC-V compiler `riscv-tt-elf-g++`: TEST INFRASTRUCTURE, MOCK VALIDATION ONLY.

ttnn compiles and links a kernel for every program it creates, even on a mock cluster. With no real SFPI
toolchain on CI machines, this script answers those calls so that op validation, buffer allocation and
program creation run for real while no kernel code is ever produced:

- `--version` prints the line the wheel's pre-compiled firmware was built with: that line is part of the
  firmware build key, and only a matching key lets the runtime reuse the shipped firmware.
- compile steps (`-c`, or `-x c++-header` for precompiled headers) write a placeholder object and, with
  `-MF`, a Make-style depfile naming the source, which is what the runtime's build cache hashes.
- kernel links (`--just-symbols=<firmware>_weakened.elf`) emit a tiny RISC-V executable whose text and
  data sit where the kernel linker script and the firmware's exported symbols put them, with one
  `R_RISCV_NONE` relocation so the runtime can make it execute-in-place.
- firmware links copy a shipped pre-compiled firmware ELF of the same processor and architecture.

setup_tt.sh installs it as `<ttnn>/runtime/sfpi/compiler/bin/riscv-tt-elf-g++` inside `.venv-tt` only.
It must never stand where a real toolchain lives, and its output must never share a kernel cache with one:
the binaries it writes are not programs. Standard library only: the runtime runs it in a shell.
"""

from __future__ import annotations

# Every kernel build starts this script about ten times: only modules that load in a few milliseconds
# (no pathlib, no shutil).
import ast
import operator
import os
import re
import struct
import sys
from collections.abc import Callable, Mapping

# The compiler that built the firmware shipped in ttnn 0.81.1 (see the `.comment` section of any
# `tt_metal/pre-compiled/*/*/*.elf`).
VERSION_LINE = "riscv-tt-elf-g++ (tenstorrent/sfpi:7.89.0[1050]) 15.1.0"
PLACEHOLDER_OBJECT = b"mock-validation placeholder object: no code was compiled\n"

# `ret` (jalr x0, 0(x1)): the whole kernel body.
RISCV_RET = 0x00008067

ELFCLASS32, ELFDATA2LSB, EV_CURRENT = 1, 1, 1
EM_RISCV = 243
ET_EXEC = 2
PT_LOAD = 1
SHT_PROGBITS, SHT_SYMTAB, SHT_STRTAB, SHT_RELA = 1, 2, 3, 4
SHF_WRITE, SHF_ALLOC, SHF_EXECINSTR = 0x1, 0x2, 0x4
STB_GLOBAL, STT_FUNC, STT_SECTION = 1, 2, 3
R_RISCV_NONE = 0
PF_X, PF_W, PF_R = 1, 2, 4

EHDR_SIZE, PHDR_SIZE, SHDR_SIZE, SYM_SIZE, RELA_SIZE = 52, 32, 40, 16, 12


class StandInError(Exception):
    """An invocation this stand-in does not understand; reported like a compiler error."""


def option_value(args: list[str], flag: str) -> str | None:
    """The value of `flag` given either as `flag value` or `flagvalue`."""
    for i, arg in enumerate(args):
        if arg == flag:
            if i + 1 >= len(args):
                raise StandInError(f"missing value after {flag}")
            return args[i + 1]
        if arg.startswith(flag) and len(arg) > len(flag):
            return arg[len(flag) :]
    return None


def linker_options(args: list[str]) -> list[str]:
    """Options passed through to the linker, from `-Wl,a,b` and `-Xlinker a`."""
    opts: list[str] = []
    for i, arg in enumerate(args):
        if arg.startswith("-Wl,"):
            opts.extend(arg[4:].split(","))
        elif arg == "-Xlinker" and i + 1 < len(args):
            opts.append(args[i + 1].strip('"'))
    return opts


def read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def write(path: str, contents: bytes) -> None:
    with open(path, "wb") as file:
        file.write(contents)


# --- compile steps -------------------------------------------------------------------------------------


def compile_step(args: list[str]) -> None:
    output = option_value(args, "-o")
    if output is None:
        raise StandInError("compile step without -o")
    write(output, PLACEHOLDER_OBJECT)
    depfile = option_value(args, "-MF")
    if depfile is not None:
        sources = [a for a in args if not a.startswith("-") and a.endswith((".c", ".cc", ".cpp", ".S"))]
        if not sources:
            raise StandInError("compile step with -MF but no source file")
        # gcc names the -o path as the target unless -MT overrides it; the runtime looks the object up by it.
        target = option_value(args, "-MT") or output
        write(depfile, f"{target}: {' '.join(sources)}\n".encode())


# --- reading ELF files ---------------------------------------------------------------------------------


def elf_symbols(path: str) -> dict[str, int]:
    """Name -> value of every named symbol in a 32-bit little-endian ELF's symbol tables."""
    data = read(path)
    if data[:4] != b"\x7fELF" or data[4] != 1 or data[5] != 1:
        raise StandInError(f"{path}: not a 32-bit little-endian ELF")
    (shoff,) = struct.unpack_from("<I", data, 32)
    shentsize, shnum = struct.unpack_from("<HH", data, 46)
    sections = [struct.unpack_from("<IIIIIIIIII", data, shoff + i * shentsize) for i in range(shnum)]
    symbols: dict[str, int] = {}
    for _name, sh_type, _flags, _addr, offset, size, link, _info, _align, entsize in sections:
        if sh_type != SHT_SYMTAB:
            continue
        strtab_offset = sections[link][4]
        for at in range(offset, offset + size, entsize):
            st_name, st_value = struct.unpack_from("<II", data, at)
            if st_name:
                end = data.index(b"\0", strtab_offset + st_name)
                symbols[data[strtab_offset + st_name : end].decode()] = st_value
    return symbols


def elf_entry(path: str) -> int:
    return struct.unpack_from("<I", read(path), 24)[0]


# --- linker scripts ------------------------------------------------------------------------------------

_BINARY_OPS: dict[type[ast.operator], Callable[[int, int], int]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.BitAnd: operator.and_,
    ast.BitOr: operator.or_,
    ast.LShift: operator.lshift,
    ast.RShift: operator.rshift,
}


def align(value: int, to: int = 4) -> int:
    return (value + to - 1) & ~(to - 1)


_MEMORY_BLOCK = re.compile(r"\bMEMORY\s*\{([^}]*)\}")
_REGION = re.compile(r"(\w+)\s*(?:\([^)]*\))?\s*:\s*ORIGIN\s*=\s*([^,]+?)\s*,\s*LENGTH\s*=\s*([^\n]+)")
_REGION_ALIAS = re.compile(r'REGION_ALIAS\s*\(\s*"(\w+)"\s*,\s*(\w+)\s*\)')
_ASSIGNMENT = re.compile(r"(?<![\w.$])([A-Za-z_]\w*)\s*=\s*([^;]+);")
_INCLUDE = re.compile(r'^\s*INCLUDE\s+"?([^"\s]+)"?', re.MULTILINE)
_ORIGIN_LENGTH = re.compile(r"\b(ORIGIN|LENGTH)\s*\(\s*(\w+)\s*\)")
_SIZE_SUFFIX = re.compile(r"\b(\d+)\s*([KM])\b")


class LinkerScript:
    """The parts of a GNU ld script that decide where .text and .data go.

    Covers what the TT kernel and firmware scripts use: INCLUDE, MEMORY regions, REGION_ALIAS, symbol
    assignments, and output sections placed at an address expression (`.text <expr> :`), with a load
    address (`AT(...)`), or in a region (`} > REGION`) with `ALIGN(n)`. Anything else is an error, so a
    script this model misreads fails the build loudly instead of placing code at a wrong address.
    """

    def __init__(self, paths: list[str], search_dirs: list[str], symbols: Mapping[str, int]) -> None:
        text = "\n".join(self._read(path, search_dirs) for path in paths)
        self.symbols = symbols
        self.regions = {
            m.group(1): (m.group(2), m.group(3))
            for block in _MEMORY_BLOCK.findall(text)
            for m in _REGION.finditer(block)
        }
        self.text = _MEMORY_BLOCK.sub("", text)
        for alias, region in _REGION_ALIAS.findall(self.text):
            self.regions[alias] = self.regions[region]
        self.assignments = dict(_ASSIGNMENT.findall(self.text))

    @staticmethod
    def _read(path: str, search_dirs: list[str]) -> str:
        text = re.sub(r"/\*.*?\*/", "", read(path).decode(), flags=re.DOTALL)

        def include(match: re.Match[str]) -> str:
            for directory in [os.path.dirname(path), *search_dirs]:
                if os.path.isfile(os.path.join(directory, match.group(1))):
                    return LinkerScript._read(os.path.join(directory, match.group(1)), search_dirs)
            raise StandInError(f"{path}: cannot find included script {match.group(1)}")

        return _INCLUDE.sub(include, text)

    def value(self, expression: str, depth: int = 0) -> int:
        """Value of an address expression: integers, symbols, ORIGIN/LENGTH, + - * / & | << >> ~ ( )."""
        if depth > 16:
            raise StandInError(f"linker script symbols refer to each other in a loop: {expression}")
        source = _ORIGIN_LENGTH.sub(lambda m: str(self._region(m.group(1), m.group(2), depth)), expression)
        source = _SIZE_SUFFIX.sub(lambda m: str(int(m.group(1)) << (10 if m.group(2) == "K" else 20)), source)
        # `/` in a linker script is integer division; `$` is legal in symbol names but not in Python's.
        source = source.replace("/", "//").replace("$", "_DOLLAR_")
        try:
            tree = ast.parse(source.strip(), mode="eval")
        except SyntaxError as exc:
            raise StandInError(f"unsupported linker script expression: {expression}") from exc
        return self._walk(tree.body, expression, depth) & 0xFFFFFFFF

    def _region(self, attribute: str, name: str, depth: int) -> int:
        if name not in self.regions:
            raise StandInError(f"linker script has no memory region {name}")
        origin, length = self.regions[name]
        return self.value(origin if attribute == "ORIGIN" else length, depth + 1)

    def _walk(self, node: ast.AST, expression: str, depth: int) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            name = node.id.replace("_DOLLAR_", "$")
            if name in self.assignments:
                return self.value(self.assignments[name], depth + 1)
            if name in self.symbols:
                return self.symbols[name]
            raise StandInError(f"symbol {name} is defined neither by the linker script nor by the firmware")
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
            left = self._walk(node.left, expression, depth)
            return _BINARY_OPS[type(node.op)](left, self._walk(node.right, expression, depth))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Invert):
            return ~self._walk(node.operand, expression, depth)
        raise StandInError(f"unsupported linker script expression: {expression}")

    def placement(self, section: str) -> tuple[int, bool]:
        """Run address of an output section, and whether it has a separate load address (AT)."""
        match = re.search(
            rf"^\s*{re.escape(section)}(?=[\s:])([^:\n]*):([^{{]*)\{{[^}}]*\}}\s*(?:>\s*(\w+))?",
            self.text,
            re.MULTILINE,
        )
        if match is None:
            raise StandInError(f"linker script has no output section {section}")
        address, attributes, region = match.group(1).strip(), match.group(2), match.group(3)
        if address:
            vma = self.value(address)
        elif region:
            vma = self.value(f"ORIGIN({region})")
        else:
            raise StandInError(f"linker script gives {section} neither an address nor a region")
        alignment = re.search(r"ALIGN\s*\(\s*(\w+)\s*\)", attributes)
        if alignment:
            vma = align(vma, self.value(alignment.group(1)))
        return vma, re.search(r"\bAT\s*\(", attributes) is not None


# --- writing the kernel ELF ----------------------------------------------------------------------------


def kernel_elf(text_addr: int, data_addr: int, data_lma: int) -> bytes:
    """A minimal ET_EXEC RISC-V image that the runtime's ELF reader accepts and can make execute-in-place.

    Two PT_LOAD segments, text first with the entry point at its start, then data; sections .text (one
    `ret`), .data (one word), .rela.text (a single R_RISCV_NONE), .symtab, .strtab and .shstrtab. Every
    offset and address is word aligned, as the reader requires.
    """
    text = struct.pack("<I", RISCV_RET)
    data = bytes(4)
    names = [".text", ".data", ".rela.text", ".symtab", ".strtab", ".shstrtab"]
    text_ix, symtab_ix, strtab_ix, shstrtab_ix = 1, 4, 5, 6
    shstrtab = b"\0" + b"".join(name.encode() + b"\0" for name in names)
    strtab = b"\0_start\0"
    symtab = (
        bytes(SYM_SIZE)  # the null symbol
        + struct.pack("<IIIBBH", 0, text_addr, 0, STT_SECTION, 0, text_ix)
        + struct.pack("<IIIBBH", 1, text_addr, len(text), (STB_GLOBAL << 4) | STT_FUNC, 0, text_ix)
    )
    first_global_symbol = 2
    rela = struct.pack("<IIi", text_addr, R_RISCV_NONE, 0)
    # name, type, flags, address, link, info, entry size, contents
    sections = [
        (".text", SHT_PROGBITS, SHF_ALLOC | SHF_EXECINSTR, text_addr, 0, 0, 0, text),
        (".data", SHT_PROGBITS, SHF_ALLOC | SHF_WRITE, data_addr, 0, 0, 0, data),
        (".rela.text", SHT_RELA, 0, 0, symtab_ix, text_ix, RELA_SIZE, rela),
        (".symtab", SHT_SYMTAB, 0, 0, strtab_ix, first_global_symbol, SYM_SIZE, symtab),
        (".strtab", SHT_STRTAB, 0, 0, 0, 0, 0, strtab),
        (".shstrtab", SHT_STRTAB, 0, 0, 0, 0, 0, shstrtab),
    ]

    image = bytearray(EHDR_SIZE + 2 * PHDR_SIZE)
    offsets = []
    for *_, contents in sections:
        image += bytes(align(len(image)) - len(image))
        offsets.append(len(image))
        image += contents
    image += bytes(align(len(image)) - len(image))
    shoff = len(image)

    image[0:EHDR_SIZE] = b"\x7fELF" + bytes([ELFCLASS32, ELFDATA2LSB, EV_CURRENT]) + bytes(9) + struct.pack(
        "<HHIIIIIHHHHHH", ET_EXEC, EM_RISCV, EV_CURRENT, text_addr, EHDR_SIZE, shoff, 0,
        EHDR_SIZE, PHDR_SIZE, 2, SHDR_SIZE, len(sections) + 1, shstrtab_ix,
    )  # fmt: skip
    image[EHDR_SIZE : EHDR_SIZE + 2 * PHDR_SIZE] = struct.pack(
        "<16I",
        PT_LOAD, offsets[0], text_addr, text_addr, len(text), len(text), PF_R | PF_X, 4,
        PT_LOAD, offsets[1], data_addr, data_lma, len(data), len(data), PF_R | PF_W, 4,
    )  # fmt: skip

    image += bytes(SHDR_SIZE)  # the null section
    for (name, sh_type, flags, addr, link, info, entsize, contents), offset in zip(
        sections, offsets, strict=True
    ):
        name_offset = shstrtab.index(name.encode() + b"\0")
        image += struct.pack(
            "<10I", name_offset, sh_type, flags, addr, offset, len(contents), link, info, 4, entsize
        )
    return bytes(image)


# --- link steps ----------------------------------------------------------------------------------------


def link_step(args: list[str]) -> None:
    output = option_value(args, "-o")
    script = option_value(args, "-T")
    if output is None or script is None:
        raise StandInError("link step without -o or -T")
    # Scripts given as plain inputs (the Ethernet memory map) are implicit linker scripts, read with -T's.
    scripts = [script] + [a for a in args if not a.startswith("-") and a.endswith(".ld")]
    search_dirs = [a[2:] for a in args if a.startswith("-L")]
    weakened = [opt.split("=", 1)[1] for opt in linker_options(args) if opt.startswith("--just-symbols=")]
    if weakened:
        layout = LinkerScript(scripts, search_dirs, elf_symbols(weakened[0]))
        text_addr, _ = layout.placement(".text")
        data_addr, data_has_lma = layout.placement(".data")
        # Kernel scripts load .data right after .text (`__kernel_data_lma = .`) and copy it to local
        # memory at start-up; without AT() the load and run addresses coincide.
        data_lma = align(text_addr + 4) if data_has_lma else data_addr
        write(output, kernel_elf(text_addr, data_addr, data_lma))
    else:
        firmware_link(output, LinkerScript(scripts, search_dirs, {}), script)


def firmware_link(output: str, layout: LinkerScript, script: str) -> None:
    """Copy the shipped firmware ELF of this processor whose entry is where this script puts .text."""
    processor = os.path.basename(output).split(".", 1)[0]
    text_addr, _ = layout.placement(".text")
    # <ttnn>/runtime/hw/toolchain/<arch>/firmware_<proc>.ld -> <ttnn>/tt_metal/pre-compiled/<key>/<proc>/
    ttnn_root = os.path.realpath(os.path.join(os.path.dirname(script), *[os.pardir] * 4))
    precompiled = os.path.join(ttnn_root, "tt_metal", "pre-compiled")
    for key in sorted(os.listdir(precompiled)):
        candidate = os.path.join(precompiled, key, processor, f"{processor}.elf")
        if os.path.isfile(candidate) and elf_entry(candidate) == text_addr:
            write(output, read(candidate))
            return
    raise StandInError(f"no shipped {processor} firmware starts at {text_addr:#x} (from {script})")


def main(args: list[str]) -> int:
    try:
        if "--version" in args:
            print(VERSION_LINE)
        elif "-c" in args or "-x" in args:
            compile_step(args)
        else:
            link_step(args)
    except (StandInError, OSError) as exc:
        print(f"riscv-tt-elf-g++ stand-in (mock validation only): {exc}", file=sys.stderr)
        print(f"  invoked as: {' '.join(args)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
