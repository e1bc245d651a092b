#!/usr/bin/env bash
# Install fnx as a systemd service. Idempotent: safe to run again, e.g. to upgrade the binary.
#
#   sudo scripts/systemd/install.sh [--unix] PATH/TO/fnx       (e.g. target/release/fnx)
#
# --unix also installs the drop-in users-unix.conf for [users] mode = "unix" (the daemon gets
# CAP_SETUID, CAP_SETGID, CAP_SETPCAP and CAP_CHOWN to run each user's tasks as that user);
# without it, an existing drop-in is left as it is.
#
# - creates the system account `fnx` (home /var/lib/fnx, no login shell) if it is missing;
# - installs the binary as /usr/local/bin/fnx (atomic replace; a running daemon keeps the old
#   one until it is restarted);
# - installs fnx.service as /etc/systemd/system/fnx.service (a different existing file is kept
#   as fnx.service.bak.<time>; put local changes in a drop-in: `systemctl edit fnx`);
# - installs site.toml as /etc/fnx/site.toml only if that file does not exist yet;
# - runs `systemctl daemon-reload`. It does not enable, start or restart the service.
set -euo pipefail

BIN_DEST=/usr/local/bin/fnx
UNIT_DEST=/etc/systemd/system/fnx.service
CONF_DIR=/etc/fnx
CONF_DEST=$CONF_DIR/site.toml
DATA_DIR=/var/lib/fnx
SERVICE_USER=fnx

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() {
  echo "usage: sudo $0 [--unix] PATH/TO/fnx" >&2
  exit 2
}

unix_mode=0
if [ "${1:-}" = "--unix" ]; then
  unix_mode=1
  shift
fi
[ $# -eq 1 ] || usage
case "$1" in -h | --help) usage ;; esac
bin_src="$1"
if [ ! -f "$bin_src" ] || [ ! -x "$bin_src" ]; then
  echo "install: $bin_src is not an executable file" >&2
  exit 2
fi
for f in fnx.service site.toml users-unix.conf; do
  [ -f "$here/$f" ] || { echo "install: $here/$f is missing" >&2; exit 2; }
done
[ "$(id -u)" -eq 0 ] || { echo "install: run as root (sudo $0 $bin_src)" >&2; exit 1; }

# 1. The service account.
if getent passwd "$SERVICE_USER" >/dev/null; then
  echo "install: user $SERVICE_USER exists"
else
  nologin="$(command -v nologin || true)"
  [ -n "$nologin" ] || nologin=/bin/false
  group_opt=(--user-group)
  if getent group "$SERVICE_USER" >/dev/null; then group_opt=(--gid "$SERVICE_USER"); fi
  useradd --system "${group_opt[@]}" --home-dir "$DATA_DIR" --no-create-home \
    --shell "$nologin" --comment "fnx daemon" "$SERVICE_USER"
  echo "install: created system user $SERVICE_USER"
fi

# 2. The binary: copy next to the destination, then rename over it (never a half-written file,
#    and no "text file busy" while the old binary runs).
tmp_bin="$(dirname "$BIN_DEST")/.fnx.new.$$"
trap 'rm -f "$tmp_bin"' EXIT
install -D -m 0755 -o root -g root "$bin_src" "$tmp_bin"
mv -f "$tmp_bin" "$BIN_DEST"
trap - EXIT
echo "install: $BIN_DEST ($("$BIN_DEST" --version 2>/dev/null || echo "version unknown"))"

# 3. The unit.
if [ -f "$UNIT_DEST" ] && ! cmp -s "$here/fnx.service" "$UNIT_DEST"; then
  backup="$UNIT_DEST.bak.$(date +%Y%m%d%H%M%S)"
  cp -p "$UNIT_DEST" "$backup"
  echo "install: $UNIT_DEST differed; the old one is kept as $backup"
fi
install -D -m 0644 -o root -g root "$here/fnx.service" "$UNIT_DEST"
echo "install: $UNIT_DEST"
if [ "$unix_mode" -eq 1 ]; then
  install -D -m 0644 -o root -g root "$here/users-unix.conf" "$UNIT_DEST.d/users-unix.conf"
  echo "install: $UNIT_DEST.d/users-unix.conf (capabilities for [users] mode = \"unix\")"
fi

# 4. The site config, only if absent (never overwrite an admin's config).
install -d -m 0755 -o root -g root "$CONF_DIR"
if [ -e "$CONF_DEST" ]; then
  echo "install: kept existing $CONF_DEST (example: $here/site.toml)"
else
  install -m 0644 -o root -g root "$here/site.toml" "$CONF_DEST"
  echo "install: $CONF_DEST (example config; review it)"
fi

# 5. The data dir (systemd also creates it on start, via StateDirectory=fnx); creating it here
#    lets `fnx token create` run before the first start.
data_mode=0750
[ "$unix_mode" -eq 1 ] && data_mode=0711
install -d -m "$data_mode" -o "$SERVICE_USER" -g "$SERVICE_USER" "$DATA_DIR"

# 6. Check the config with the installed binary (a failure is reported, not fatal: the binary
#    and unit are installed either way, and the unit runs the same check before starting).
#    It runs as the service account, so an unreadable config shows up here too.
if ! (cd / && runuser -u "$SERVICE_USER" -- "$BIN_DEST" config check "$CONF_DEST"); then
  echo "install: WARNING: '$BIN_DEST config check $CONF_DEST' failed; fix the config before starting" >&2
fi

# 7. Tell systemd.
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
  systemctl daemon-reload
  echo "install: systemctl daemon-reload done"
else
  echo "install: systemd is not running here; run 'systemctl daemon-reload' on the target system"
fi

cat <<EOF

Next steps:
  1. Review $CONF_DEST, then start the service now and at boot:
       sudo systemctl enable --now fnx
       systemctl status fnx; journalctl -u fnx
     (after an upgrade of a running service: sudo systemctl restart fnx)
  2. Users on this host need no token: with [daemon] socket = "/run/fnx/fnx.sock" the CLI
     and the SDK find the daemon's socket and the kernel tells it who they are.
     For remote use, create a token per user (printed once; only its hash is stored):
       sudo -u $SERVICE_USER $BIN_DEST token create --user alice --config $CONF_DEST
     Hand it to alice, who puts {"url": ..., "token": ...} in ~/.fnx/client.json (mode 0600)
     or sets FNX_URL and FNX_TOKEN.
  3. The admin token of the service account is in $DATA_DIR/client.json after the first start.
EOF
