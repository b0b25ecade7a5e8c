"""What an `image_uri` from vendor data may point at, and names from data that become paths.

A manifest row is data, not code: a vendor URL must not make a worker read its own files, the
cloud metadata service (169.254.169.254) or anything else on a private network. The policy
checks the scheme and an optional list of prefixes before a fetch; for http(s) the address guard
checks every address the host name resolves to, and the fetch then connects to the address it
checked (not a second lookup), so a DNS answer cannot change between the check and the connect.
"""

from __future__ import annotations

import ipaddress
import os
import posixpath
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from pipeline import storage
from pipeline.errors import ConfigError, ImageError

DEFAULT_SCHEMES = ("file", "s3", "gs", "https")
KNOWN_SCHEMES = ("file", "s3", "gs", "http", "https")
NOWHERE = "nowhere://"  # a prefix no URI has: the policy allows no location at all
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

Resolver = Callable[[str, int], list[str]]


def system_resolver(host: str, port: int) -> list[str]:
    """Every address the system resolver returns for host (IPv4 and IPv6)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def scheme_of(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if storage.has_scheme(uri) else "file"


def _is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _parse_networks(values: Sequence[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    try:
        return tuple(ipaddress.ip_network(v.strip(), strict=False) for v in values if v.strip())
    except ValueError as exc:
        raise ConfigError(f"--allowed-networks: {exc}") from exc


def _split(values: str | Sequence[str]) -> tuple[str, ...]:
    items = values.split(",") if isinstance(values, str) else values
    return tuple(v.strip() for v in items if v and v.strip())


def _contained(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


@dataclass(frozen=True)
class UriPolicy:
    """Allowed schemes and prefixes for image URIs, and networks http(s) may reach.

    `prefixes` empty means any location under an allowed scheme; local prefixes are compared
    after resolving symlinks and `..`, remote ones after normalizing the path. Addresses that are
    not globally routable (private, loopback, link-local, reserved, multicast) are refused unless
    inside one of `allowed_networks`.
    """

    schemes: tuple[str, ...] = DEFAULT_SCHEMES
    prefixes: tuple[str, ...] = ()
    allowed_networks: tuple[str, ...] = ()
    _networks: tuple = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.schemes) - set(KNOWN_SCHEMES))
        if unknown:
            raise ConfigError(f"--allowed-uri-schemes: unknown scheme(s) {', '.join(unknown)} "
                              f"(valid: {', '.join(KNOWN_SCHEMES)})")
        object.__setattr__(self, "_networks", _parse_networks(self.allowed_networks))

    @classmethod
    def from_options(cls, schemes: str, prefixes: str, networks: str, local_root: str | None,
                     dataset_root: str | None = None) -> UriPolicy:
        """The job's policy. With no prefixes given, local images must lie under `local_root`
        (the manifest's folder) or `dataset_root` (a labelled dataset a training manifest was
        made from) and are refused outright for a manifest in object storage; locations under
        the other allowed schemes are open."""
        scheme_list = tuple(s.lower() for s in _split(schemes))
        prefix_list = _split(prefixes)
        if not prefix_list:
            local = tuple(r for r in (local_root, dataset_root) if r and storage.is_local(r))
            prefix_list = (*local, *(f"{s}://" for s in scheme_list if s != "file")) or (NOWHERE,)
        return cls(schemes=scheme_list, prefixes=prefix_list, allowed_networks=_split(networks))

    def check_uri(self, uri: str) -> None:
        """Raise ImageError (fetch_failed, not retried) when uri is outside the policy or is
        not a URI at all (a NUL byte, a broken IPv6 literal): one row's error, never the
        night's."""
        try:
            scheme = scheme_of(uri)
            allowed = scheme in self.schemes
            inside = allowed and (not self.prefixes or any(self._matches(uri, p) for p in self.prefixes))
        except (ValueError, TypeError, UnicodeError) as exc:
            raise ImageError("fetch_failed", f"malformed URI ({type(exc).__name__}: {exc})") from exc
        if not allowed:
            raise ImageError("fetch_failed", f"not allowed: scheme {scheme!r} is not in the "
                             f"allowed schemes ({', '.join(self.schemes)})")
        if not inside:
            raise ImageError("fetch_failed", "not allowed: location is outside the allowed prefixes")

    @staticmethod
    def _matches(uri: str, prefix: str) -> bool:
        if storage.is_local(uri) != storage.is_local(prefix):
            return False
        if storage.is_local(uri):
            real = os.path.realpath(storage.local_path(uri))
            return _contained(real, os.path.realpath(storage.local_path(prefix)))
        parts = urlsplit(uri)
        if parts.username or parts.password:
            return False
        path = posixpath.normpath(parts.path) if parts.path else ""
        clean = f"{parts.scheme.lower()}://{parts.netloc.lower()}{path}"
        return clean == prefix.rstrip("/") or clean.startswith(prefix.rstrip("/") + "/")

    def check_address(self, host: str, address: str) -> None:
        """Refuse a resolved address that is not public, unless an allowed network holds it."""
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if _is_public(ip) or any(ip in net for net in self._networks):
            return
        raise ImageError("fetch_failed", f"not allowed: host {host!r} resolves to non-public "
                         f"address {address} (allow it with --allowed-networks)")

    def safe_address(self, host: str, port: int, resolver: Resolver | None = None) -> str:
        """Resolve host and return an address to connect to; every resolved address must pass."""
        try:
            addresses = [str(ipaddress.ip_address(host))] if _is_ip(host) else \
                (resolver or system_resolver)(host, port)
        except OSError as exc:
            raise ImageError("fetch_not_found", f"cannot resolve host {host!r}: {exc}") from exc
        if not addresses:
            raise ImageError("fetch_not_found", f"host {host!r} resolves to no address")
        for address in addresses:
            self.check_address(host, address)
        return addresses[0]


def safe_name(value: str, what: str) -> str:
    """A single path component from data or options; refuse anything that could leave a folder."""
    if not SAFE_NAME.match(value) or value in (".", ".."):
        raise ConfigError(f"{what} {value!r} is not a safe name: use 1-128 letters, digits, "
                          "'.', '_' or '-', starting with a letter or digit")
    return value
