"""Devices and dtypes by name, checked against this machine."""

from __future__ import annotations

import torch

from .errors import OptionError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_TYPES = ("cpu", "cuda", "mps")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The parameter dtype for a name (``"float32"``, ``"bfloat16"``, ``"float16"``) or one of
    those torch dtypes.

    Parameters
    ----------
    dtype : str or torch.dtype

    Returns
    -------
    torch.dtype

    Raises
    ------
    OptionError
        Any other name or dtype.

    Examples
    --------
    >>> resolve_dtype("bfloat16")
    torch.bfloat16
    """
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise OptionError(f"unknown dtype {str(dtype)!r}; use float32, bfloat16 or float16")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (how a dtype is recorded in results)."""
    return str(dtype).removeprefix("torch.")


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch device for ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` (or a torch.device),
    checked to exist on this machine.

    Parameters
    ----------
    device : str or torch.device

    Returns
    -------
    torch.device

    Raises
    ------
    OptionError
        Torch cannot parse the name, the device type is not one of cpu, cuda and mps, or this
        machine has no such device.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    try:
        dev = device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise OptionError(f"unknown device {str(device)!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type not in DEVICE_TYPES:
        raise OptionError(f"device type {dev.type!r} is not supported; use cpu, cuda, cuda:N or "
                          "mps")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"device {str(device)!r} asked for, but torch sees no CUDA GPU on "
                              "this machine (or was built without CUDA); use cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise OptionError(f"device {str(device)!r} does not exist: this machine has {count} "
                              f"CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise OptionError(f"device {str(device)!r} asked for, but torch sees no Apple MPS device "
                          "on this machine; use cpu")
    return dev
