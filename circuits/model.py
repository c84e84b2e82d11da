"""Loading a Hugging Face causal LM and its tokenizer, wrapped with nnsight."""

from __future__ import annotations

import logging
import os
import socket
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ModelLoadError, OptionError, TaskError

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
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


@dataclass
class Model:
    """A loaded model: the Hugging Face module, its tokenizer and an nnsight wrapper.

    Attributes
    ----------
    hf : transformers.PreTrainedModel
        The causal LM, in eval mode.
    tokenizer : transformers.PreTrainedTokenizerBase
    name : str
        What it was loaded from (a zoo name, a folder or a hub name).
    """

    hf: Any
    tokenizer: Any
    name: str
    _envoy: Any = field(default=None, repr=False)

    @property
    def envoy(self) -> Any:
        """The nnsight wrapper of `hf`, for node-level interventions (created on first use)."""
        if self._envoy is None:
            import nnsight

            self._envoy = nnsight.NNsight(self.hf)
        return self._envoy

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def architecture(self) -> str:
        return type(self.hf).__name__

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids ``[batch, pos]`` of texts that all have the same token length."""
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        if len({len(x) for x in ids}) != 1:
            raise TaskError("texts have different token lengths; tokenize them separately")
        return torch.tensor(ids, device=self.device)


def _resolve(name_or_path: str | os.PathLike) -> tuple[Path | None, str]:
    """Return (local folder or None for a hub name, display name)."""
    text = os.fspath(name_or_path)
    from . import zoo

    shipped = zoo.find(text)
    if shipped is not None:
        return shipped, text
    path = Path(text).expanduser()
    if path.is_dir():
        return path, text
    if path.exists():
        raise ModelLoadError(f"{text!r} is a file; pass the folder that holds config.json")
    # Hub names are 'name' or 'org/name'; anything else that does not exist is a missing folder.
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text:
        raise ModelLoadError(
            f"no model folder at {text!r}; pass an existing folder, a shipped model "
            "(see `circuits models`) or a Hugging Face hub name like 'gpt2'"
        )
    return None, text


def _in_hub_cache(name: str) -> bool:
    """Whether a hub model's config is already in the local cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def _hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """Whether the hub endpoint (``HF_ENDPOINT`` or the default) answers a TCP connect quickly,
    so a missing network fails in seconds instead of after minutes of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False, "HF_HUB_OFFLINE is set"
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError as err:
        return False, f"cannot reach {url.hostname}: {err.strerror or err}"
    return True, ""


def _check_folder(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json; it is not a Hugging Face model folder")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise ModelLoadError(
            f"{path} has no weights (model.safetensors or pytorch_model.bin); "
            "save the model with save_pretrained() into that folder"
        )
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelLoadError(
            f"{path} has no tokenizer (tokenizer.json); save it with tokenizer.save_pretrained()"
        )


def load_model(
    name_or_path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
) -> Model:
    """Load a causal LM and its tokenizer from a shipped name, a local folder or the hub.

    Parameters
    ----------
    name_or_path : str or path
        A reference model shipped with circuits (``circuits models`` lists them), a folder
        holding a Hugging Face model (config.json, weights, tokenizer) or a hub name such as
        ``"gpt2"`` (needs network access or the hub cache).
    device : str or torch.device
        ``"cpu"`` (default), ``"cuda"``, ``"cuda:1"``, ``"mps"``.
    dtype : str or torch.dtype
        Parameter dtype: ``"float32"`` (default; the parity tests pin it), ``"bfloat16"`` or
        ``"float16"``. Metrics are computed in float32 whatever the dtype. float16 runs on the
        CPU too, many times slower than float32; bfloat16 is the half precision for CPUs.

    Returns
    -------
    Model

    Raises
    ------
    ModelLoadError
        The folder is missing or incomplete, or the hub could not be reached.
    OptionError
        The device or dtype is unknown or not available here, or the model cannot run in that
        dtype on that device.

    Examples
    --------
    >>> import circuits
    >>> model = circuits.load_model("ioi-gpt2-4l")
    >>> model.name, model.hf.config.n_layer
    ('ioi-gpt2-4l', 4)
    """
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    folder, display = _resolve(name_or_path)
    if folder is not None:
        _check_folder(folder)
    source = str(folder) if folder is not None else display
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    local_only = folder is not None or _in_hub_cache(display)
    if not local_only:
        reachable, why = _hub_reachable()
        if not reachable:
            raise ModelLoadError(
                f"could not load {display!r} from the Hugging Face hub ({why}) and it is not in "
                "the local cache; connect to the network or pass a local model folder"
            )
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
            hf = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, local_files_only=local_only
            )
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if folder is None:
            raise ModelLoadError(
                f"could not load {display!r} from the Hugging Face hub ({first}); check the name "
                "and your network access, or pass a local folder"
            ) from None
        raise ModelLoadError(f"could not load the model in {folder}: {first}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    logging.getLogger(__name__).debug("loaded %s", display)
    hf.eval().to(device)
    if dtype != torch.float32:
        _check_runs(hf, display, device, dtype)
    return Model(hf=hf, tokenizer=tokenizer, name=display)


def _check_runs(hf: Any, display: str, device: torch.device, dtype: torch.dtype) -> None:
    """Run one token through the model, so that a dtype the device has no kernels for fails
    now, with the fix, rather than halfway through a method."""
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    try:
        with torch.no_grad():
            hf(ids, attention_mask=torch.ones_like(ids))
    except (RuntimeError, NotImplementedError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OptionError(f"{display!r} cannot run in {dtype_name(dtype)} on {device} ({first}); "
                          "use dtype float32, which runs everywhere") from None
