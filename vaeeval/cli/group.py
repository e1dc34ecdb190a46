"""The ``vaeeval`` group: every failure one line on stderr with its exit code; commands loaded when used."""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from typing import Any

import click

from vaeeval import __version__
from vaeeval.analysis.gates import GateFailed
from vaeeval.core import tuning
from vaeeval.errors import VaeevalError
from vaeeval.runs.run import distributed_world, local_processes

# Each command's module is imported when the command runs (or --help lists it): a run loads only its own code.
COMMANDS = {
    "ais": "annealing",
    "bdmc": "annealing",
    "calibrate": "models",
    "check": "results",
    "compare": "models",
    "convert": "models",
    "elbo": "evaluate",
    "inspect": "models",
    "latents": "evaluate",
    "merge": "results",
    "schema": "results",
}


EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_CLOSED_OUTPUT = 141  # 128 + SIGPIPE: what the shell reports for a command whose reader went away (`| head`)


class Group(click.Group):
    """A click group whose every failure is one line on stderr with exit code 2."""

    def main(self, args: Any = None, prog_name: str | None = None, **extra: Any) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # numpy's and torch's warnings never reach the user's stderr
                code = super().main(args, prog_name, standalone_mode=False, **extra)
        except click.UsageError as error:
            hint = f" (see '{error.ctx.command_path} --help')" if error.ctx else ""
            _fail(f"{error.format_message()}{hint}")
        except VaeevalError as error:
            _fail(error.render(self.flag))
        except GateFailed as error:
            click.echo(f"vaeeval: check failed: {error}", err=True)
            sys.exit(EXIT_CHECK_FAILED)
        except click.Abort:
            click.echo("vaeeval: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except click.ClickException as error:
            _fail(error.format_message())
        try:
            sys.stdout.flush()  # a pipe is written when the buffer fills or here: its reader may be gone by now
        except BrokenPipeError:
            _closed_output()
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:  # click would exit 1, which reads as a failed check
            _closed_output()

    def list_commands(self, ctx: click.Context | None) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context | None, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        if name not in self.commands:
            self.add_command(getattr(importlib.import_module(f"{__package__}.{COMMANDS[name]}"), name))
        return self.commands[name]

    def all_commands(self) -> dict[str, click.Command]:
        """Every command by name, each module imported."""
        return {name: self.get_command(None, name) for name in self.list_commands(None)}

    def flag(self, parameter: str) -> str:
        """The flag a user types for the library's ``parameter``: its longest option string."""
        for command in self.all_commands().values():
            for param in command.params:
                if param.name == parameter and param.opts:
                    return max(param.opts, key=len)
        return "--" + parameter.replace("_", "-")


def _closed_output() -> None:
    """Stdout's reader went away (``vaeeval elbo ... | head``): end quietly with 141, as a command killed by SIGPIPE.

    Stdout is pointed at /dev/null first, so the interpreter's last flush does not fail again on the way out.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    sys.exit(EXIT_CLOSED_OUTPUT)


def _fail(message: str) -> None:
    click.echo(f"vaeeval: error: {' '.join(message.splitlines())}", err=True)
    sys.exit(EXIT_BAD_INPUT)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="vaeeval")
def main() -> None:
    """How good is a trained VAE, really? ELBO, reconstruction, KL and log p(x) in real nats.

    Models are format-1 .safetensors files (FORMAT.md); nothing in a model or
    data file is ever executed or unpickled.
    """
    tuning.keep_freed_memory()
    if distributed_world() is not None:
        tuning.share_cores(local_processes())
