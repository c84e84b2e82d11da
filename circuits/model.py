"""Loading a Hugging Face causal LM and its tokenizer, wrapped with nnsight."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import zoo
from .devices import dtype_name, resolve_device, resolve_dtype
from .errors import ModelLoadError, OptionError, TaskError
from .placement import execution_device, is_placed, outer_offloaded, placing_arguments
from .task_tokens import prefix_ids
from .tokenizer import folder_tokenizer
from .weights import (
    FINGERPRINT_SAMPLES,
    SAFE_ONLY,
    SHAPE_FIELDS,
    TOKENIZER_FILES,
    WEIGHT_FILES,
    check_config_fits,
    check_folder,
    check_loading_info,
    fingerprint,
    is_legacy,
    legacy_fingerprint,
    weight_files,
)

__all__ = ["FINGERPRINT_SAMPLES", "SAFE_ONLY", "SHAPE_FIELDS", "TOKENIZER_FILES", "WEIGHT_FILES",
           "Model", "check_same_weights", "context_length", "dtype_name", "fingerprint",
           "load_model", "resolve_device", "resolve_dtype"]

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
    # the safetensors files the weights were read from (none for a model built in memory)
    _files: tuple[Path, ...] = field(default=(), repr=False)
    _legacy_fingerprint: str | None = field(default=None, repr=False)

    @property
    def envoy(self) -> Any:
        """The nnsight wrapper of `hf`, for node-level interventions (created on first use)."""
        if self._envoy is None:
            if is_placed(self.hf) and outer_offloaded(self.hf):
                raise OptionError(
                    f"{self.name!r} has its embedding, final norm or unembedding offloaded by its "
                    "device map, and node-level work (nnsight: node circuits, activation "
                    "patching, DLA, head roles) does not run on it; offload only layers "
                    "(transformer.h.N, model.layers.N) for that")
            import nnsight

            self._envoy = nnsight.NNsight(self.hf)
        return self._envoy

    @property
    def device(self) -> torch.device:
        """Where inputs go and results are kept: the parameters' device, or for a model loaded
        with a device map, the embedding's."""
        if is_placed(self.hf):
            return execution_device(self.hf.get_input_embeddings())
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
        """``v2-`` and 16 hex characters that identify the architecture, shape and weights as
        stored, whatever dtype they were loaded in.

        A sha256 over the class name, the config's shape fields and, for every parameter, its
        name, shape and 64 values sampled at a fixed stride, as float32, read from the
        safetensors files the model was loaded from in the dtype they were saved in (a few
        bytes per parameter, found through the files' headers). The same weights give the same
        fingerprint loaded in float32, bfloat16 or float16; other weights of the same shape
        give another. A model built in memory is sampled from its parameters as they are.
        Where the files do not hold a parameter under its name (a checkpoint transformers
        renames on loading) and the model is not in float32, the stored values are unknown:
        the fingerprint is then of the weights as loaded, the kind files written before ``v2-``
        hold (16 hex characters, no prefix), which matches only a load in the same dtype (see
        `check_same_weights`). Computed on first use and kept, so changing the weights in place
        does not change it.

        Examples
        --------
        >>> from circuits.testing import tiny_gpt2
        >>> tiny_gpt2(seed=0).fingerprint == tiny_gpt2(seed=0).fingerprint
        True
        >>> tiny_gpt2(seed=0).fingerprint == tiny_gpt2(seed=1).fingerprint
        False
        """
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.hf, self._files)
        return self._fingerprint

    def tokenize(self, texts: list[str], bos: bool | None = None) -> torch.Tensor:
        """Token ids ``[batch, pos]`` of texts that all have the same token length, each after
        ``circuits.task.prefix_ids(tokenizer, bos)`` (by default what the tokenizer itself puts
        before a text: a BOS token for Llama and Gemma, nothing for GPT-2)."""
        prefix = prefix_ids(self.tokenizer, bos)
        ids = [prefix + self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        if len({len(x) for x in ids}) != 1:
            raise TaskError("texts have different token lengths; tokenize them separately")
        return torch.tensor(ids, device=self.device)


def check_same_weights(model: Model, saved: Any, saved_dtype: Any, what: str, how_to_fix: str,
                       any_model: bool = False) -> str | None:
    """Refuse a model whose weights differ from those a saved circuit, scores file or tuned
    lens was made on, by the fingerprint it recorded (`Model.fingerprint`).

    A ``v2-`` fingerprint (of the weights as stored) is compared whatever dtype either model
    was loaded in. An older one, of the weights as loaded, is compared when the model is loaded
    in the dtype it was taken in; in another dtype the weights cannot be checked, and the
    result is accepted with a warning that says how to check them (refusing would break every
    file written before ``v2-`` for a change of dtype alone). A file that records no
    fingerprint is refused: nothing tells its weights from any others of the same shape.

    Parameters
    ----------
    model : Model
        The model the saved result is about to be used with.
    saved : str or None
        The fingerprint the file recorded.
    saved_dtype : str or None
        The dtype the model was loaded in when the file was made (``"float32"``); only an
        older fingerprint needs it.
    what : str
        The file and the model it names, opening every message, e.g. ``"c.json was
        discovered on 'ioi-gpt2-4l'"``.
    how_to_fix : str
        What to do when the weights differ or the file records none, e.g. ``"pass the
        circuit's model with --model, or --any-model to evaluate it anyway"``.
    any_model : bool
        Accept any weights without a check.

    Returns
    -------
    str or None
        The warning line when the weights could not be checked, else None.

    Raises
    ------
    OptionError
        The weights differ, or the file records no fingerprint (unless `any_model`).

    Examples
    --------
    >>> from circuits.testing import tiny_gpt2
    >>> model = tiny_gpt2(seed=0)
    >>> check_same_weights(model, model.fingerprint, "float32", "c.json was made on 'tiny'",
    ...                    "make it again") is None
    True
    >>> check_same_weights(tiny_gpt2(seed=1), model.fingerprint, "float32",
    ...                    "c.json was made on 'tiny'", "make it again")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    circuits.errors.OptionError: c.json was made on 'tiny' (weights v2-...), but ...
    """
    if any_model:
        return None
    if not isinstance(saved, str) or not saved:
        raise OptionError(f"{what}, but it records no fingerprint of those weights (removed "
                          f"from the file?), so {model.name!r} cannot be checked against them; "
                          f"{how_to_fix}")
    loaded = dtype_name(model.dtype)
    if is_legacy(saved):
        if saved_dtype != loaded:
            return (f"{what} with an older fingerprint of its weights as loaded in {saved_dtype} "
                    f"({saved}), which cannot be compared with {model.name!r} in {loaded}: the "
                    f"weights were not checked; load the model in {saved_dtype} to check them, "
                    "or make the file again to record a fingerprint of the weights as stored")
        if model._legacy_fingerprint is None:
            model._legacy_fingerprint = legacy_fingerprint(model.hf)
        current = model._legacy_fingerprint
    else:
        current = model.fingerprint
        if is_legacy(current):
            return (f"{what} (weights {saved}), which cannot be compared with {model.name!r} in "
                    f"{loaded}: its files name some parameters otherwise, so the values they "
                    "store are unknown in this dtype; load it in float32 to check the weights")
    if saved != current:
        raise OptionError(f"{what} (weights {saved}), but {model.name!r} has other weights "
                          f"({current}); {how_to_fix}")
    return None


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


def load_model(
    name_or_path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    device_map: str | os.PathLike | dict | None = None,
    max_memory: str | dict | None = None,
    offload_folder: str | os.PathLike | None = None,
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
    device_map : str, path or dict, optional
        Place the model's layers on several devices or offload them, with accelerate's
        big-model loading: ``"auto"`` (also ``"balanced"``, ``"balanced_low_0"``,
        ``"sequential"``) fills the GPUs, then the CPU, then the disk; a JSON file or dict maps
        module names to ``"cuda:N"``/N, ``"cpu"`` or ``"disk"``. Offloaded weights (``"cpu"`` or
        ``"disk"`` when a GPU runs the model, ``"disk"`` on a CPU machine) are brought in for
        the stage that reads them, so a model larger than the memory runs. The edge engine runs
        each layer on its device (`circuits.placement`). Give either `device` or this.
    max_memory : str or dict, optional
        With an automatic map, the most each device may hold: ``"0=20GiB,cpu=64GiB"``.
    offload_folder : path, optional
        Where weights offloaded to disk are written when the model's files cannot be read in
        place (safetensors files are read in place); by default a temporary folder removed
        with the model.

    Returns
    -------
    Model

    Raises
    ------
    ModelLoadError
        The folder is missing or incomplete; config.json is not JSON or has a shape field that
        is not a positive integer; the weights are not safetensors, or a safetensors file is
        truncated or of another format; the weights do not match the config (missing, unused
        or of another shape); the hub could not be reached; or transformers loads another
        tokenizer class than the folder names and the folder's tokenizer.json cannot be loaded.
    OptionError
        The name is not a non-empty string or path; the device or dtype is unknown or not
        available here, or the model cannot run in that dtype on that device.

    Notes
    -----
    Weights are read from safetensors files only: a PyTorch ``.bin`` file is a pickle, which
    can run code when read, so it is never opened (a folder or hub model with only those is
    refused with how to convert it). No remote code runs. The tokenizer is the one the
    folder's tokenizer_config.json names: where transformers loads another class (it forces
    ``Qwen2Tokenizer`` on every ``qwen2`` folder) that tokenizes text differently, the folder's
    tokenizer.json is used instead, with a warning (`circuits.tokenizer`).

    Examples
    --------
    >>> import circuits
    >>> model = circuits.load_model("ioi-gpt2-4l")
    >>> model.name, model.hf.config.n_layer
    ('ioi-gpt2-4l', 4)
    """
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    placing = placing_arguments(device, device_map, max_memory, offload_folder)
    folder, display = _resolve(name_or_path)
    files = check_folder(folder) if folder is not None else []
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
            checked = folder if folder is not None else _hub_folder(display)
            stored = files if folder is not None else _cached_weights(checked)
            if checked is not None and stored:
                # before anything is allocated: a config asking for far more than the weights
                # hold would otherwise run out of memory, or for minutes, before any check
                asked = check_config_fits(checked, stored, display)
                if asked is not None and not placing:
                    _check_memory(asked, display, dtype, device)
            tokenizer = AutoTokenizer.from_pretrained(
                source, local_files_only=local_only, trust_remote_code=False
            )
            # transformers may load another class than the folder names (circuits.tokenizer)
            tokenizer, note = folder_tokenizer(
                tokenizer, folder if folder is not None else _hub_folder(display))
            # mismatched shapes are reported through the loading info, checked below
            hf, info = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, local_files_only=local_only, use_safetensors=True,
                weights_only=True, trust_remote_code=False, output_loading_info=True,
                ignore_mismatched_sizes=True, **placing,
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
    check_loading_info(info, display)
    if note is not None:
        warnings.warn(note, stacklevel=2)
    logging.getLogger(__name__).debug("loaded %s", display)
    hf.eval()
    if not placing:
        hf.to(device)
    model = Model(hf=hf, tokenizer=tokenizer, name=display, _files=tuple(files))
    if placing.get("offload_folder") is not None and offload_folder is None:
        weakref.finalize(model, shutil.rmtree, placing["offload_folder"], True)
    if dtype != torch.float32:
        _check_runs(hf, display, model.device, dtype)
    if folder is None:  # now in the hub cache
        model._files = tuple(_cached_weights(_hub_folder(display)))
    return model


def _hub_folder(name: str) -> Path | None:
    """The hub cache's folder of a hub model's files, when its config is cached."""
    from huggingface_hub import try_to_load_from_cache

    try:
        config = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a valid repo id
        return None
    return Path(config).parent if isinstance(config, str) else None


def _cached_weights(folder: Path | None) -> list[Path]:
    """The safetensors files of a hub cache folder; none unless all of them are there."""
    try:
        return weight_files(folder) if folder is not None else []
    except ModelLoadError:  # a shard not downloaded yet
        return []


def available_memory() -> int | None:
    """Bytes of memory a new allocation can take: /proc/meminfo's MemAvailable (or psutil's),
    less where a cgroup (a container's limit) leaves less; None when unknown.

    Examples
    --------
    >>> free = available_memory()
    >>> free is None or free > 0
    True
    """
    free = None
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        try:
            import psutil
        except ImportError:
            return None
        free = int(psutil.virtual_memory().available)
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            free = min(free, int(limit) - used) if free is not None else int(limit) - used
    except (OSError, ValueError):
        pass
    return free


def _check_memory(n_params: int, display: str, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse a model whose parameters would not fit in the memory available (the load reads
    them into the machine's memory, then moves them to a GPU)."""
    need = n_params * torch.empty(0, dtype=dtype).element_size()
    places = [("this machine", available_memory())]
    if device.type == "cuda":
        places.append((f"the GPU {device}", torch.cuda.mem_get_info(device)[0]))
    smaller = "; load it in bfloat16, which halves that," if dtype == torch.float32 else ";"
    for where, free in places:
        if free is not None and need > free:
            raise ModelLoadError(
                f"{display!r} has {n_params:,} parameters, which take {need / 2**30:.1f} GiB in "
                f"{dtype_name(dtype)}, but {where} has {free / 2**30:.1f} GiB of memory "
                f"available{smaller} or free memory, or use a machine with more")


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
