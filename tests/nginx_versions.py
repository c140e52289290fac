"""deploy/nginx.conf is written for nginx 1.27.4 or later; the tests run the nginx installed here (Debian 12's
is 1.22). `for_installed_nginx` turns the directives an older nginx lacks into their older spelling, and
leaves everything else as shipped:

- `http2 on;` (1.25.1) becomes the `http2` parameter of the server's `ssl` listeners (of all its listeners
  when none is `ssl`: a cleartext gRPC port); before 1.25.1 a cleartext listener with `http2` speaks only
  HTTP/2, so a server that also listens in cleartext for HTTP/1.1 keeps that listener as it is;
- `ssl_certificate_cache` (1.27.4) is dropped: certificates named by variables are then read at every
  handshake.

`resolve` in upstreams (1.27.3) is left to the callers, which point the upstreams at loopback addresses.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from functools import cache

HTTP2_DIRECTIVE = (1, 25, 1)
CERTIFICATE_CACHE = (1, 27, 4)


@cache
def installed_version() -> tuple[int, ...]:
    """The version of the `nginx` on the PATH, e.g. (1, 22, 1)."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    out = subprocess.run([nginx, "-v"], capture_output=True, text=True, timeout=30).stderr
    found = re.search(r"nginx/(\d+(?:\.\d+)*)", out)
    assert found, out
    return tuple(int(part) for part in found.group(1).split("."))


def _server_blocks(conf: str) -> list[tuple[int, int]]:
    """(start, end) of every `server { ... }` block that is a virtual server (not an upstream's `server`)."""
    blocks = []
    for match in re.finditer(r"^\s*server\s*\{", conf, flags=re.M):
        depth = 0
        for end in range(match.end() - 1, len(conf)):
            depth += {"{": 1, "}": -1}.get(conf[end], 0)
            if depth == 0:
                blocks.append((match.start(), end + 1))
                break
    return blocks


def _http2_as_listen_parameter(block: str) -> str:
    if not re.search(r"^\s*http2 on;", block, flags=re.M):
        return block
    block = re.sub(r"^\s*http2 on;\n", "", block, flags=re.M)
    listens = re.findall(r"^\s*listen [^;]*;", block, flags=re.M)
    secure = [line for line in listens if re.search(r"\sssl\b", line)]
    for line in secure or listens:
        block = block.replace(line, line[:-1] + " http2;", 1)
    return block


def for_installed_nginx(conf: str, version: tuple[int, ...] | None = None) -> str:
    """`conf` in the spelling of the installed nginx (or of `version`)."""
    version = version or installed_version()
    if version < HTTP2_DIRECTIVE:
        for start, end in reversed(_server_blocks(conf)):
            conf = conf[:start] + _http2_as_listen_parameter(conf[start:end]) + conf[end:]
    if version < CERTIFICATE_CACHE:
        conf = re.sub(r"^\s*ssl_certificate_cache [^;]*;\n", "", conf, flags=re.M)
    return conf
