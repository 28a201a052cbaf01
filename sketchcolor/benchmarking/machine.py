"""A description of the machine a result was measured on: CPU, cores, GPU, versions, date."""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys

import torch


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what platform knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: torch.device | str) -> dict:
    """Machine, software and time of a run on ``device``, for JSON reports and RESULTS.md."""
    device = torch.device(device)
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device.type,
        "command": command_line(),
    }
    if device.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def summary(info: dict) -> str:
    """One line for a results file: when, on what, with which torch (``info`` from describe)."""
    where = info.get("gpu") or f"{info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads"
    return f"{info['date']} on {where}; torch {info['torch']}"


def provenance(device: torch.device | str) -> str:
    """The lines under a results-file section's heading: the summary of a run on ``device``, then
    the command that made it (a Markdown line break between them)."""
    info = describe(device)
    return f"{summary(info)}.  \nCommand: `{info['command']}`"


def command_line() -> str:
    """The command that started this process, as it could be typed again from the same folder."""
    program, args = sys.argv[0], sys.argv[1:]
    if os.path.basename(program) == "__main__.py":  # python -m <package>
        words = ["python", "-m", os.path.basename(os.path.dirname(program))]
    elif program.endswith(".py"):
        words = ["python", os.path.relpath(program)]
    else:  # a console script such as `sketchcolor`
        words = [os.path.basename(program)]
    return shlex.join(words + args)
