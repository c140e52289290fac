#!/bin/sh
# deploy/nginx.conf is written for nginx 1.27.4 or later on Docker's networks; this image has Debian 12's
# nginx (1.22) on podman's. nginx runs on a copy of the mounted file in the older spelling, everything else
# as mounted:
# - `resolve` (1.27.3) is dropped from upstream servers: their names are resolved when nginx starts, which
#   compose orders after the replicas nginx depends on;
# - the resolver, Docker's embedded DNS (127.0.0.11), becomes podman's (the first nameserver in resolv.conf);
# - `ssl_certificate_cache` (1.27.4) is dropped: certificates named by variables are read at each handshake;
# - `http2 on;` (1.25.1) becomes the `http2` parameter of its server's `ssl` listeners, or of all of them when
#   none is `ssl` (a cleartext gRPC port): on 1.22 a cleartext `http2` listener speaks HTTP/2 only, so a server
#   that also serves HTTP/1.1 in cleartext keeps that listener as it is.
set -eu
source=/etc/nginx/nginx.conf
adapted=/run/nginx-chatterbot.conf
nameserver=$(awk '$1 == "nameserver" { print $2; exit }' /etc/resolv.conf)

awk -v nameserver="${nameserver:-127.0.0.11}" '
function flush(    i, http2, ssl) {
    http2 = 0
    ssl = 0
    for (i = 1; i <= n; i++) {
        if (block[i] ~ /^[ \t]*http2[ \t]+on;/) http2 = 1
        if (block[i] ~ /^[ \t]*listen[ \t][^;]*[ \t]ssl[ \t;]/) ssl = 1
    }
    for (i = 1; i <= n; i++) {
        if (http2 && block[i] ~ /^[ \t]*http2[ \t]+on;/) continue
        if (http2 && block[i] ~ /^[ \t]*listen[ \t]/ && (!ssl || block[i] ~ /[ \t]ssl[ \t;]/))
            sub(/;/, " http2;", block[i])
        print block[i]
    }
}
{
    line = $0
    if (line ~ /^[ \t]*ssl_certificate_cache[ \t]/) next
    if (line ~ /^[ \t]*server[ \t]/ && line ~ /[ \t]resolve;/) sub(/[ \t]+resolve;/, ";", line)
    if (line ~ /^[ \t]*resolver[ \t]+127\.0\.0\.11[ \t;]/) sub(/127\.0\.0\.11/, nameserver, line)
    if (!inside && line ~ /^[ \t]*server[ \t]*\{/) {
        inside = 1
        depth = 0
        n = 0
    }
    if (inside) {
        block[++n] = line
        depth += gsub(/\{/, "{", line) - gsub(/\}/, "}", line)
        if (depth == 0) {
            flush()
            inside = 0
        }
        next
    }
    print line
}
' "$source" >"$adapted"

if [ "${1:-}" = nginx ]; then
    shift
    exec nginx -c "$adapted" "$@"
fi
exec "$@"
