"""The warehouse options of the nightly job: `--iceberg-table` and `--iceberg-catalog`.

Catalog properties are pyiceberg's own (`load_catalog(name, **properties)`); an optional `name`
key picks the catalog name (default `default`, which also merges `~/.pyiceberg.yaml` and
`PYICEBERG_CATALOG__DEFAULT__*` environment variables, the place for credentials).
"""

from __future__ import annotations

import re

from pipeline.errors import ConfigError

# One part of a table identifier (a namespace level or the table name).
NAME_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")
TABLE_HELP = "pass --iceberg-table NAMESPACE.TABLE, e.g. --iceberg-table retail.categories"
CATALOG_HELP = ("pass --iceberg-catalog KEY=VALUE,... with pyiceberg catalog properties, e.g. "
                "type=sql,uri=sqlite:////abs/catalog.db,warehouse=file:///abs/warehouse")


def parse_catalog_properties(text: str) -> dict[str, str]:
    """`KEY=VALUE,KEY=VALUE` -> pyiceberg catalog properties; ConfigError on malformed input.

    Values may contain `=` (split at the first one) but not `,`. Error messages name keys and
    positions, never values: properties may hold credentials.
    """
    if not text or not text.strip():
        raise ConfigError(f"--iceberg-catalog is empty; {CATALOG_HELP}")
    properties: dict[str, str] = {}
    for position, entry in enumerate(text.split(","), start=1):
        entry = entry.strip()
        if not entry:
            raise ConfigError(f"--iceberg-catalog entry {position} is empty; remove the extra comma")
        key, sep, value = entry.partition("=")
        key, value = key.strip(), value.strip()
        if not sep:
            raise ConfigError(f"--iceberg-catalog entry {position} ({entry!r}) has no '='; "
                              f"write it as KEY=VALUE ({CATALOG_HELP})")
        if not key:
            raise ConfigError(f"--iceberg-catalog entry {position} has no key before '='; "
                              "write it as KEY=VALUE")
        if not value:
            raise ConfigError(f"--iceberg-catalog key {key!r} has an empty value; give it a value "
                              "or leave the key out")
        if key in properties:
            raise ConfigError(f"--iceberg-catalog sets key {key!r} twice; keep one of them")
        properties[key] = value
    return properties


def parse_table_name(text: str) -> tuple[str, str]:
    """`NAMESPACE.TABLE` -> (namespace, table); the last dot splits, so namespaces may nest."""
    namespace, dot, table = (text or "").strip().rpartition(".")
    if not dot:
        raise ConfigError(f"Iceberg table {text!r} has no namespace; {TABLE_HELP}")
    for part in [*namespace.split("."), table]:
        if not NAME_PART.match(part):
            raise ConfigError(
                f"Iceberg table {text!r} has an empty or invalid name part {part!r} (letters, digits, "
                f"'_' and '-' only, dot-separated); {TABLE_HELP}")
    return namespace, table
