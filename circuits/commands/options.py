"""Method options on the command line, built from the method registry.

Every `circuits.methods.Option` a registered method declares becomes one flag of ``circuits
discover`` and ``circuits bench`` (methods that declare an option of the same name share its
flag, e.g. ``--steps`` of the three EAP-IG variants), so adding an option to a method touches only
the method's module. A flag is passed to the method only when given, so each method keeps its
own defaults; a flag the chosen method does not take is one error line.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..methods import Option, available, check_options, get_method
from .common import fail

#: Where the parser notes the method-option flags that are the command's own (``--seed``): the
#: command sets those options itself (``bench`` passes its seed to ``random``), so they are
#: neither offered again nor passed here.
SHARED = "method_flags_shared"


def option_flags() -> dict[str, list[tuple[str, Option]]]:
    """Every declared option's flag, with the (method, option) pairs that share it.

    Examples
    --------
    >>> [method for method, _ in option_flags()["--steps"]]
    ['eap-ig', 'eap-ig-activations', 'eap-ig-stages', 'edge-pruning', 'ugs']
    """
    flags: dict[str, list[tuple[str, Option]]] = {}
    for name, spec in available().items():
        for option in spec.params:
            flags.setdefault(option.cli_flag, []).append((name, option))
    return flags


def _dest(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def _shown(value: Any) -> str:
    """A default as the command line would spell it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def _help(owners: list[tuple[str, Option]]) -> str:
    """One flag's help: the option's phrase (each method's, where they differ), who takes it
    and its default (an option whose default is None says what happens in its phrase)."""
    methods = ", ".join(method for method, _ in owners)
    defaults = {repr(option.default) for _, option in owners}
    first = owners[0][1]
    if len(defaults) > 1:
        default = "; default: each method's own"
    else:
        default = "" if first.default is None else f"; default: {_shown(first.default)}"
    if len({option.help for _, option in owners}) == 1:
        return f"{first.help} ({methods}{default})"
    return "; ".join(f"{method}: {option.help}" for method, option in owners) + (
        f" ({default.removeprefix('; ')})" if default else "")


def _metavar(option: Option) -> str:
    if option.kind == "choice":
        return "{" + ",".join(option.choices) + "}"
    return option.name.upper()


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """Add a flag for every registered method option, in a group of their own; a flag the
    parser has already (the command's own ``--seed``) is left to the command (`SHARED`)."""
    group = parser.add_argument_group(
        "method options", "passed to the method only when given (see `circuits methods`)")
    shared = []
    for flag, owners in option_flags().items():
        if flag in parser._option_string_actions:
            shared.append(flag)
            continue
        option = owners[0][1]
        if option.kind == "bool":
            group.add_argument(flag, dest=_dest(flag), action=argparse.BooleanOptionalAction,
                               default=None, help=_help(owners))
        else:
            group.add_argument(flag, dest=_dest(flag), metavar=_metavar(option),
                               help=_help(owners))
    parser.set_defaults(**{SHARED: tuple(shared)})


def method_options(method: str, args: argparse.Namespace, strict: bool = True) -> dict[str, Any]:
    """The options given on the command line for `method`, parsed and checked against its
    declarations. With `strict`, a flag the method does not take fails (one line, naming the
    methods that take it)."""
    spec = get_method(method)
    shared = getattr(args, SHARED, ())
    options: dict[str, Any] = {}
    for flag, owners in option_flags().items():
        given = getattr(args, _dest(flag), None)
        if given is None or flag in shared:
            continue
        # an ensemble (``mean:eap,eap-ig``) takes the flags of its parts, and passes each on
        names = {part.name for part in getattr(spec, "parts", ())} or {spec.name}
        option = next((o for m, o in owners if m in names), None)
        if option is None:
            if strict:
                takers = ", ".join(m for m, _ in owners)
                fail(f"method {method!r} has no {flag} option ({flag} is for {takers}); drop it "
                     "or pick a method that takes it (see `circuits methods`)")
            continue
        options[option.name] = given if isinstance(given, bool) else option.parse(given)
    check_options(method, options)
    return options


def options_for(methods: list[str], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """`method_options` of each of `methods` (those several commands run); a flag that none of
    them takes fails (one line)."""
    chosen = {method: method_options(method, args, strict=False) for method in methods}
    shared = getattr(args, SHARED, ())
    for flag, owners in option_flags().items():
        if flag in shared or getattr(args, _dest(flag), None) is None:
            continue
        if not any(m in chosen for m, _ in owners):
            takers = ", ".join(m for m, _ in owners)
            fail(f"no method run takes {flag} ({flag} is for {takers}); drop it or add one "
                 "of those methods to --method")
    return chosen
