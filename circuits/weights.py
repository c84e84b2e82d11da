"""A model folder's weight files, read through their headers: checked before transformers reads
them, compared with what config.json asks for, and sampled for the weights' fingerprint.

A safetensors file is an 8-byte little-endian header length, a JSON header (each tensor's
dtype, shape and byte range) and the raw data. Everything here reads the headers and, for the
fingerprint, a few values at known byte offsets: no whole tensor is read, and nothing is
allocated for a model before its config is known to fit its weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import mmap
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ModelLoadError
from .placement import offloaded_value

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
#: Values sampled from each parameter for a fingerprint.
FINGERPRINT_SAMPLES = 64
#: What marks a fingerprint of the weights as stored (`fingerprint`); one of 16 bare hex
#: characters is of the weights as loaded (`legacy_fingerprint`), written before version 2.
STORED_PREFIX = "v2-"
# safetensors dtype codes -> torch dtypes
_STORED_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


# -- checking a folder before transformers reads it -------------------------------------------
def check_folder(path: Path) -> list[Path]:
    """Check a model folder before transformers reads it; returns its safetensors files."""
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
    files = weight_files(path)
    if not files:  # PyTorch files are pickles, which can run code when read: never opened
        raise ModelLoadError(f"{path} has only PyTorch weights (pytorch_model.bin), which are "
                             f"pickles; {SAFE_ONLY}")
    for file in files:
        _check_safetensors(file, path)
    return files


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files transformers would read from `folder` (its order: a single file,
    then the shards an index names, each checked to exist); empty when there are none."""
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    if (folder / "model.safetensors.index.json").is_file():
        return _shards(folder, "model.safetensors.index.json")
    return []


def read_json(file: Path, folder: Path) -> dict[str, Any]:
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
    config = read_json(folder / "config.json", folder)
    for key in SHAPE_FIELDS:
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelLoadError(f"config.json in {folder}: {key} must be a positive whole "
                                 f"number, got {value!r}; fix config.json")


def _shards(folder: Path, index_name: str) -> list[Path]:
    """The weight files a sharded checkpoint's index names, each checked to exist."""
    index = read_json(folder / index_name, folder)
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


def check_loading_info(info: dict[str, Any], display: str) -> None:
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


# -- headers ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stored:
    """One tensor of a safetensors file: its dtype code, shape and absolute byte range."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_headers(files: Sequence[Path]) -> dict[str, Stored]:
    """Every tensor the safetensors `files` hold, by name, from their headers alone."""
    out: dict[str, Stored] = {}
    for file in files:
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            try:
                header = json.loads(f.read(size))
                entries = {name: Stored(file, e["dtype"], tuple(int(n) for n in e["shape"]),
                                        8 + size + e["data_offsets"][0],
                                        8 + size + e["data_offsets"][1])
                           for name, e in header.items() if name != "__metadata__"}
            except (ValueError, KeyError, TypeError, IndexError) as err:
                raise ModelLoadError(f"{file} has a malformed safetensors header ({err}); copy "
                                     "or save the model again") from None
        out.update(entries)
    return out


def stored_layers(stored: dict[str, Stored]) -> tuple[str, int] | None:
    """The list of decoder layers the weights hold, as its name prefix and its length (the
    highest index plus one): of the names ``<prefix>.<i>.<rest>``, the prefix with the most
    indices. None when no name has an index."""
    indices: dict[str, set[int]] = {}
    for name in stored:
        match = re.match(r"(.+?)\.(\d+)\.", name)
        if match:
            indices.setdefault(match[1], set()).add(int(match[2]))
    if not indices:
        return None
    prefix = max(indices, key=lambda p: (len(indices[p]), p))
    return prefix, max(indices[prefix]) + 1


def _lookup(stored: dict[str, Stored], name: str, prefix: str) -> Stored | None:
    """The stored tensor of parameter `name`, also when the file was saved with or without the
    base model's prefix (``transformer.``, ``model.``) that the loaded class has."""
    if name in stored:
        return stored[name]
    if prefix and name.startswith(prefix + "."):
        return stored.get(name[len(prefix) + 1:])
    return stored.get(f"{prefix}.{name}") if prefix else None


# -- does the config fit the weights? ---------------------------------------------------------
def check_config_fits(folder: Path, files: Sequence[Path], display: str) -> int | None:
    """Compare the parameters config.json asks for with the tensors the weight files hold,
    before anything is allocated; returns how many parameters the config asks for (None when
    transformers cannot build the model from the config, which loading then reports).

    The parameter shapes come from the model built from the config on the ``meta`` device (no
    memory); the stored ones from the headers. A config with more decoder layers than the
    weights is refused first, without building anything (a few thousand layers take minutes to
    build even on ``meta``).

    Raises
    ------
    ModelLoadError
        More layers than the weights hold; a parameter of another shape than the stored
        tensor of its name; or parameters missing from the weights while the config asks for
        more values than they hold (a checkpoint whose names transformers renames on loading
        holds as many).
    """
    stored = read_headers(files)
    config = _config(folder)
    if config is None:
        return None
    wanted = getattr(config, "num_hidden_layers", None)
    found = stored_layers(stored)
    if isinstance(wanted, int) and found is not None and wanted > found[1]:
        prefix, count = found
        raise ModelLoadError(
            f"config.json in {folder} asks for {wanted} layers but the weights hold {count} "
            f"({prefix}.0 to {prefix}.{count - 1}), so the weights of the other "
            f"{wanted - count} are missing; fix the layer count in config.json or save the "
            "model again with save_pretrained()")
    skeleton = _skeleton(config)
    if skeleton is None:
        return None
    prefix = getattr(skeleton, "base_model_prefix", "") or ""
    ignored = [re.compile(p) for p in getattr(skeleton, "_keys_to_ignore_on_load_missing", None)
               or ()]
    # tied parameters once: named_parameters() lists a tied one once, and a skeleton built
    # without initialisation is not tied yet but names its tied ones (transformers 5)
    tied = getattr(skeleton, "all_tied_weights_keys", None) or {}
    mismatched, missing, asked = [], [], 0
    for name, param in skeleton.named_parameters():
        if name in tied:
            continue
        asked += param.numel()
        entry = _lookup(stored, name, prefix)
        if entry is None:
            if not any(p.search(name) for p in ignored):
                missing.append(name)
        elif entry.shape != tuple(param.shape):
            mismatched.append((name, entry.shape, tuple(param.shape)))
    held = sum(entry.numel for entry in stored.values())
    check_loading_info({"mismatched_keys": mismatched,
                        "missing_keys": missing if asked > held else ()}, display)
    return asked


def _config(folder: Path) -> Any:
    """The transformers config of a folder, or None when transformers cannot read it."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder), local_files_only=True,
                                          trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _skeleton(config: Any) -> Any:
    """The causal LM of `config` built on the ``meta`` device (shapes, no memory), or None
    when transformers cannot build it."""
    from transformers import AutoModelForCausalLM

    try:  # transformers 5: skip the initialisation, as its own loading does (4 times faster)
        from transformers.initialization import no_init_weights
    except ImportError:
        no_init_weights = contextlib.nullcontext
    try:
        with torch.device("meta"), no_init_weights():
            return AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError,
            NotImplementedError, ImportError):
        return None


# -- fingerprints -------------------------------------------------------------------------------
def fingerprint(hf: Any, files: Sequence[Path] = ()) -> str:
    """``v2-`` and 16 hex characters of sha256 over a model's class, config shape and weights as
    stored, independent of the dtype they were loaded in.

    For every parameter (tied ones once): its name, shape and `FINGERPRINT_SAMPLES` values at a
    fixed stride, as float32, read from the safetensors `files` the model was loaded from (in
    the dtype they were saved in), or from the parameter itself for a model built in memory
    (no `files`). A parameter the files do not hold under its name is read from memory when
    the model is in float32, which holds any stored float16, bfloat16 or float32 value exactly;
    in another dtype its stored value is unknown, and the fingerprint is then the
    `legacy_fingerprint` of the weights as loaded (16 hex characters, no prefix).

    Parameters
    ----------
    hf : torch.nn.Module
        Usually a transformers model.
    files : sequence of Path
        The safetensors files it was loaded from (none for a model built in memory).

    Returns
    -------
    str

    Examples
    --------
    >>> from circuits.testing import tiny_gpt2
    >>> fingerprint(tiny_gpt2(seed=0).hf)[:3]
    'v2-'
    """
    stored = read_headers(files) if files else {}
    prefix = getattr(hf, "base_model_prefix", "") or ""
    names, samples, maps = [], [], {}
    # a model placed by a device map lists a tied parameter under both names (its offloaded
    # copies are distinct meta tensors): it counts once, as in a model loaded whole
    tied = set(getattr(hf, "all_tied_weights_keys", None) or {})
    try:
        with torch.no_grad():
            for name, param in hf.named_parameters():
                if name in tied and param.device.type == "meta":
                    continue
                entry = _lookup(stored, name, prefix)
                if entry is not None and entry.shape == tuple(param.shape) and (
                        entry.dtype in _STORED_DTYPES):
                    if entry.file not in maps:
                        with open(entry.file, "rb") as f:
                            maps[entry.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                    values = _stored_sample(entry, maps[entry.file])
                elif not files or param.dtype == torch.float32:
                    if param.device.type == "meta":  # offloaded by a device map
                        param = offloaded_value(hf, name)
                    values = _sample(param).float().cpu()
                else:
                    return legacy_fingerprint(hf)
                samples.append(values)
                names.append(f"{name}{list(param.shape)}")
    finally:
        for buffer in maps.values():
            buffer.close()
    digest = _digest(hf, STORED_PREFIX)
    digest.update("\n".join(names).encode())
    digest.update((torch.cat(samples) if samples else torch.zeros(0)).numpy().tobytes())
    return STORED_PREFIX + digest.hexdigest()[:16]


def legacy_fingerprint(hf: Any) -> str:
    """16 hex characters of sha256 over a model's class, config shape and weights as loaded:
    the fingerprint files written before version 2 hold, which depends on the dtype the model
    was loaded in (compare it only with a load in the same dtype).

    Parameters
    ----------
    hf : torch.nn.Module

    Returns
    -------
    str

    Examples
    --------
    >>> from circuits.testing import tiny_gpt2
    >>> len(legacy_fingerprint(tiny_gpt2(seed=0).hf))
    16
    """
    digest = _digest(hf, "")
    names, samples = [], []
    with torch.no_grad():
        for name, param in hf.named_parameters():
            samples.append(_sample(param).float())
            names.append(f"{name}{list(param.shape)}")
        values = torch.cat(samples).cpu() if samples else torch.zeros(0)  # one transfer
    digest.update("\n".join(names).encode())
    digest.update(values.numpy().tobytes())
    return digest.hexdigest()[:16]


def is_legacy(value: str) -> bool:
    """Whether a fingerprint is of the weights as loaded (`legacy_fingerprint`)."""
    return re.fullmatch(r"[0-9a-f]{16}", value) is not None


def _digest(hf: Any, version: str) -> Any:
    """sha256 started with the version, the class name and the config's shape fields."""
    digest = hashlib.sha256(version.encode() + type(hf).__name__.encode())
    config = getattr(hf, "config", None)
    shape = {key: getattr(config, key, None) for key in SHAPE_FIELDS}
    digest.update(json.dumps(shape, sort_keys=True, default=str).encode())
    return digest


def _positions(numel: int, device: torch.device | None = None) -> torch.Tensor:
    """`FINGERPRINT_SAMPLES` evenly spread flat positions of a tensor, the first included."""
    count = min(FINGERPRINT_SAMPLES, numel)
    return torch.arange(count, device=device) * numel // max(count, 1)


def _sample(param: torch.Tensor) -> torch.Tensor:
    """The sampled values of a tensor in memory; take() reads the flattened view."""
    return torch.take(param, _positions(param.numel(), param.device))


def _stored_sample(entry: Stored, buffer: mmap.mmap) -> torch.Tensor:
    """The sampled values of a stored tensor as float32, read from the file's bytes."""
    dtype = _STORED_DTYPES[entry.dtype]
    size = torch.empty(0, dtype=dtype).element_size()
    if entry.end - entry.start != entry.numel * size:
        raise ModelLoadError(f"{entry.file} is malformed: a tensor's byte range does not fit "
                             "its shape; copy or save the model again")
    raw = b"".join(buffer[entry.start + i * size:entry.start + (i + 1) * size]
                   for i in _positions(entry.numel).tolist())
    if not raw:
        return torch.zeros(0)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).float()
