"""Compile a Triton kernel for sm_90 without a GPU and count what its K loop costs: registers, spills, and the SASS
instructions of each loop (a backward branch's body), so GEMV variants can be ranked before a device run.

Triton's own ptxas / cuobjdump / nvdisasm (shipped in its wheel) do the work; nothing here needs CUDA. Used by
benchmarks/gpu_fp8_gemv_probe.py's ``--sass`` mode (no GPU: compile every probe candidate and print the counts).

    from triton_sass import compile_sm90
    info = compile_sm90(kernel, {"x_ptr": "*bf16", "M": "i32", "N": "i32:16", "BLOCK": 64}, num_warps=4)
    info.registers, info.spill_bytes, info.loops   # loops: SASS instruction counts, innermost first
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_LABEL = re.compile(r"^\.(L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*?`\(\.(L_x_\d+)\)")
_INSTR = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


@dataclass
class SassInfo:
    registers: int
    spill_bytes: int  # stack frame + local memory ptxas reports (0: nothing spilled)
    loops: list[dict[str, Any]] = field(default_factory=list)  # {"instructions", "opcodes"} per backward branch
    ptx: str = ""
    sass: str = ""

    def loop_cost(self) -> int:
        """Instructions of the largest loop body (the K loop of a GEMV; inner loops are counted inside it)."""
        return max((loop["instructions"] for loop in self.loops), default=0)


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _loops(sass: str) -> list[dict[str, Any]]:
    """Each backward branch's body (label .. branch) as an instruction count and opcode histogram."""
    lines = sass.splitlines()
    labels: dict[str, int] = {}
    loops = []
    for i, line in enumerate(lines):
        if (m := _LABEL.match(line.strip())) is not None:
            labels[m.group(1)] = i
        b = _BRANCH.search(line)
        if b is not None and b.group(1) in labels:  # the label came first: a backward branch
            body = [_INSTR.search(x) for x in lines[labels[b.group(1)]:i + 1]]
            ops: dict[str, int] = {}
            for op in (x.group(2).split(".")[0] for x in body if x is not None):
                ops[op] = ops.get(op, 0) + 1
            ops = dict(sorted(ops.items(), key=lambda kv: -kv[1]))
            loops.append({"instructions": sum(ops.values()), "opcodes": ops})
    return sorted(loops, key=lambda loop: loop["instructions"])


def compile_sm90(fn: Any, args: dict[str, Any], num_warps: int = 4, num_stages: int = 2, capability: int = 90,
                 keep_text: bool = False, gluon: bool = False) -> SassInfo:
    """``args``: every kernel argument by name: a type string ("*fp8e4nv", "*bf16", "i32"; ":16" appended marks a
    pointer or int divisible by 16, as the launcher would find it; pointers are marked by default) or a constexpr
    value. ``gluon``: ``fn`` is a Gluon kernel (explicit layouts)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for i, name in enumerate(fn.arg_names):
        value = args[name]
        if isinstance(value, str) and re.fullmatch(r"\*?(i|u|fp|bf)\d+(e\dnv)?(:\d+)?|\*?fp8e4nv(:\d+)?", value):
            kind, _, div = value.partition(":")
            signature[name] = kind
            if div == "16" or (kind.startswith("*") and div != "1"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "constexpr"
            constexprs[name] = value
    if gluon:
        from triton.experimental.gluon._runtime import GluonASTSource as ASTSource  # noqa: N814
    src = ASTSource(fn, signature, constexprs, attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    spill = sum(int(m) for m in re.findall(r"(?:STACK|LOCAL):(\d+)", usage))
    return SassInfo(regs, spill, _loops(sass), kernel.asm["ptx"] if keep_text else "",
                    sass if keep_text else "")


_SASS_INSTR = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;")
_NOT_A_WRITE = ("ST", "HGMMA", "ISETP", "FSETP", "BRA", "LDGSTS", "RED", "ATOM", "BAR", "WARPGROUP", "DEPBAR",
                "LDGDEPBAR", "MEMBAR", "FENCE", "EXIT", "NOP", "ARRIVES", "SYNCS", "UMOV", "UIADD3", "ULEA", "ULOP3",
                "USHF", "USEL", "R2UR")  # no general-register destination (uniform ones start with U)


def wgmma_operand_hazards(sass: str, loop_label: str | None = None) -> list[str]:
    """Instructions that write a general register an HGMMA in flight reads as its A operand (a register-A wgmma
    reads them asynchronously, until the WARPGROUP.DEPBAR that retires its group). The kernel's text is walked once
    in order, then, if ``loop_label`` (e.g. ".L_x_1") names a loop, its body twice more (the back edge: registers
    written early in an iteration while the last one's product still runs). Destinations are taken as the first
    operand of instructions that write one (4 registers for LDSM / 128-bit loads, 2 for 64-bit results)."""
    lines = sass.splitlines()
    walk = list(range(len(lines)))
    if loop_label is not None:
        start = next(i for i, line in enumerate(lines) if line.strip() == f"{loop_label}:")
        end = next(i for i, line in enumerate(lines) if f"BRA `({loop_label})" in line)
        walk += list(range(start + 1, end + 1)) * 2
    groups: list[set[int]] = []  # A registers of each committed, unretired wgmma group, oldest first
    pending: set[int] = set()
    found = []
    for i in walk:
        m = _SASS_INSTR.search(lines[i])
        if m is None:
            continue
        text = re.sub(r"^@!?U?P\w+\s+", "", m.group(1))
        op, _, operands = text.partition(" ")
        if op.startswith("HGMMA"):
            a = operands.split(",")[1].strip()
            if re.fullmatch(r"R\d+", a):
                pending |= set(range(int(a[1:]), int(a[1:]) + 4))
            if "gsb0" in operands:
                groups.append(pending)
                pending = set()
        elif op.startswith("WARPGROUP.DEPBAR"):
            keep = int(re.search(r"0x([0-9a-f]+)", operands).group(1), 16)
            del groups[:max(0, len(groups) - keep)]
        elif not op.startswith(_NOT_A_WRITE) and (d := re.match(r"R(\d+)\b", operands)) is not None:
            first = int(d.group(1))
            width = 4 if op.startswith("LDSM") or ".128" in op else 2 if (".64" in op or "WIDE" in op) else 1
            if any(set(range(first, first + width)) & g for g in groups):
                found.append(text)
    return found
