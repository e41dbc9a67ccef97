"""Subcommands of this part (filled in by its issue)."""


def register(subparsers) -> None:
    pass
