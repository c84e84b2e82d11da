"""The commands of the ``circuits`` program, one module each (listed in `circuits.cli.COMMANDS`):
each gives ``HELP_EXAMPLES``, ``add_arguments(parser)`` and ``run(args) -> int``, and is imported
only when its command runs. What they share (input checks, loading, the device flags, a
discovery's files) is in `circuits.commands.common`; the method options, built from the method
registry, in `circuits.commands.options`."""
