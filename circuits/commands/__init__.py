"""Commands of the ``circuits`` program that live in modules of their own (see
`circuits.cli.MODULE_COMMANDS`): each gives ``HELP_EXAMPLES``, ``add_arguments(parser)`` and
``run(args) -> int``, and is imported only when its command runs."""
