"""What a run's numbers depend on beyond its seed and config: the CPU it ran on.

`cpu_kind()` keys reproducibility: training is bit-identical between hosts of one kind (the
dense references of seeds 0-4 were re-trained identically across sessions on AMD AVX-512 hosts
and on AMD AVX2 hosts), and differs between kinds — AVX2 against AVX-512, and an Intel AVX-512
host against the AMD AVX-512 ones (docs/development/notebook.md). Study rows carry it,
and a claim pairs a seed's variants only when they share one kind. Read from /proc/cpuinfo:
hosts sold under one model name ("AMD EPYC" on a VM) differ in their flags.
"""
from __future__ import annotations

import platform
from pathlib import Path

VENDORS = {"AuthenticAMD": "amd", "GenuineIntel": "intel"}


def _cpuinfo(field: str) -> str:
    """The first value of `field` in /proc/cpuinfo ("" where there is none or it is unreadable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == field:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_name() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_isa() -> str:
    """The widest x86 vector extension the CPU has ("avx512", "avx2", "avx", ""): timings differ by it."""
    flags = set(_cpuinfo("flags").split())
    return next((isa for isa, flag in (("avx512", "avx512f"), ("avx2", "avx2"), ("avx", "avx")) if flag in flags), "")


def cpu_kind() -> str:
    """The widest vector extension and the vendor: "avx512-amd", "avx2-amd", "avx512-intel" ("" off
    x86 Linux). Hosts of one kind that still differ (another cache or AMX) show it in their dense
    references, which a study pairs on too (a seed's variants must share one)."""
    isa, vendor = cpu_isa(), _cpuinfo("vendor_id")
    return f"{isa}-{VENDORS.get(vendor, vendor.lower() or 'unknown')}" if isa else ""


def kind_of(env: dict) -> str:
    """The CPU kind a results.json `env` records; for one written before `cpu_kind` existed, from its
    `cpu` (model name) and `cpu_isa`."""
    if env.get("cpu_kind"):
        return str(env["cpu_kind"])
    isa, name = str(env.get("cpu_isa") or ""), str(env.get("cpu") or "")
    vendor = "amd" if "AMD" in name else "intel" if "Intel" in name else ""
    return f"{isa}-{vendor}" if isa and vendor else isa


def kind_label(kind: str) -> str:
    """A kind for the reader: "avx512-intel" → "AVX-512 (Intel)"; "avx2" (vendor not recorded) → "AVX2"."""
    if kind in ("", "unknown"):
        return "not recorded"
    parts = kind.split("-")
    isa = {"avx512": "AVX-512", "avx2": "AVX2", "avx": "AVX"}.get(parts[0], parts[0])
    vendor = {"amd": "AMD", "intel": "Intel"}.get(parts[-1], parts[-1]) if len(parts) > 1 else ""
    return f"{isa} ({vendor})" if vendor else isa
