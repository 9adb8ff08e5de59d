"""The kind of CPU a run's numbers belong to.

On CPU the same recipe and seed give bit-identical metrics on the same kind of CPU only: torch
picks its vector kernels by instruction set (AVX2, AVX512, ...) and its math library takes its
own code paths by maker, and sums run in another order with other vector widths. The kind is
kept in ``env.json`` and ``summary.json``, so that a golden record says which CPU it was made on. A run on
a GPU takes its numbers from the GPU: its summary also says that kind (``"device"``).
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def cpu_kind() -> str:
    """E.g. ``"AuthenticAMD x86_64 AVX2"``: the CPU's maker where the system says it, the machine,
    and the instruction set torch's CPU kernels use."""
    parts = [_maker(), platform.machine(), torch.backends.cpu.get_cpu_capability()]
    return " ".join(part for part in parts if part)


def device_kind(device: torch.device) -> str | None:
    """E.g. ``"cuda NVIDIA H200"``: the kind of accelerator a run on ``device`` takes its numbers from;
    None on the CPU."""
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        return f"cuda {torch.cuda.get_device_name(device)}"
    return device.type


CPUINFO = Path("/proc/cpuinfo")
MAKER_KEYS = {"vendor_id": "", "CPU implementer": "implementer "}  # x86's; ARM's, a code: 0x41 Arm, 0x46 Fujitsu


def _maker() -> str:
    """Linux's ``vendor_id`` (GenuineIntel, AuthenticAMD) or ARM's ``CPU implementer``; elsewhere what
    ``platform`` says, if anything."""
    try:
        with CPUINFO.open(encoding="utf-8", errors="replace") as lines:
            for line in lines:
                key, _, value = line.partition(":")
                if key.strip() in MAKER_KEYS:
                    return MAKER_KEYS[key.strip()] + value.strip()
    except OSError:  # not Linux
        pass
    text = platform.processor()  # Windows: "Intel64 Family 6 Model 85 Stepping 7, GenuineIntel"
    return text.rpartition(",")[2].strip() if "," in text else ""
