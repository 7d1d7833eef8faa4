"""The one reader of device names: ``--device`` of every command and ``device=`` of the Python API.

``parse_device`` accepts ``cpu``, ``cuda``, ``cuda:N``, a bare GPU number ``N`` (``cuda:N``) and
``mps``, and checks that the device exists on this machine, so that a missing GPU is one clear
line ("no CUDA device is available ...; use --device cpu") before any weights are read, never a
driver traceback from the first tensor moved to it.
"""

from __future__ import annotations

import torch

DEVICE_CHOICES = "cpu, cuda, cuda:N, N (= cuda:N) or mps"


class DeviceError(ValueError):
    """A device name that is not a device, or a device this machine does not have."""


def _torch_build() -> str:
    """What this torch was built for, to say why a GPU is missing."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA"
    return f"torch {torch.__version__} for CUDA {torch.version.cuda} finds no usable GPU or driver"


def parse_device(device: str | int | torch.device | None = None, option: str = "device") -> torch.device:
    """The ``torch.device`` of ``device``, checked to exist here.

    ``None`` (or ``"auto"``) is CUDA if available, else the CPU. ``"cuda"`` stays without an index
    (the current device; one per process under ``torchrun``). ``option`` names the setting in
    messages: ``"--device"`` on the command line, ``"device"`` in Python.
    Raises ``DeviceError`` (a ``ValueError``) naming the value, the reason and what to use instead.
    """
    if device is None or (isinstance(device, str) and device.strip().lower() in ("", "auto")):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cli = option.startswith("-")
    label = f"{option} {device}" if cli else f"{option} {str(device)!r}"
    use_cpu = f"{option} cpu" if cli else f"{option}='cpu'"
    if isinstance(device, torch.device):
        dev = device
    else:
        text = str(device).strip().lower()
        if text.isdigit():
            text = f"cuda:{text}"
        try:
            dev = torch.device(text)
        except (RuntimeError, ValueError):
            raise DeviceError(f"{label}: not a device; use {DEVICE_CHOICES}") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{label}: no CUDA device is available on this machine ({_torch_build()}); use {use_cpu}")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            have = "cuda:0" if count == 1 else f"cuda:0 .. cuda:{count - 1}"
            raise DeviceError(f"{label}: this machine has {count} CUDA device(s) ({have}); use one of them or cpu")
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"{label}: Apple's MPS backend is not available on this machine; use {use_cpu}")
        return dev
    raise DeviceError(f"{label}: {dev.type} devices are not supported; use {DEVICE_CHOICES}")
