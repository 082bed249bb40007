"""What every `plexus` command shares: the agent's client, errors as one line with exit codes,
tables and JSON.

Exit codes, as Docker's where it has them: 0 done; 1 it failed (not found, a conflict, the agent
unreachable); 2 invalid input, whether click or the agent found it; `exec` adds 126 and 127
(the command could not run) and `run` passes on the container's own code.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn, TypeVar
from urllib.parse import quote

import click

from plexus.api.client import ApiError, Client

F = TypeVar("F", bound=Callable[..., Any])

EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


def exit_code(kind: str) -> int:
    return EXIT_INVALID if kind == "invalid" else EXIT_FAILED


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    click.echo(f"plexus: {message}", err=True)
    sys.exit(code)


def client(ctx: click.Context) -> Client:
    return Client(ctx.obj["socket"])


def call(ctx: click.Context, method: str, path: str, body: Any = None) -> Any:
    try:
        return client(ctx).call(method, path, body)
    except ApiError as exc:
        fail(exc.message, exit_code(exc.kind))


def url(*parts: str) -> str:
    """/v1/PART/PART...: names as one path segment each, whatever they hold."""
    return "/v1/" + "/".join(quote(p, safe="") for p in parts)


def for_each(names: Iterable[str], act: Callable[[str], None]) -> None:
    """``act`` on every name, as Docker does: a failure is one line and does not stop the
    others; the exit code is non-zero if any failed (2 if any of them was invalid input)."""
    codes = []
    for name in names:
        try:
            act(name)
        except ApiError as exc:
            click.echo(f"plexus: {exc.message}", err=True)
            codes.append(exit_code(exc.kind))
    if codes:
        sys.exit(max(codes))


def copy_stream(ctx: click.Context, path: str) -> None:
    """Copy a streamed answer (a container's log) to stdout as it comes."""
    out = sys.stdout.buffer
    try:
        for chunk in client(ctx).stream(path):
            out.write(chunk)
            out.flush()
    except ApiError as exc:
        fail(exc.message, exit_code(exc.kind))
    except BrokenPipeError:
        # The reader left (`plexus logs x | head`): stop quietly, and keep the interpreter's
        # last flush of stdout from failing again.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)


def table(rows: Sequence[Sequence[str]], headers: Sequence[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    for row in (headers, *rows):
        click.echo("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=False)).rstrip())


def json_opt(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="print JSON")(fn)


def emit(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def kv(items: Sequence[str], field: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"invalid {field} {item!r}: expected KEY=VALUE", EXIT_INVALID)
        out[key] = value
    return out


def usage_line(exc: click.ClickException) -> str:
    """click's message for a usage error ("Missing option '--name'."), as one plexus line."""
    text = exc.format_message().strip().rstrip(".")
    text = text[:1].lower() + text[1:]
    ctx = getattr(exc, "ctx", None)
    return f"{text} (see '{ctx.command_path} --help')" if ctx is not None else text


# click 8.2 shows a group's help, as an error, when it is given no subcommand.
NO_ARGS_IS_HELP: type[click.UsageError] = getattr(
    click.exceptions, "NoArgsIsHelpError", type("NeverRaised", (click.UsageError,), {}))


class Group(click.Group):
    """The `plexus` group: click's own errors (a missing option, a value that is not a number)
    become one `plexus:` line like every other error, exit 2, instead of click's usage block."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("standalone_mode", True) is False:
            return super().main(*args, **kwargs)
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except NO_ARGS_IS_HELP as exc:  # `plexus` alone: its help, as click shows it
            exc.show()
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            fail(usage_line(exc), exc.exit_code)
        except click.Abort:  # Ctrl-C: the shell knows why
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(code if isinstance(code, int) else 0)
