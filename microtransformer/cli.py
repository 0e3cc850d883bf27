"""Command-line entry point: `microtransformer SUBCOMMAND ...`.

Each subcommand lives in its own module under `microtransformer.commands` and exposes
`register(subparsers)` (adds its parser and sets `func`) and the function it points to,
`func(args) -> int`. Modules are imported lazily so `--help` stays fast and a missing optional
dependency only affects the subcommand that needs it.

Bad input (`ValueError`, `FileNotFoundError`, `UserError`, ...) is reported as one line on
stderr with exit code 2 -- never a traceback. Set MICROTRANSFORMER_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import sys
import warnings

# (subcommand, module under microtransformer.commands, one-line help)
COMMANDS: list[tuple[str, str, str]] = [
    ("prepare", "prepare", "tokenize a corpus into train.bin / val.bin"),
    ("train", "train", "train a model (single process or under torchrun)"),
    ("generate", "generate", "sample text from a trained run"),
    ("eval", "evaluate", "loss, perplexity and bits per byte on any text"),
    ("info", "info", "show a run's config, size and training summary"),
    ("export", "export", "export a run to Hugging Face, ONNX, GGUF or a web page"),
    ("import", "import_hf", "import a Hugging Face GPT-2 directory as a run"),
    ("configs", "configs", "list configurations within a parameter budget"),
    ("study", "study", "train and compare configurations (architecture study)"),
    ("serve", "serve", "serve runs over an OpenAI-compatible HTTP API with a playground"),
]


class _Parser(argparse.ArgumentParser):
    """argparse parser whose errors are one line and exit code 2 (argparse's own convention)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every available subcommand registered."""
    from microtransformer import __version__

    parser = _Parser(prog="microtransformer", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, module, help_text in COMMANDS:
        try:
            mod = importlib.import_module(f"microtransformer.commands.{module}")
        except ModuleNotFoundError as exc:
            if exc.name == f"microtransformer.commands.{module}":
                continue  # subcommand not built yet
            raise
        mod.register(sub, name, help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = build_parser()
    args, extras = parser.parse_known_args(
        _attach_dash_values(sys.argv[1:] if argv is None else argv))
    if extras:  # a command with config overrides names unknown keys itself (collect_overrides)
        if not isinstance(getattr(args, "overrides", None), list):
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        args.overrides = [*args.overrides, *extras]
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    code = _dispatch(args)
    # a torchrun worker ends here, past the interpreter's teardown (distributed.end_worker);
    # a command that never imported the distributed module cannot have started a group
    if (distributed := sys.modules.get("microtransformer.distributed")) is not None:
        distributed.end_worker(code)
    return code


def _dispatch(args: argparse.Namespace) -> int:
    """Run the parsed subcommand; bad input becomes one line on stderr and exit code 2."""
    previous_format = warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except BrokenPipeError:
        # the reader went away (`... | head`): not an error; stop writing quietly
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError, OSError, MemoryError, RuntimeError) as exc:
        if os.environ.get("MICROTRANSFORMER_DEBUG"):
            raise
        msg = error_line(exc)
        if msg is None:
            raise  # a RuntimeError that is not about memory: a bug, keep its traceback
        sys.stderr.write(f"microtransformer {args.command}: error: {msg}\n")
        return 2
    finally:
        warnings.formatwarning = previous_format


# Options whose value may start with "-" (a negative duration is still a value to judge, not
# another option): "--time -5m" becomes "--time=-5m" so the command can say what is wrong.
_VALUE_OPTIONS = ("--time",)


def _attach_dash_values(argv: list[str]) -> list[str]:
    """Join `--opt -value` into `--opt=-value` for the options in `_VALUE_OPTIONS`."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok in _VALUE_OPTIONS and i + 1 < len(argv) and argv[i + 1].startswith("-") \
                and not argv[i + 1].startswith("--"):
            out.append(f"{tok}={argv[i + 1]}")
            i += 2
            continue
        out.append(tok)
        i += 1
    return out


_ERRNO_TEXT = {
    errno.ENOTDIR: ("a part of the path is a file, not a directory",
                    "choose a path whose parents are directories"),
    errno.EEXIST: ("it already exists", "choose another path"),
    errno.EISDIR: ("it is a directory where a file is expected", "pass a file path"),
    errno.ENOENT: ("it does not exist", "check the path"),
    errno.EACCES: ("permission denied", "choose a path you may read and write"),
    errno.EPERM: ("operation not permitted", "choose a path you may read and write"),
    errno.ENOSPC: ("no space left on the device", "free some disk space or write elsewhere"),
    errno.EROFS: ("the file system is read-only", "write somewhere else"),
    errno.ENAMETOOLONG: ("the name is too long", "choose a shorter path"),
}
_MEMORY_WORDS = ("out of memory", "can't allocate memory", "not enough memory",
                 "cannot allocate memory")


def error_line(exc: BaseException) -> str | None:
    """The one line the CLI prints for `exc` (None: not a user-facing error).

    Raw OS errors ("[Errno 20] Not a directory: 'x'") are rewritten as the path, what is wrong
    and the fix; allocation failures name the limit that was hit and what to lower."""
    text = str(exc).strip()
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and any(
            w in text.lower() for w in _MEMORY_WORDS)):
        return ("out of memory: the request needs more memory than this machine (or card) "
                "has; lower --train.batch_size / --max-new-tokens / --batch-size, or use a "
                "device with more memory")
    if isinstance(exc, RuntimeError):
        return None
    if isinstance(exc, OSError) and text.startswith("[Errno"):
        what, fix = _ERRNO_TEXT.get(exc.errno, (str(exc.strerror or "failed").lower(),
                                                "check the path and the device, then retry"))
        path = exc.filename if exc.filename is not None else "a file"
        return f"{path}: {what} ({exc.strerror}); {fix}"
    return text.splitlines()[0] if text else type(exc).__name__


def _one_line_warning(message: Warning | str, category: type[Warning], *_: object,
                      **__: object) -> str:
    """Warnings as `microtransformer: warning: ...` lines (no source file, no code line)."""
    return f"microtransformer: warning: {message}\n"


if __name__ == "__main__":
    sys.exit(main())
