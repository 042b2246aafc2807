"""The stand-in RISC-V compiler (test infrastructure, mock validation only) does what the runtime needs.

The device tests show that ttnn accepts what it writes; these pin down what it writes: the version line
of the shipped firmware, depfiles, kernel images at the addresses the linker scripts give, firmware copies.
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest
import ttnn

from tests.tt.mock import riscv_tt_elf_gxx as stand_in

TTNN_DIR = Path(ttnn.__file__).parent
PRECOMPILED = TTNN_DIR / "tt_metal" / "pre-compiled"
WORMHOLE_SCRIPTS = TTNN_DIR / "runtime" / "hw" / "toolchain" / "wormhole"
INSTALLED = TTNN_DIR / "runtime" / "sfpi" / "compiler" / "bin" / "riscv-tt-elf-g++"


def test_version_line_is_the_one_the_shipped_firmware_was_built_with() -> None:
    comments = set()
    for elf in PRECOMPILED.glob("*/brisc/brisc.elf"):
        data = elf.read_bytes()
        start = data.index(b"GCC: (")
        comments.add(data[start : data.index(b"\0", start)].decode())
    # The .comment reads "GCC: (tenstorrent/sfpi:...) 15.1.0" where --version says "riscv-tt-elf-g++ (...)".
    assert comments == {stand_in.VERSION_LINE.replace("riscv-tt-elf-g++", "GCC:")}


@pytest.mark.skipif(
    not INSTALLED.exists() or "setup_tt.sh" not in INSTALLED.read_text(errors="replace"),
    reason="a real SFPI toolchain is installed in ttnn's runtime, not the stand-in",
)
def test_installed_stand_in_answers_version() -> None:
    result = subprocess.run([INSTALLED, "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines()[0] == stand_in.VERSION_LINE


def test_compile_step_writes_object_and_depfile(tmp_path: Path) -> None:
    source, obj, depfile = tmp_path / "brisck.cc", tmp_path / "brisck.123_4.o", tmp_path / "brisck.123_4.d"
    source.write_text("int main() { return 0; }\n")
    args = ["-O2", "-MMD", "-mcpu=tt-wh", "-c", "-o", str(obj), str(source), "-MF", str(depfile)]
    assert stand_in.main(args) == 0
    assert obj.read_bytes() == stand_in.PLACEHOLDER_OBJECT
    assert depfile.read_text() == f"{obj}: {source}\n"


def test_linker_script_placement(tmp_path: Path) -> None:
    """Every form of placing .text and .data that the TT scripts use, in one small script."""
    (tmp_path / "memory.ld").write_text(
        "MEMORY\n{\n  CODE : ORIGIN = 0x9040, LENGTH = 6K\n  DATA : ORIGIN = 0xEBE1, LENGTH = 0x1800\n}\n"
    )
    script = tmp_path / "kernel.ld"
    script.write_text(
        '/* comment */\nINCLUDE "memory.ld"\nREGION_ALIAS("KERNEL_DATA", DATA)\n'
        "__start = ORIGIN(CODE) + (((16 + 13312) + 31) & ~31);\n"
        "SECTIONS\n{\n"
        "  .text __start :\n  {\n    *(.text)\n  } > CODE :text\n"
        "  .data : ALIGN(16) {\n    *(.data)\n  } > KERNEL_DATA :data\n"
        "  .bss __fw_export_ldm_end : AT(__kernel_data_lma)\n  {\n  } :data\n"
        "}\n"
    )
    layout = stand_in.LinkerScript([str(script)], [], {"__fw_export_ldm_end": 0xFFB006E0})
    assert layout.placement(".text") == (0x9040 + 13344, False)
    assert layout.placement(".data") == (0xEBF0, False)
    assert layout.placement(".bss") == (0xFFB006E0, True)
    with pytest.raises(stand_in.StandInError, match=r"no output section \.rodata"):
        layout.placement(".rodata")


def read_elf(image: bytes) -> tuple[tuple[int, ...], list[tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """Header, program headers and named section headers of a 32-bit little-endian ELF."""
    header = struct.unpack_from("<16sHHIIIIIHHHHHH", image)
    phoff, shoff, phnum, shnum, shstrndx = header[5], header[6], header[10], header[12], header[13]
    phdrs = [struct.unpack_from("<8I", image, phoff + 32 * i) for i in range(phnum)]
    shdrs = [struct.unpack_from("<10I", image, shoff + 40 * i) for i in range(shnum)]
    names_at = shdrs[shstrndx][4]
    named = {image[names_at + s[0] : image.index(b"\0", names_at + s[0])].decode(): s for s in shdrs[1:]}
    return header, phdrs, named


def test_kernel_image_is_what_the_runtime_elf_reader_requires() -> None:
    text, data, lma = 0x49F0, 0xFFB006E0, 0x49F4
    header, phdrs, sections = read_elf(stand_in.kernel_elf(text, data, lma))
    ident, e_type, machine, _, entry, phoff, shoff = header[:7]
    assert ident[:7] == b"\x7fELF\x01\x01\x01"  # 32-bit, little-endian, current version
    assert (e_type, machine, entry) == (stand_in.ET_EXEC, stand_in.EM_RISCV, text)
    assert phoff % 4 == 0 and shoff % 4 == 0
    # Text first, entry at its start; then data, run at `data` and loaded at `lma`.
    loads = [(stand_in.PT_LOAD, text, text), (stand_in.PT_LOAD, data, lma)]
    assert [(p[0], p[2], p[3]) for p in phdrs] == loads
    for name, (_, _, flags, addr, offset, size, *_) in sections.items():
        assert offset % 4 == 0, name
        if flags & stand_in.SHF_ALLOC:
            assert any(p[2] <= addr and addr + size <= p[2] + p[5] for p in phdrs), f"{name} is in no segment"
    assert sections[".data"][3] == data
    # Execute-in-place needs a relocation section against an allocatable one: a single R_RISCV_NONE.
    rela = sections[".rela.text"]
    assert (rela[1], rela[5], rela[9]) == (stand_in.SHT_RELA, stand_in.RELA_SIZE, stand_in.RELA_SIZE)
    assert list(sections)[rela[7] - 1] == ".text"
    assert sections[".symtab"][1] == stand_in.SHT_SYMTAB


def test_firmware_link_copies_the_shipped_elf_of_that_processor(tmp_path: Path) -> None:
    output = tmp_path / "brisc.789_1.elf"
    args = ["-O2", f"-T{WORMHOLE_SCRIPTS / 'firmware_brisc.ld'}", "brisc.o", "-o", str(output)]
    assert stand_in.main(args) == 0
    shipped = {elf.read_bytes() for elf in PRECOMPILED.glob("*/brisc/brisc.elf")}
    assert output.read_bytes() in shipped
    # Where Wormhole's firmware script puts the BRISC's text: after the mailbox and its reserved space.
    assert stand_in.elf_entry(str(output)) == (((16 + 13312) + 31) & ~31) + 512 + 1024


def test_what_it_cannot_place_fails_the_build(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = tmp_path / "odd.ld"
    script.write_text("SECTIONS\n{\n  .text : { *(.text) }\n}\n")
    firmware = next(PRECOMPILED.glob("*/brisc/brisc_weakened.elf"))
    args = [f"-T{script}", f"-Wl,--just-symbols={firmware}", "-o", str(tmp_path / "brisc.elf")]
    assert stand_in.main(args) == 1
    assert "mock validation only" in capsys.readouterr().err
    assert not (tmp_path / "brisc.elf").exists()
