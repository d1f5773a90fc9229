"""A record of where a result was produced (device, software versions, commit), stored with every result."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch

from ssdd.device import bf16_native_on_cpu, precision


def git_commit() -> str:
    """The checkout's short commit hash (with ``+dirty`` for uncommitted changes), or ``unknown``."""
    here = Path(__file__).parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=here, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=here, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's architecture, threads and whether ``amp`` runs in bf16 there (native bf16) or
    stays float32, since the two give different numbers; ``--precision float32`` is named as such."""
    forced = precision() == "float32"
    if device.type == "cuda":
        return torch.cuda.get_device_name(device) + (" (--precision float32)" if forced else "")
    if device.type == "cpu":
        mode = "float32 (--precision float32)" if forced else "native bf16" if bf16_native_on_cpu() else "float32"
        return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads, {mode})"
    return f"{device.type} ({platform.machine()})"


def environment(device: torch.device) -> dict[str, str]:
    """Where a result was produced (with the number of processes when it was made by several)."""
    from ssdd.distributed import world

    env = {"device": device_name(device), "torch": torch.__version__, "python": platform.python_version(),
           "commit": git_commit()}
    if world().size > 1:
        env["processes"] = str(world().size)
    return env


def combined_environment(environments: dict[str, dict[str, str]]) -> dict[str, str]:
    """One environment for results computed in several (``{name: environment}``): a key whose value differs names
    its values with the results that had each, e.g. ``{"commit": "dd60dad (dm-ssl, none); eb0bacd (teacher)"}``."""
    keys = dict.fromkeys(k for env in environments.values() for k in env)
    out = {}
    for key in keys:
        by_value: dict[str, list[str]] = {}
        for name, env in environments.items():
            by_value.setdefault(env.get(key, "not recorded"), []).append(name)
        out[key] = next(iter(by_value)) if len(by_value) == 1 else "; ".join(
            f"{value} ({', '.join(names)})" for value, names in by_value.items())
    return out


class PeakMemory:
    """Peak memory of the code run inside ``with PeakMemory(device) as peak:``, in ``peak.bytes`` afterwards.

    On CUDA: the most memory torch allocated on the device. On CPU: the process's peak resident memory, reset on
    entry where Linux allows it (``/proc/self/clear_refs``), else the process's peak so far (an upper bound);
    ``None`` where neither can be read.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.bytes = torch.cuda.max_memory_allocated(self.device)
            return
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.bytes = int(line.split()[1]) * 1024
                    return
        except OSError:
            pass
        try:
            import resource

            self.bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        except (ImportError, OSError):
            self.bytes = None
