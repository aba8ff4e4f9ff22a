"""The CPU kind a run records (prune_lab/cpu.py): what keys reproducibility between hosts."""
from __future__ import annotations

import pytest

from prune_lab import cpu


def _cpuinfo(vendor: str, flags: str):
    text = {"vendor_id": vendor, "model name": "some model", "flags": flags}
    return lambda field: text.get(field, "")


@pytest.mark.parametrize("vendor, flags, kind", [
    ("AuthenticAMD", "fpu sse avx avx2 avx512f avx512bw", "avx512-amd"),
    ("AuthenticAMD", "fpu sse avx avx2", "avx2-amd"),
    ("GenuineIntel", "fpu avx avx2 avx512f amx_tile", "avx512-intel"),
    ("HygonGenuine", "fpu avx avx2", "avx2-hygongenuine"),
    ("GenuineIntel", "fpu sse", ""),  # no AVX (or not x86): no kind is claimed
])
def test_kind_is_widest_isa_and_vendor(monkeypatch, vendor, flags, kind):
    monkeypatch.setattr(cpu, "_cpuinfo", _cpuinfo(vendor, flags))
    assert cpu.cpu_kind() == kind


def test_kind_of_an_env_written_before_the_field_comes_from_its_model_name():
    assert cpu.kind_of({"cpu_kind": "avx2-amd", "cpu_isa": "avx512", "cpu": "Intel"}) == "avx2-amd"  # recorded wins
    assert cpu.kind_of({"cpu": "AMD EPYC", "cpu_isa": "avx512"}) == "avx512-amd"
    assert cpu.kind_of({"cpu": "Intel(R) Xeon(R) Processor", "cpu_isa": "avx512"}) == "avx512-intel"
    assert cpu.kind_of({"cpu": "", "cpu_isa": "avx2"}) == "avx2"  # vendor unknown: not equal to any full kind
    assert cpu.kind_of({}) == ""


def test_kind_labels_for_the_reader():
    assert cpu.kind_label("avx512-amd") == "AVX-512 (AMD)"
    assert cpu.kind_label("avx512-intel") == "AVX-512 (Intel)"
    assert cpu.kind_label("avx2") == "AVX2"
    assert cpu.kind_label("") == cpu.kind_label("unknown") == "not recorded"
