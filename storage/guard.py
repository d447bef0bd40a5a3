"""Which URLs the service may download from: URLs in callbacks are untrusted input.

A URL passes when it is http(s) without credentials, its host matches the
allowed host suffixes (when any are set), and every address its host resolves
to is globally routable. Addresses hidden inside IPv6 forms (IPv4-mapped,
IPv4-compatible, NAT64, 6to4, Teredo) are unwrapped and checked too.
ALLOW_PRIVATE_DOWNLOADS lifts the address check, except for link-local and cloud
metadata addresses: no media lives there, and a redirect to one is the classic
way to read credentials. The caller then connects to the address that was
checked, never resolving again.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from storage._errors import RefusedURL

__all__ = ["Target", "UrlPolicy", "is_public_address"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Not covered by `is_global`, or worth naming: carrier-grade NAT and cloud metadata.
_BLOCKED = [
    ipaddress.ip_network("100.64.0.0/10"),
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("fd00:ec2::/32"),
    ipaddress.ip_network("192.0.0.0/24"),
]
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Refused even when private addresses are allowed.
_NEVER = [
    ipaddress.ip_network("169.254.0.0/16"),  # link-local: AWS, GCP, Azure, Oracle metadata
    ipaddress.ip_network("fe80::/10"),
    ipaddress.ip_network("fd00:ec2::/32"),  # AWS metadata over IPv6
    ipaddress.ip_network("100.100.100.200/32"),  # Alibaba Cloud metadata
]


def _embedded(address: IPAddress) -> list[IPAddress]:
    """IPv4 addresses that an IPv6 address carries, for the forms routers act on."""
    if not isinstance(address, ipaddress.IPv6Address):
        return []
    inner: list[IPAddress] = []
    if address.ipv4_mapped is not None:
        inner.append(address.ipv4_mapped)
    if address.sixtofour is not None:
        inner.append(address.sixtofour)
    if address.teredo is not None:
        inner.extend(address.teredo)  # (server, client)
    packed = address.packed
    if address in _NAT64 or packed[:12] == bytes(12):  # NAT64 and IPv4-compatible
        inner.append(ipaddress.IPv4Address(packed[12:]))
    return inner


def is_public_address(address: IPAddress) -> bool:
    """Globally routable, and so is every address it carries inside it."""
    if any(address in network for network in _BLOCKED if network.version == address.version):
        return False
    inner = _embedded(address)
    if inner:
        return all(is_public_address(a) for a in inner)
    return address.is_global and not address.is_multicast


def _always_refused(address: IPAddress) -> bool:
    """Link-local or cloud metadata, itself or inside an IPv6 form."""
    if any(address in network for network in _NEVER if network.version == address.version):
        return True
    return any(_always_refused(a) for a in _embedded(address))


@dataclass(frozen=True, slots=True)
class Target:
    """A URL that passed the policy, with the addresses to connect to."""

    url: str
    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class UrlPolicy:
    """The download policy from ALLOW_PRIVATE_DOWNLOADS and DOWNLOAD_ALLOWED_HOSTS."""

    allow_private: bool = False
    allowed_hosts: tuple[str, ...] = ()
    allow_setting: str = "ALLOW_PRIVATE_DOWNLOADS"  # what a refusal tells people to set
    # The service's own sample files (PUBLIC_URL + /samples/): fetched wherever that
    # address is, since they are this service's bytes, not a peer's.
    own_samples: str = ""

    def _own_sample(self, url: str, parts: SplitResult) -> bool:
        # No dot segments or escapes, so the path fetched is the path checked.
        path = parts.path
        return (
            bool(self.own_samples)
            and url.startswith(self.own_samples)
            and not any(mark in path for mark in ("..", "%", "\\"))
        )

    def check_form(self, url: str) -> SplitResult:
        """The URL's parts, or `RefusedURL` for anything but plain http(s) to an allowed host."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise RefusedURL(url, f"the URL is malformed ({exc})") from exc
        if parts.scheme not in ("http", "https"):
            raise RefusedURL(url, "only http and https URLs are downloaded")
        if parts.username is not None or parts.password is not None:
            raise RefusedURL(url, "URLs with credentials are not downloaded")
        host = (parts.hostname or "").rstrip(".").lower()
        if not host:
            raise RefusedURL(url, "the URL has no host")
        if port == 0:
            raise RefusedURL(url, "port 0 is not a place to download from")
        if (
            self.allowed_hosts
            and not self._own_sample(url, parts)
            and not any(
                host == suffix or host.endswith("." + suffix) for suffix in self.allowed_hosts
            )
        ):
            raise RefusedURL(url, f"host {host} is not in DOWNLOAD_ALLOWED_HOSTS")
        return parts

    def resolve(self, url: str) -> Target:
        """Check the URL and resolve its host; every address must be public unless allowed."""
        parts = self.check_form(url)
        host = (parts.hostname or "").rstrip(".").lower()
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            addresses = [literal]
        else:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except (OSError, UnicodeError) as exc:
                raise RefusedURL(url, f"host {host} does not resolve ({exc})", retry=True) from exc
            addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
        if not addresses:
            raise RefusedURL(url, f"host {host} has no addresses", retry=True)
        for address in addresses:
            if _always_refused(address):
                raise RefusedURL(
                    url,
                    f"host {host} resolves to {address}, a link-local or cloud metadata address, "
                    "which is never downloaded from",
                )
            private_ok = self.allow_private or self._own_sample(url, parts)
            if not private_ok and not is_public_address(address):
                raise RefusedURL(
                    url,
                    f"host {host} resolves to {address}, which is not a public address "
                    f"(set {self.allow_setting}=true to allow it)",
                )
        unique = tuple(dict.fromkeys(str(a) for a in addresses))
        return Target(url, parts.scheme, host, port, unique)
