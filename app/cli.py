"""`kogpt-serve` entry point: flags generated from Settings, then uvicorn."""

from __future__ import annotations

import argparse
import signal
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any

from app.config import Settings


def _arg_type(annotation: Any) -> tuple[Any, list[str] | None, bool]:
    """(converter, choices, is_bool) for a Settings field annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _arg_type(args[0])
    if origin is typing.Literal:
        return str, [str(a) for a in args], False
    if annotation is bool:
        return None, None, True
    if annotation in (int, float):
        return annotation, None, False
    return str, None, False


def _extra(field: Any, key: str) -> bool:
    """A flag shape set in the field's json_schema_extra (nargs, repeat)."""
    return isinstance(field.json_schema_extra, dict) and bool(field.json_schema_extra.get(key))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kogpt-serve",
        description="Serve a KoGPT-2 checkpoint over HTTP with continuous batching. "
        "Every flag can also be set as an environment variable KOGPT_<NAME>.",
    )
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        converter, choices, is_bool = _arg_type(field.annotation)
        env = f"KOGPT_{name.upper()}"
        help_text = f"{field.description} [env {env}]"
        if is_bool:
            parser.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif _extra(field, "repeat"):
            # The flag given several times (--model a=p --model b=q): joined by commas.
            parser.add_argument(flag, dest=name, action="append", default=None, help=help_text)
        elif _extra(field, "nargs"):
            # Several values after the flag (vLLM's --lora-modules a=p b=p): joined by spaces.
            parser.add_argument(flag, dest=name, nargs="+", default=None, help=help_text)
        else:
            parser.add_argument(
                flag, dest=name, type=converter, choices=choices, default=None, help=help_text
            )
    return parser


def parse_settings(argv: Sequence[str] | None = None) -> Settings:
    namespace = build_parser().parse_args(argv)
    fields = Settings.model_fields
    overrides = {
        k: ("," if _extra(fields[k], "repeat") else " ").join(v) if isinstance(v, list) else v
        for k, v in vars(namespace).items()
        if v is not None
    }
    return Settings(**overrides)


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_settings(argv)
    import uvicorn

    from app.main import create_app

    app = create_app(settings)
    # After a graceful shutdown uvicorn re-raises the SIGTERM it stopped for, under the
    # handler it found at start: the default one would end a clean drain with status -15.
    signal.signal(signal.SIGTERM, _exit_zero)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=30,
        **uvicorn_limits(settings),
    )


def uvicorn_limits(settings: Settings) -> dict[str, Any]:
    """The HTTP server's own limits from the settings (the CLI and the tests' servers): the
    connection cap, and h11 with a header-read deadline (app/api/http_protocol.py)."""
    from app.api.http_protocol import with_header_timeout

    return {
        "limit_concurrency": settings.max_connections,
        "http": with_header_timeout(settings.header_read_timeout_seconds),
    }


def _exit_zero(signum: int, frame: types.FrameType | None) -> None:
    """SIGTERM outside uvicorn (before it starts, or re-raised once it has drained): exit 0."""
    raise SystemExit(0)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
