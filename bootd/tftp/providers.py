"""Dynamic TFTP files (the provider seam): names answered by code before the disk is asked.

`TftpServer.add_provider(provider, pattern=None)` registers a callable asked before the disk:

    provider(path: str, client_ip: str, client_mac: str | None) -> bytes | str | None   (or async)

`path` is the normalised, root-relative name ('pxelinux.cfg/01-52-54-00-12-34-56', no leading '/';
names with '..', '\\' or NUL never reach a provider). `client_mac` is 'aa:bb:cc:dd:ee:ff', the MAC a live
binding puts at the client's address (bootd/peers.py: configured ip, live lease, fresh neighbour
entry), or None. bytes (or str, sent as UTF-8) are served as the file; None falls through to the next
provider and finally to the file under the root. `pattern` is an fnmatch glob ('pxelinux.cfg/*') or a
compiled regex (fullmatch) on `path`; the provider is only asked for matching names. A provider that
raises is logged and counted, and the client gets "file not found". Providers are asked in
registration order; `remove_provider` undoes a registration.
"""
from __future__ import annotations

import fnmatch
import inspect
import logging
import re
from typing import Awaitable, Callable, Optional, Union

from bootd.tftp.paths import PathRefused

log = logging.getLogger("bootd.tftp")

Answer = Union[bytes, str, None]
Provider = Callable[[str, str, Optional[str]], Union[Answer, Awaitable[Answer]]]
NameMatch = Callable[[str], bool]


class ProviderFailed(PathRefused):
    """A provider raised: the client is told "file not found", the failure is logged and counted."""


def _matcher(pattern: Union[str, re.Pattern[str], None]) -> Optional[NameMatch]:
    if pattern is None:
        return None
    if isinstance(pattern, re.Pattern):
        regex = pattern
        return lambda path: regex.fullmatch(path) is not None
    glob = str(pattern)
    return lambda path: fnmatch.fnmatchcase(path, glob)


class Providers:
    """The registered providers, in registration order."""

    def __init__(self) -> None:
        self._entries: list[tuple[Optional[NameMatch], Provider]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, provider: Provider, pattern: Union[str, re.Pattern[str], None] = None) -> Provider:
        """Serve names matching `pattern` (glob or regex; None: every name) from `provider` first."""
        if not callable(provider):
            raise TypeError("provider must be callable")
        self._entries.append((_matcher(pattern), provider))
        return provider

    def remove(self, provider: Provider) -> None:
        self._entries = [(m, p) for m, p in self._entries if p is not provider]

    async def ask(self, path: str, client_ip: str, client_mac: Optional[str]) -> Optional[bytes]:
        """The first answer for `path`, or None (serve it from disk). Raises ProviderFailed."""
        for match, provider in list(self._entries):
            if match is not None and not match(path):
                continue
            try:
                result = provider(path, client_ip, client_mac)
                if inspect.isawaitable(result):
                    result = await result
            except Exception:
                log.exception("tftp: provider %r failed for %r", provider, path)
                raise ProviderFailed("provider failed") from None
            if result is None:
                continue
            if isinstance(result, str):
                return result.encode("utf-8")
            return bytes(result)
        return None
