"""The `jax-gpt2` command: one subcommand per job, each a thin shell over the library.

Every subcommand turns a user mistake (bad path, bad flag value) into one line on stderr and a
non-zero exit code, never a traceback: `UserError` and `ValueError` are caught in `main`.
"""

import argparse
import sys

from jax_gpt2.remote import add_remote_command


class UserError(Exception):
    """An error whose message is the whole story for the user: printed alone, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jax-gpt2", description="GPT-2 inference in pure JAX.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_command in _COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except (UserError, ValueError, FileNotFoundError) as error:
        print(f"jax-gpt2 {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jax-gpt2 {args.command}: interrupted", file=sys.stderr)
        return 130


# Each entry registers one subcommand on the parser and sets `run` (args -> exit code) as its default.
_COMMANDS: list = []
_COMMANDS.append(add_remote_command)


if __name__ == "__main__":
    sys.exit(main())
