"""The CPU racc runs on, as ONNX Runtime's int8 kernels see it, and the int8 deploy targets.

ONNX Runtime's u8s8 matrix kernels (QLinearConv, QGemm, MatMulInteger; MLAS's QGEMM and its
symmetric conv) multiply uint8 activation codes by int8 weight codes. How they add the products
depends on the CPU, following MLAS's dispatch in the order it checks the features:

| CPU | instruction | a pair of products |
|---|---|---|
| x86-64 with AVX2 + FMA | vpmaddubsw | added in saturating 16-bit arithmetic |
| x86-64 with AVX-VNNI | vpdpbusd | added in 32 bits, exact |
| x86-64 with AVX-512 BW/DQ/VL, no AVX-512 VNNI | vpmaddubsw | saturating 16-bit (even with AVX-VNNI) |
| x86-64 with AVX-512 VNNI | vpdpbusd | exact |
| x86-64 with AMX-INT8 | tdpbusd (AVX-512 VNNI for small sizes) | exact |
| ARM64 | widening multiplies, or sdot/udot | exact (weights never reach -128) |

`2 * 255 * 127 = 64770` does not fit 16 bits, so a full-range file computes other integers on an
AVX2 CPU than on a VNNI one. With weight codes within +-64, `255 * (64 + 64) = 32640` does: no
pair can saturate, and every CPU computes the same exact sums. The `portable` target does that.
A depthwise conv (one input and one output channel per group) runs in MLAS's depthwise kernel,
which widens both operands to 16 bits and adds the products in 32 on every CPU: it keeps the full
range under every target.
"""

from __future__ import annotations

import functools
import platform
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# The largest int16 a pair of uint8 x int8 products may reach before vpmaddubsw saturates.
INT16_MAX = 32767
UINT8_MAX = 255
FULL_RANGE = 127  # symmetric int8 weight codes
# The /proc/cpuinfo flags that decide which int8 kernel MLAS picks.
INT8_FLAGS = frozenset(
    {"avx2", "fma", "avx_vnni", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni",
     "amx_tile", "amx_int8", "asimd", "asimddp"}
)  # fmt: skip


@dataclass(frozen=True)
class CpuInfo:
    """A CPU as ONNX Runtime's int8 kernels see it."""

    model: str
    arch: str  # "x86-64", "arm64" or what platform.machine() says
    kernel: str  # the u8s8 kernel family ONNX Runtime picks, e.g. "AVX2 (vpmaddubsw)"
    saturates: bool  # whether that kernel adds product pairs in saturating 16-bit arithmetic
    flags: frozenset[str] = frozenset()  # those of INT8_FLAGS the CPU has

    def __str__(self) -> str:
        how = (
            "adds uint8 x int8 product pairs in saturating 16-bit arithmetic"
            if self.saturates
            else "sums uint8 x int8 products exactly in 32 bits"
        )
        return f"{self.model} ({self.arch}): ONNX Runtime's int8 kernel {self.kernel} {how}"


def classify(machine: str, flags: Iterable[str], model: str = "") -> CpuInfo:
    """The u8s8 kernel ONNX Runtime's MLAS picks on a CPU with these /proc/cpuinfo flags."""
    flags = frozenset(flags) & INT8_FLAGS
    machine = machine.lower()
    if machine in ("aarch64", "arm64"):
        kernel = "ARM64 dot product (udot/sdot)" if "asimddp" in flags else "ARM64 NEON"
        return CpuInfo(model or "ARM64", "arm64", kernel, False, flags)
    if machine not in ("x86_64", "amd64", "i686", "x86"):
        return CpuInfo(model or machine, machine, "unknown (assumed to saturate)", True, flags)
    kernel, saturates = "SSE (assumed to saturate)", True
    if {"avx2", "fma"} <= flags:
        kernel, saturates = "AVX2 (vpmaddubsw)", True
        if "avx_vnni" in flags:
            kernel, saturates = "AVX-VNNI (vpdpbusd)", False
        if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
            kernel, saturates = "AVX-512 (vpmaddubsw)", True
            if "avx512_vnni" in flags:
                kernel, saturates = "AVX-512 VNNI (vpdpbusd)", False
        if {"amx_tile", "amx_int8"} <= flags:
            kernel, saturates = "AMX (tdpbusd)", False
    return CpuInfo(model or "x86-64", "x86-64", kernel, saturates, flags)


@functools.cache
def this_cpu() -> CpuInfo:
    """This machine's CPU, read from /proc/cpuinfo where there is one."""
    text = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pass
    flags = re.search(r"^(?:flags|Features)\s*:(.*)$", text, re.MULTILINE)
    model = re.search(r"^model name\s*:(.*)$", text, re.MULTILINE)
    return classify(
        platform.machine(),
        flags.group(1).split() if flags else (),
        model.group(1).strip() if model else platform.processor(),
    )


def pairs_fit_int16(pair: int) -> bool:
    """Whether two uint8 x int8 products whose weight codes add up to at most `pair` in magnitude
    always fit int16 (so no kernel can saturate them)."""
    return UINT8_MAX * pair <= INT16_MAX


@dataclass(frozen=True)
class Int8Target:
    """Where an int8 file is deployed, and so which integer ranges it may use."""

    name: str
    weight_max: int  # weight codes of layers run as GEMMs lie in [-weight_max, weight_max]
    exact_on: str

    @property
    def portable(self) -> bool:
        return pairs_fit_int16(2 * self.weight_max)

    def weight_max_for(self, depthwise: bool) -> int:
        """The weight codes' bound for a layer; depthwise convs never add product pairs."""
        return FULL_RANGE if depthwise else self.weight_max

    def exact_here(self, cpu: CpuInfo | None = None) -> bool:
        """Whether ONNX Runtime on `cpu` (this one by default) computes this target's integers."""
        return self.portable or not (cpu or this_cpu()).saturates


TARGETS = {
    "portable": Int8Target(
        "portable",
        64,
        "every CPU ONNX Runtime runs on: weight codes within +-64 (depthwise convs +-127), so no "
        "pair of uint8 x int8 products leaves 16 bits (255 * 128 = 32640)",
    ),
    "x86-vnni": Int8Target(
        "x86-vnni",
        FULL_RANGE,
        "CPUs that sum int8 products in 32 bits: x86-64 with AVX-512 VNNI, AVX-VNNI or AMX, and "
        "ARM64; x86-64 with only AVX2, or AVX-512 without VNNI, saturates 16-bit pair sums",
    ),
}
