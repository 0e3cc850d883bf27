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
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    previous_format = warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError, OSError) as exc:
        if os.environ.get("MICROTRANSFORMER_DEBUG"):
            raise
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        sys.stderr.write(f"microtransformer {args.command}: error: {msg}\n")
        return 2
    finally:
        warnings.formatwarning = previous_format


def _one_line_warning(message: Warning | str, category: type[Warning], *_: object,
                      **__: object) -> str:
    """Warnings as `microtransformer: warning: ...` lines (no source file, no code line)."""
    return f"microtransformer: warning: {message}\n"


if __name__ == "__main__":
    sys.exit(main())
