"""The tokenizer a model folder names, where transformers would load another.

transformers picks the tokenizer class from the folder's ``tokenizer_config.json``, except for
some model types it overrides: from version 5 any folder whose ``config.json`` says ``qwen2`` gets
``Qwen2Tokenizer``, whatever the folder names. That class puts its own pre-tokenizer (byte-level
splitting) in front of the vocabulary in ``tokenizer.json``, so a folder with a word-level
tokenizer turns "When Alice and Bob went to the school" into unknown tokens, and every prompt is
run on them without a word said.

`folder_tokenizer` checks what was loaded against what the folder names. Where the classes
differ and the two tokenize a few sample texts differently, it builds the folder's own tokenizer
from its ``tokenizer.json`` (transformers' generic fast tokenizer, with the special tokens of
``tokenizer_config.json``) and uses that, saying so. Where they agree, or the folder names no
class or has no ``tokenizer.json``, what transformers loaded stays.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import ModelLoadError

#: texts both tokenizers must turn into the same ids: words, punctuation, digits, spaces, non-ASCII
SAMPLES = (
    "When Alice and Bob went to the school, Alice gave a drink to Bob",
    " The Eiffel Tower is in the city of Paris. 1 + 22 = 23;  two  spaces\tand a tab\n",
    "naïve café, 東京 ☕",
)
#: class names that mean the same tokenizer: transformers 5 renamed the generic fast tokenizer
ALIASES = {"PreTrainedTokenizerFast": "TokenizersBackend"}


def _canonical(name: str) -> str:
    """A tokenizer class name without the ``Fast`` that transformers 5 dropped."""
    return ALIASES.get(name, name).removesuffix("Fast")


def named_class(folder: Path) -> str | None:
    """The tokenizer class ``tokenizer_config.json`` names, or None (no file, no name)."""
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = config.get("tokenizer_class") if isinstance(config, dict) else None
    return name if isinstance(name, str) and name else None


def _ids(tokenizer: Any) -> list[list[int]]:
    """The ids of every sample, special tokens included."""
    return [list(tokenizer(text)["input_ids"]) for text in SAMPLES]


def folder_tokenizer(loaded: Any, folder: Path | None) -> tuple[Any, str | None]:
    """The tokenizer to use: `loaded` (what ``AutoTokenizer`` gave for `folder`), or the folder's
    own ``tokenizer.json`` where `loaded` is another class than the folder names and tokenizes
    the samples differently; with a one-line note saying so in that case, else None.

    Parameters
    ----------
    loaded : transformers tokenizer
        What ``AutoTokenizer.from_pretrained(folder)`` returned.
    folder : Path or None
        The model's folder (a hub model's cache folder); None when unknown.

    Returns
    -------
    tokenizer, note

    Raises
    ------
    ModelLoadError
        The classes differ and the folder's ``tokenizer.json`` cannot be loaded.

    Examples
    --------
    >>> from transformers import AutoTokenizer
    >>> from circuits.zoo import find
    >>> folder = find("ioi-gpt2-4l")
    >>> tok, note = folder_tokenizer(AutoTokenizer.from_pretrained(folder), folder)
    >>> note is None  # the class the folder names
    True
    """
    if folder is None or not (folder / "tokenizer.json").is_file():
        return loaded, None
    named = named_class(folder)
    if named is None or _canonical(named) == _canonical(type(loaded).__name__):
        return loaded, None
    import transformers  # imported when needed: it takes seconds

    try:  # the special tokens and options come from tokenizer_config.json in the same folder
        own = transformers.PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
    except Exception as err:  # the tokenizers library raises bare Exceptions on a bad file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(
            f"transformers loads {type(loaded).__name__} for {folder}, not the {named} its "
            f"tokenizer_config.json names, and its tokenizer.json cannot be loaded ({first}); "
            "fix tokenizer.json or save the tokenizer again with save_pretrained()") from None
    if _ids(own) == _ids(loaded):
        return loaded, None
    return own, (f"transformers loads {type(loaded).__name__} for {folder}, not the {named} its "
                 "tokenizer_config.json names, and the two tokenize text differently: using "
                 "the folder's tokenizer.json")
