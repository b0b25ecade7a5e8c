"""A job's command line from its config model: defaults in code, then a YAML file, then flags.

`parse_args` builds an argparse parser from the model's fields (every field has a default and a
description, which becomes its --help), so a flag, a YAML key and a Python attribute are the same
name. Errors (argparse's and pydantic's) become one ConfigError naming the option, the problem and
the fix; local paths are made absolute before the job starts.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from pipeline import logs
from pipeline.config.options import REPO_ROOT
from pipeline.errors import EXIT_MEANINGS, ConfigError

C = TypeVar("C", bound=BaseModel)

CHECKOUT = "<checkout>"  # how --help names this checkout when run from another folder
# argparse's own messages, reworded to name the option, the problem and the fix
_ARGPARSE_BAD_VALUE = re.compile(r"^argument (\S+): invalid (\w+) value: (.+)$")
_ARGPARSE_CHOICE = re.compile(r"^argument (\S+): invalid choice: (.+) \(choose from (.+)\)$")
_ARGPARSE_NO_VALUE = re.compile(r"^argument (\S+): expected one argument$")
_ARGPARSE_ARGUMENT = re.compile(r"^argument (\S+): (.+)$")
_KIND_NAMES = {"int": "a whole number", "float": "a number", "str": "text"}


def _flag(name: str) -> str:
    """The command-line flag of option `name`."""
    return "--" + name.replace("_", "-")


def _flag_type(annotation: Any) -> tuple[Any, list[Any] | None]:
    """argparse type and choices for a field annotation (scalars, Optional[...] and Literal)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _flag_type(args[0])
    if origin is Literal:
        choices = list(typing.get_args(annotation))
        return type(choices[0]), choices
    return annotation, None


def display_path(value: str) -> str:
    """A default path as the user would type it: relative to the current folder when it lies
    below it (or when the current folder is this checkout), else `<checkout>/...`; never an
    absolute path into the checkout."""
    path = Path(value)
    if not path.is_absolute():
        return value
    cwd = Path.cwd().resolve()
    if path.is_relative_to(cwd) or cwd == REPO_ROOT:
        return os.path.relpath(path, cwd)
    if path.is_relative_to(REPO_ROOT.parent):
        return f"{CHECKOUT}/{os.path.relpath(path, REPO_ROOT)}"
    return value


def shown_default(field: FieldInfo) -> str | None:
    """The default as `--help` shows it, or None when the description already states it."""
    if "Default" in (field.description or ""):
        return None
    value = field.default
    if value is None:
        return "not set"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, str):
        return display_path(value) if value else "empty"
    return str(value)


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps help at spaces only, so a path or flag such as examples/sample-catalog stays whole."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class _JobArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are ConfigErrors worded like every other bad-option message (the
    job prints one line and exits 2), not a usage block of every option."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(f"{_reword_argparse(message)} ({self.prog} --help lists every option)")


def _reword_argparse(message: str) -> str:
    """argparse's error message in our wording (option, problem, fix); others unchanged."""
    if match := _ARGPARSE_BAD_VALUE.match(message):
        flag, kind, value = match.groups()
        kind_name = _KIND_NAMES.get(kind, kind)
        return f"{flag} {value} is not {kind_name}: give {kind_name}"
    if match := _ARGPARSE_CHOICE.match(message):
        flag, value, choices = match.groups()
        return f"{flag} {value} is not a choice: give one of {choices.replace(chr(39), '')}"
    if match := _ARGPARSE_NO_VALUE.match(message):
        return f"{match.group(1)} is missing its value: give {match.group(1)} VALUE"
    if match := _ARGPARSE_ARGUMENT.match(message):
        return f"{match.group(1)}: {match.group(2)}"
    return message


def exit_codes_epilog() -> str:
    """Every job's --help ends with the exit codes, from the one table (`errors.EXIT_MEANINGS`)."""
    return "exit codes: " + "; ".join(f"{int(code)} {meaning}" for code, meaning in
                                      sorted(EXIT_MEANINGS.items())).replace("%", "%%")


def build_parser(cls: type[BaseModel], description: str, prog: str | None = None
                 ) -> argparse.ArgumentParser:
    """An argparse parser with --config and one flag per field of `cls`, each with its help."""
    parser = _JobArgumentParser(prog=prog, description=description,
                                usage="%(prog)s [--option VALUE ...]",
                                formatter_class=_HelpFormatter, epilog=exit_codes_epilog())
    parser.add_argument(
        "--config", default=None, metavar="YAML",
        help="YAML file setting any option below (keys: option names with underscores); flags "
        "override it.",
    )
    # How the job prints, not what it does: read by jobs._main before parsing (pipeline.logs).
    parser.add_argument("--log-format", choices=logs.FORMATS, default=None,
                        help="text: lines for a person; json: one JSON object per line (event, "
                        "run id, counts, durations) for a log store. Default: $CATALOG_LOG_FORMAT, "
                        "else text.")
    parser.add_argument("--debug", action="store_true", default=False,
                        help="on an error, print its traceback after the one-line message")
    for name, field in cls.model_fields.items():
        kind, choices = _flag_type(field.annotation)
        help_text = (field.description or "").replace("%", "%%")
        if (default := shown_default(field)) is not None:
            help_text += f" (default: {default.replace('%', '%%')})"
        if kind is bool:
            parser.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(_flag(name), dest=name, type=kind, choices=choices,
                                default=argparse.SUPPRESS, metavar=None if choices else name.upper(),
                                help=help_text)
    return parser


# Options naming local files or folders: made absolute when the job's arguments are parsed, so
# that nothing later depends on the job's current folder (which Ray may delete under a job
# submitted with --working-dir; docs/guarantees.md).
PATH_FIELDS = ("manifest", "model", "output", "review_threshold_from", "dataset_root", "exclude",
               "checkpoint_path", "source", "calibration_source")
# Options that take a path or a name (imagenet, a weights name): made absolute only when a
# local file or folder of that name exists.
PATH_OR_NAME_FIELDS = ("weights", "backbone")
PATH_LIST_FIELDS = ("allowed_uri_prefixes", "compare_with")


def _absolute(value: str) -> str:
    """A relative local path made absolute; URIs and absolute paths unchanged."""
    # "://" is storage.has_scheme, inlined: parsing imports nothing heavy.
    return value if "://" in value or os.path.isabs(value) else os.path.abspath(value)


def absolute_paths(cls: type[BaseModel], values: dict[str, Any]) -> dict[str, Any]:
    """`values` with every local path option of `cls` (given or defaulted) made absolute."""
    out = dict(values)
    for name, field in cls.model_fields.items():
        value = values.get(name, field.default)
        if not isinstance(value, str) or not value:
            continue
        if name in PATH_FIELDS or (name in PATH_OR_NAME_FIELDS and os.path.exists(value)):
            out[name] = _absolute(value)
        elif name in PATH_LIST_FIELDS:
            out[name] = ",".join(_absolute(p.strip()) if p.strip() else p
                                 for p in value.split(","))
    return out


def _unknown_arguments(argv: list[str], extra: list[str], parser: argparse.ArgumentParser) -> str:
    """What is wrong with each argument argparse could not place, and what to type instead."""
    actions = parser._option_string_actions
    flags = [f for f in actions if f.startswith("--")]
    problems = []
    for i, arg in enumerate(extra):
        if not arg.startswith("-"):
            if i and extra[i - 1].startswith("--") and "=" not in extra[i - 1]:
                continue  # the value of the unknown option before it
            before = argv[argv.index(arg) - 1] if argv.index(arg) else ""
            if isinstance(actions.get(before), argparse.BooleanOptionalAction):
                on = before.removeprefix("--no-").removeprefix("--")
                problems.append(f"{before} takes no value ({arg!r}): give --{on} or --no-{on}")
                continue
            problems.append(f"unexpected argument {arg!r}: every option is a --flag followed by "
                            "its value")
            continue
        flag = arg.split("=", 1)[0]
        close = difflib.get_close_matches(flag, flags, n=1)
        problems.append(f"unknown option {flag}" + (f": did you mean {close[0]}?" if close else ""))
    return "; ".join(problems)


def parse_args(cls: type[C], argv: list[str] | None, description: str,
               prog: str | None = None) -> C:
    """Defaults, then --config YAML, then flags; raise ConfigError naming the bad option.

    Imports nothing heavy, so a job can parse before it imports torch or Ray."""
    parser = build_parser(cls, description, prog)
    argv = sys.argv[1:] if argv is None else list(argv)
    namespace, extra = parser.parse_known_args(argv)
    if extra:
        parser.error(_unknown_arguments(argv, extra, parser))
    args = vars(namespace)
    values: dict[str, Any] = {}
    config_file = args.pop("config", None)
    args.pop("log_format", None)
    args.pop("debug", None)
    file_keys: set[str] = set()
    if config_file:
        from pipeline import storage

        try:
            loaded = yaml.safe_load(storage.read_bytes(config_file)) or {}
        except FileNotFoundError as exc:
            raise ConfigError(f"--config {config_file}: file not found") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config {config_file}: not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {config_file}: must hold a mapping of option: value "
                              "(e.g. top_k: 3)")
        values.update({k.replace("-", "_"): v for k, v in loaded.items()})
        file_keys = set(values) - set(args)
    values.update(args)
    return validate(cls, absolute_paths(cls, values), source=config_file, file_keys=file_keys)


def _bounds(field: FieldInfo) -> dict[str, Any]:
    """The numeric limits of a field (ge, gt, le, lt) from its constraints."""
    found: dict[str, Any] = {}
    for item in field.metadata:
        for key in ("ge", "gt", "le", "lt"):
            if getattr(item, key, None) is not None:
                found[key] = getattr(item, key)
    return found


def _allowed_range(field: FieldInfo, kind: str) -> str:
    """'a whole number from 1 to 100', 'a number above 0', ... from the field's limits."""
    b = _bounds(field)
    low = (f"at least {b['ge']}" if "ge" in b else f"above {b['gt']}" if "gt" in b else None)
    high = (f"at most {b['le']}" if "le" in b else f"below {b['lt']}" if "lt" in b else None)
    if "ge" in b and "le" in b:
        return f"{kind} from {b['ge']} to {b['le']}"
    return " ".join(p for p in (kind, low, "and" if low and high else None, high) if p)


def _problem(cls: type[BaseModel], err: Any, source: str | None, file_keys: set[str]) -> str:
    """One pydantic error as: the option and the value, what is wrong, what to give instead."""
    if not err["loc"]:  # a check across options (model validator): its message says it all
        return str(err["msg"]).removeprefix("Value error, ")
    name = str(err["loc"][0])
    where = f" (key {name!r} in {source})" if source and name in file_keys else ""
    flag = _flag(name)
    got = err.get("input")
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(name, list(cls.model_fields), n=1)
        hint = f"did you mean {close[0]!r}?" if close else "option names are the flags with underscores"
        return f"unknown option {name!r}" + (f" in {source}" if source else "") + f": {hint}"
    field = cls.model_fields.get(name)
    if field is None:
        return f"{flag}: {err['msg']}"
    kind, choices = _flag_type(field.annotation)
    kind_name = {int: "a whole number", float: "a number", bool: "true or false",
                 str: "text"}.get(kind, str(kind))
    if err["type"] in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"{flag} {got}{where} is out of range: give {_allowed_range(field, kind_name)}"
    if err["type"] == "literal_error" and choices:
        return f"{flag} {got!r}{where} is not a choice: give one of {', '.join(map(str, choices))}"
    if err["type"].endswith(("_parsing", "_type", "_from_float")):
        return f"{flag} {got!r}{where} is not {kind_name}: give {kind_name}"
    return f"{flag} {got!r}{where}: {err['msg']}"


def validate(cls: type[C], values: dict[str, Any], source: str | None = None,
             file_keys: set[str] | None = None) -> C:
    """The config from `values`, or a ConfigError naming each bad option, what is wrong and
    what to give instead (`file_keys`: the keys that came from the YAML file `source`)."""
    try:
        return cls(**values)
    except ValidationError as exc:
        keys = set(values) if file_keys is None else file_keys
        problems = [_problem(cls, err, source, keys) for err in exc.errors()]
        raise ConfigError("; ".join(problems)) from exc
