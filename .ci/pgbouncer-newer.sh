#!/usr/bin/env bash
# Builds a PgBouncer with max_prepared_statements (1.21 or later) for tests/poolers.rs into
# target/pgbouncer-trixie/pgbouncer, unless it is there already. Debian bookworm ships 1.18, so
# this takes Debian trixie's source package (1.24.x with Debian's security patches) through
# apt's own deb-src machinery, in a private apt state directory (the system's sources and
# lists are not touched), and builds the binary alone: no docs (no pandoc), no PAM, no systemd.
# About 30 s on 2 cores. Needs deb.debian.org (or the mirror in DEBIAN_MIRROR).
set -euo pipefail
cd "$(dirname "$0")/.."

out=target/pgbouncer-trixie
if [ -x "$out/pgbouncer" ]; then
  exit 0
fi
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

missing=()
for pkg in libevent-dev libssl-dev libc-ares-dev pkg-config dpkg-dev make gcc; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} to build PgBouncer"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

work="$out/build"
rm -rf "$work"
mkdir -p "$work"/apt/lists/partial "$work"/apt/cache/archives/partial "$work"/src
work=$(cd "$work" && pwd)
echo "deb-src $mirror trixie main" >"$work/apt/sources.list"
touch "$work/apt/status"
apt_opts=(
  -o "Dir::Etc::SourceList=$work/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
  -o "Dir::State::Lists=$work/apt/lists" -o "Dir::Cache=$work/apt/cache"
  -o "Dir::State::Status=$work/apt/status"
)
echo "building PgBouncer from Debian trixie's source package into $out for tests/poolers.rs"
apt-get "${apt_opts[@]}" -qq update
# apt checks the files against the signed Release and Sources; dpkg-source would check the
# .dsc's own signature against keyrings this machine does not have, and only warns.
(cd "$work/src" && apt-get "${apt_opts[@]}" -qq source --download-only pgbouncer >../fetch.log 2>&1) || { cat "$work/fetch.log"; exit 1; }
(cd "$work/src" && dpkg-source -x pgbouncer_*.dsc pgbouncer >../unpack.log 2>&1) || { cat "$work/unpack.log"; exit 1; }
(
  cd "$work/src/pgbouncer"
  ./configure --without-pam --without-systemd >../configure.log 2>&1 || { tail -30 ../configure.log; exit 1; }
  make -j2 >../make.log 2>&1 || { tail -30 ../make.log; exit 1; }
)
cp "$work/src/pgbouncer/pgbouncer" "$out/pgbouncer"
"$out/pgbouncer" --version | head -1
