"""Loading a Hugging Face causal LM and its tokenizer, wrapped with nnsight."""

from __future__ import annotations

import hashlib
import json
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
#: config.json fields that, when present, must be positive whole numbers (the model's shape).
SHAPE_FIELDS = (
    "n_layer", "num_hidden_layers", "n_head", "num_attention_heads", "num_key_value_heads",
    "n_embd", "hidden_size", "n_inner", "intermediate_size", "head_dim", "vocab_size",
    "n_positions", "max_position_embeddings",
)
#: How to turn pickled weights into a file `load_model` reads (ends every refusal of them).
SAFE_ONLY = ("circuits loads only safetensors files, so that no code in a model file runs: load "
             "the model yourself in a trusted environment and save it with "
             "model.save_pretrained(folder), which writes model.safetensors")
#: Values sampled from each parameter for `Model.fingerprint`.
FINGERPRINT_SAMPLES = 64
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
    _fingerprint: str | None = field(default=None, repr=False)

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

    @property
    def context_length(self) -> int | None:
        """The longest input, in tokens, the model reads (see `context_length`)."""
        return context_length(self)

    @property
    def fingerprint(self) -> str:
        """16 hex characters that identify the architecture, shape and weights as loaded.

        A sha256 over the class name, the config's shape fields and, for every parameter,
        its name, shape and 64 values sampled at a fixed stride, taken as float32. The same
        weights loaded twice in the same dtype give the same fingerprint; other weights of the
        same shape give another. The sample is of the values as loaded, so a bfloat16 load of
        float32 weights has another fingerprint than the float32 load: compare fingerprints of
        loads in the same dtype. Computed on first use (a few milliseconds) and kept, so
        changing the weights in place afterwards does not change it.

        Examples
        --------
        >>> from circuits.testing import tiny_gpt2
        >>> tiny_gpt2(seed=0).fingerprint == tiny_gpt2(seed=0).fingerprint
        True
        >>> tiny_gpt2(seed=0).fingerprint == tiny_gpt2(seed=1).fingerprint
        False
        """
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.hf)
        return self._fingerprint

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids ``[batch, pos]`` of texts that all have the same token length."""
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        if len({len(x) for x in ids}) != 1:
            raise TaskError("texts have different token lengths; tokenize them separately")
        return torch.tensor(ids, device=self.device)


def context_length(model: Any) -> int | None:
    """The longest input, in tokens, a model reads, from its config; None when unknown.

    Parameters
    ----------
    model : Model or transformers.PreTrainedModel

    Returns
    -------
    int or None
        ``n_positions`` or ``max_position_embeddings`` of the config.

    Examples
    --------
    >>> from circuits.testing import tiny_gpt2
    >>> context_length(tiny_gpt2(n_positions=64))
    64
    """
    config = getattr(getattr(model, "hf", model), "config", None)
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def fingerprint(hf: Any) -> str:
    """16 hex characters of sha256 over a model's class, config shape and sampled weights.

    See `Model.fingerprint`, which keeps the value.

    Parameters
    ----------
    hf : torch.nn.Module
        Usually a transformers model.

    Returns
    -------
    str
    """
    digest = hashlib.sha256(type(hf).__name__.encode())
    config = getattr(hf, "config", None)
    shape = {key: getattr(config, key, None) for key in SHAPE_FIELDS}
    digest.update(json.dumps(shape, sort_keys=True, default=str).encode())
    names, samples = [], []
    with torch.no_grad():
        for name, param in hf.named_parameters():
            numel = param.numel()
            count = min(FINGERPRINT_SAMPLES, numel)
            # evenly spread positions, first element included; take() reads the flattened view
            index = torch.arange(count, device=param.device) * numel // max(count, 1)
            samples.append(torch.take(param, index).float())
            names.append(f"{name}{list(param.shape)}")
        values = torch.cat(samples).cpu() if samples else torch.zeros(0)  # one transfer
    digest.update("\n".join(names).encode())
    digest.update(values.numpy().tobytes())
    return digest.hexdigest()[:16]


def _check_name(name_or_path: Any) -> str:
    """The model name as text, or an `OptionError` for a value that names nothing."""
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
    if not isinstance(name_or_path, str):
        raise OptionError(f"the model must be a name or a folder path, got "
                          f"{type(name_or_path).__name__} {name_or_path!r}; pass a shipped model "
                          "(see `circuits models`), a folder or a hub name like 'gpt2'")
    if not name_or_path.strip() or "\x00" in name_or_path:
        raise OptionError(f"the model name {name_or_path!r} is empty or not a name; pass a shipped "
                          "model (see `circuits models`), a folder or a hub name like 'gpt2'")
    return name_or_path


def _resolve(name_or_path: str | os.PathLike) -> tuple[Path | None, str]:
    """Return (local folder or None for a hub name, display name)."""
    text = _check_name(name_or_path)
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
    """Check a model folder before transformers reads it."""
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
    _check_config(path)
    # transformers' order: a single safetensors file, then sharded safetensors
    if (path / "model.safetensors").is_file():
        _check_safetensors(path / "model.safetensors", path)
    elif (path / "model.safetensors.index.json").is_file():
        for shard in _shards(path, "model.safetensors.index.json"):
            _check_safetensors(shard, path)
    else:  # PyTorch files are pickles, which can run code when read: never opened
        raise ModelLoadError(f"{path} has only PyTorch weights (pytorch_model.bin), which are "
                             f"pickles; {SAFE_ONLY}")


def _read_json(file: Path, folder: Path) -> dict[str, Any]:
    """A JSON object from a file of a model folder, or a `ModelLoadError`."""
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        why = getattr(err, "strerror", None) or str(err).splitlines()[0][:80]
        raise ModelLoadError(f"{file.name} in {folder} is not readable JSON ({why}); save the "
                             "model again with save_pretrained()") from None
    if not isinstance(record, dict):
        raise ModelLoadError(f"{file.name} in {folder} is not a JSON object; save the model "
                             "again with save_pretrained()")
    return record


def _check_config(folder: Path) -> None:
    """Refuse a config.json that is not JSON or whose shape fields are not positive integers
    (transformers would fail later with a TypeError deep inside the model class)."""
    config = _read_json(folder / "config.json", folder)
    for key in SHAPE_FIELDS:
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelLoadError(f"config.json in {folder}: {key} must be a positive whole "
                                 f"number, got {value!r}; fix config.json")


def _shards(folder: Path, index_name: str) -> list[Path]:
    """The weight files a sharded checkpoint's index names, each checked to exist."""
    index = _read_json(folder / index_name, folder)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()):
        raise ModelLoadError(f"{index_name} in {folder} has no weight_map of file names; save "
                             "the model again with save_pretrained()")
    shards = []
    for name in sorted(set(weight_map.values())):
        shard = folder / name
        if Path(name).name != name or not shard.is_file():
            raise ModelLoadError(f"{index_name} in {folder} names the weight file {name!r}, "
                                 "which is not in the folder; copy the whole model folder")
        shards.append(shard)
    return shards


def _check_safetensors(file: Path, folder: Path) -> None:
    """Read a safetensors header, which also checks that the file is complete."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as err:
        why = str(err).strip().splitlines()[0][:100] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"{file.name} in {folder} is truncated or not a safetensors file "
                             f"({why}); copy or save the model again") from None


def _check_loading_info(info: dict[str, Any], display: str) -> None:
    """Refuse a model whose weights do not match its config: transformers would initialise
    the missing or mis-shaped ones at random and run without a word."""
    problems = []
    # each mismatch is (name, shape in the weights, shape the config gives)
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda item: str(item[0]))
    if mismatched:
        key, stored, wanted = mismatched[0][:3]
        problems.append(f"{len(mismatched)} weights have another shape than the config gives "
                        f"(first: {key} is {list(stored)} in the weights but {list(wanted)} by "
                        "the config)")
    for kind, what in (("missing_keys", "weights the config needs are missing"),
                       ("unexpected_keys", "weights are not used by the config")):
        keys = sorted(info.get(kind) or ())
        if keys:
            first = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
            problems.append(f"{len(keys)} {what} ({first})")
    if problems:
        raise ModelLoadError(
            f"the weights of {display!r} do not match its config.json: "
            f"{'; '.join(problems)}; fix config.json or save the model again with save_pretrained()"
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
        The folder is missing or incomplete; config.json is not JSON or has a shape field that
        is not a positive integer; the weights are not safetensors, or a safetensors file is
        truncated or of another format; the weights do not match the config (missing, unused
        or of another shape); or the hub could not be reached.
    OptionError
        The name is not a non-empty string or path; the device or dtype is unknown or not
        available here, or the model cannot run in that dtype on that device.

    Notes
    -----
    Weights are read from safetensors files only: a PyTorch ``.bin`` file is a pickle, which
    can run code when read, so it is never opened (a folder or hub model with only those is
    refused with how to convert it). No remote code runs.

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
            tokenizer = AutoTokenizer.from_pretrained(
                source, local_files_only=local_only, trust_remote_code=False
            )
            # mismatched shapes are reported through the loading info, checked below
            hf, info = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, local_files_only=local_only, use_safetensors=True,
                weights_only=True, trust_remote_code=False, output_loading_info=True,
                ignore_mismatched_sizes=True,
            )
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if folder is None and "cannot be loaded with `safetensors`" in first:
            # transformers' own advice here is to drop use_safetensors=True
            raise ModelLoadError(f"{display!r} on the Hugging Face hub has only PyTorch (pickle) "
                                 f"weights; {SAFE_ONLY}") from None
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
    _check_loading_info(info, display)
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
