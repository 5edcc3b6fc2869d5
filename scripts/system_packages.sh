#!/usr/bin/env bash
# Debian packages that the tests start as real servers (part of `make install`):
#   redis-server: [server.limits] backend = "redis", limits shared by lorag replicas;
#   postgresql:   [state] backend = "postgres", keys shared by lorag replicas (initdb, pg_ctl, psql).
# Installs what is missing with apt-get (as root, or through sudo without a password); elsewhere
# says which packages to install and fails.
set -euo pipefail
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
{ command -v psql >/dev/null && compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; } || missing+=(postgresql)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  echo "lorag's tests need the Debian packages: ${missing[*]}. Install them (apt-get install ${missing[*]}) and run make again." >&2
  exit 1
fi
if ! command -v apt-get >/dev/null; then
  echo "lorag's tests need: ${missing[*]} (no apt-get here: install them with this system's package manager)." >&2
  exit 1
fi
echo "Installing ${missing[*]} (Debian packages the tests start as real servers)"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" \
  || { "${sudo[@]}" apt-get update -q && "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"; }
