"""What this node tells the cluster about itself: memory, cores, chip, backend."""

import platform
import socket
import subprocess
from functools import cache
from pathlib import Path

import psutil
from shoal_shared.telemetry import Backend, NodeTelemetry

from shoal_worker.downloads.store import free_disk_bytes


@cache
def chip_name() -> str:
    if platform.system() == "Darwin":
        result = subprocess.run(
            ["sysctl", "-n", "machdep.cpu.brand_string"],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout.strip()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@cache
def inference_backend() -> Backend:
    # Imported here: telemetry is read once, and MLX is the one heavy import of the worker.
    import mlx.core as mx

    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return "cpu"


def reachable_addresses(prefer_lan: bool) -> tuple[str, ...]:
    """IPv4 addresses peers can use for ring connections: LAN ones first, loopback last."""
    lan: list[str] = []
    loopback: list[str] = []
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET:
                (loopback if address.address.startswith("127.") else lan).append(address.address)
    return tuple(lan + loopback) if prefer_lan else tuple(loopback + lan)


def read_telemetry(
    prefer_lan: bool = True, models_dir: Path | None = None, can_download: bool = True
) -> NodeTelemetry:
    memory = psutil.virtual_memory()
    return NodeTelemetry(
        hostname=socket.gethostname(),
        platform=f"{platform.system()} {platform.machine()}",
        chip=chip_name(),
        backend=inference_backend(),
        cpu_cores=psutil.cpu_count(logical=True) or 1,
        memory_total_bytes=memory.total,
        memory_available_bytes=memory.available,
        addresses=reachable_addresses(prefer_lan),
        disk_available_bytes=free_disk_bytes(models_dir or Path.home()),
        can_download=can_download,
    )


def worth_reporting(previous: NodeTelemetry | None, current: NodeTelemetry) -> bool:
    """A new report when something but free memory and disk changed, free memory moved by 2%
    or free disk by a gigabyte."""
    if previous is None:
        return True
    fluctuating = {
        "memory_available_bytes": current.memory_available_bytes,
        "disk_available_bytes": current.disk_available_bytes,
    }
    if previous.model_copy(update=fluctuating) != current:
        return True
    moved = abs(previous.memory_available_bytes - current.memory_available_bytes)
    disk_moved = abs(previous.disk_available_bytes - current.disk_available_bytes)
    return moved > current.memory_total_bytes * 0.02 or disk_moved > 1_000_000_000
