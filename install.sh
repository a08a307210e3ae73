#!/bin/sh
# Install OCP for this user: the files in a prefix, an `ocp` command on PATH, and a service
# that starts `ocp serve` at boot (systemd user unit, --system unit, launchd agent, or @reboot cron).
#
#   sh install.sh [--bind ADDR] [--port N] [--auth-mode none|shared|multi] [--prefix DIR]
#                 [--bin-dir DIR] [--system] [--source DIR|URL] [--dry-run] [--uninstall]
#   curl -fsSL URL/install.sh | OCP_INSTALL_URL=URL sh -s -- --bind 0.0.0.0 --auth-mode multi
#
# Settings and secrets go into a 0600 env file the service reads; never into the unit or argv.
set -eu

PREFIX="${HOME}/.local/share/ocp"
BIN_DIR="${HOME}/.local/bin"
CONFIG_DIR="${XDG_CONFIG_HOME:-${HOME}/.config}/ocp"
ENV_FILE="${CONFIG_DIR}/ocp.env"
SOURCE="${OCP_INSTALL_URL:-}"
BIND=""
PORT=""
AUTH_MODE=""
SYSTEM=0
DRY_RUN=0
UNINSTALL=0
FILES="ocp.py models.json dashboard.html"
OPTIONAL_FILES="ocp_connect.py"  # installed when the source has it
UNIT_NAME="ocp.service"
LAUNCHD_LABEL="com.ocp.daemon"
CRON_MARK="# ocp-service"

say() { printf '%s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 2; }

# run CMD...: do it, or with --dry-run only show it.
run() {
  if [ "$DRY_RUN" = 1 ]; then
    say "+ $*"
  else
    "$@"
  fi
}

usage() {
  sed -n '2,9p' "$0" 2>/dev/null | sed 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
  case "$1" in
    --bind) [ $# -ge 2 ] || die "--bind needs an address"; BIND=$2; shift 2 ;;
    --port) [ $# -ge 2 ] || die "--port needs a number"; PORT=$2; shift 2 ;;
    --auth-mode) [ $# -ge 2 ] || die "--auth-mode needs none, shared or multi"; AUTH_MODE=$2; shift 2 ;;
    --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; PREFIX=$2; shift 2 ;;
    --bin-dir) [ $# -ge 2 ] || die "--bin-dir needs a directory"; BIN_DIR=$2; shift 2 ;;
    --source) [ $# -ge 2 ] || die "--source needs a directory or URL"; SOURCE=$2; shift 2 ;;
    --system) SYSTEM=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --uninstall) UNINSTALL=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

case "$PORT" in
  "") ;;
  *[!0-9]*) die "--port must be a number from 1 to 65535" ;;
  *) if [ "$PORT" -lt 1 ] || [ "$PORT" -gt 65535 ]; then die "--port must be a number from 1 to 65535"; fi ;;
esac
case "$AUTH_MODE" in
  ""|none|shared|multi) ;;
  *) die "--auth-mode must be none, shared or multi" ;;
esac
if [ "$SYSTEM" = 1 ]; then
  UNIT_PATH="/etc/systemd/system/${UNIT_NAME}"
else
  UNIT_PATH="${XDG_CONFIG_HOME:-${HOME}/.config}/systemd/user/${UNIT_NAME}"
fi
PLIST_PATH="${HOME}/Library/LaunchAgents/${LAUNCHD_LABEL}.plist"

find_python() {
  for candidate in python3 python3.13 python3.12 python3.11 python3.10 python3.9; do
    if path=$(command -v "$candidate" 2>/dev/null) &&
       "$path" -c 'import sys; sys.exit(sys.version_info < (3, 9))' 2>/dev/null; then
      say "$path"
      return 0
    fi
  done
  return 1
}

# fetch NAME DEST: copy NAME from the source directory, or download it from the source URL.
fetch() {
  case "$SOURCE" in
    http://*|https://*)
      if command -v curl >/dev/null 2>&1; then
        run curl -fsSL -o "$2" "${SOURCE%/}/$1"
      elif command -v wget >/dev/null 2>&1; then
        run wget -q -O "$2" "${SOURCE%/}/$1"
      else
        die "neither curl nor wget is installed to download ${SOURCE%/}/$1"
      fi ;;
    *) run cp "${SOURCE%/}/$1" "$2" ;;
  esac
}

# set_env KEY VALUE: put KEY='VALUE' in the env file, keeping every other line as it was.
set_env() {
  if [ "$DRY_RUN" = 1 ]; then
    say "+ set $1 in $ENV_FILE"
    return 0
  fi
  tmp="${ENV_FILE}.tmp.$$"
  (umask 077 && { grep -v "^$1=" "$ENV_FILE" 2>/dev/null || true; printf "%s='%s'\n" "$1" "$2"; } > "$tmp")
  mv "$tmp" "$ENV_FILE"
}

env_value() {
  sed -n "s/^$1='\\{0,1\\}\\([^']*\\)'\\{0,1\\}\$/\\1/p" "$ENV_FILE" 2>/dev/null | tail -n 1
}

write_file() { # write_file PATH MODE < content
  if [ "$DRY_RUN" = 1 ]; then
    say "+ write $1 (mode $2)"
    cat > /dev/null
    return 0
  fi
  tmp="$1.tmp.$$"
  (umask 077 && cat > "$tmp")
  chmod "$2" "$tmp"
  mv "$tmp" "$1"
}

have_systemd() {
  command -v systemctl >/dev/null 2>&1 || return 1
  if [ "$SYSTEM" = 1 ]; then systemctl show-environment >/dev/null 2>&1; else systemctl --user show-environment >/dev/null 2>&1; fi
}

systemctl_do() {
  if [ "$SYSTEM" = 1 ]; then run systemctl "$@"; else run systemctl --user "$@"; fi
}

service_command() {
  printf "/bin/sh -c 'set -a; . \"%s\"; set +a; exec \"%s\" \"%s/ocp.py\" serve'" "$ENV_FILE" "$PYTHON" "$PREFIX"
}

install_systemd() {
  run mkdir -p "$(dirname "$UNIT_PATH")"
  user_line=""
  wanted="default.target"
  network=""  # a user manager has no network-online.target: waiting on it would hang the unit
  if [ "$SYSTEM" = 1 ]; then
    user_line="User=$(id -un)"
    wanted="multi-user.target"
    network="After=network-online.target
Wants=network-online.target"
  fi
  write_file "$UNIT_PATH" 644 <<EOF
[Unit]
Description=OCP: an OpenAI-compatible API over a Claude subscription
${network}

[Service]
Type=simple
${user_line}
EnvironmentFile=${ENV_FILE}
ExecStart=${PYTHON} ${PREFIX}/ocp.py serve
Restart=on-failure
RestartSec=3
NoNewPrivileges=yes
# Each client connection and each CLI's pipes take descriptors: 1,024 is too few for a house
LimitNOFILE=65536

[Install]
WantedBy=${wanted}
EOF
  systemctl_do daemon-reload
  systemctl_do enable --now "$UNIT_NAME"
  systemctl_do restart "$UNIT_NAME"
  say "service: systemd unit $UNIT_PATH"
  if [ "$SYSTEM" = 0 ]; then
    say "  On a headless box, keep it running after you log out: loginctl enable-linger $(id -un)"
  fi
}

install_launchd() {
  run mkdir -p "$(dirname "$PLIST_PATH")"
  write_file "$PLIST_PATH" 644 <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
  <key>Label</key><string>${LAUNCHD_LABEL}</string>
  <key>ProgramArguments</key>
  <array><string>/bin/sh</string><string>-c</string><string>set -a; . "${ENV_FILE}"; set +a; exec "${PYTHON}" "${PREFIX}/ocp.py" serve</string></array>
  <key>RunAtLoad</key><true/>
  <key>KeepAlive</key><true/>
  <key>SoftResourceLimits</key><dict><key>NumberOfFiles</key><integer>65536</integer></dict>
  <key>HardResourceLimits</key><dict><key>NumberOfFiles</key><integer>65536</integer></dict>
  <key>StandardErrorPath</key><string>${HOME}/Library/Logs/ocp.log</string>
</dict>
</plist>
EOF
  run launchctl bootout "gui/$(id -u)/${LAUNCHD_LABEL}" 2>/dev/null || true
  run launchctl bootstrap "gui/$(id -u)" "$PLIST_PATH"
  say "service: launchd agent $PLIST_PATH"
}

install_cron() {
  # At boot, and every 5 minutes to bring back a crashed OCP: a second serve on the same
  # OCP_HOME finds the first one's lock and exits at once, touching nothing.
  line="@reboot $(service_command) >/dev/null 2>&1 ${CRON_MARK}"
  again="*/5 * * * * $(service_command) >/dev/null 2>&1 ${CRON_MARK}"
  if [ "$DRY_RUN" = 1 ]; then
    say "+ add to crontab: $line"
    say "+ add to crontab: $again"
    return 0
  fi
  { crontab -l 2>/dev/null | grep -v "$CRON_MARK" || true; say "$line"; say "$again"; } | crontab -
  say "service: cron entries at boot and every 5 minutes (start it now with: ocp serve)"
}

install_service() {
  if [ "$(uname -s)" = Darwin ] && command -v launchctl >/dev/null 2>&1; then
    install_launchd
  elif have_systemd; then
    install_systemd
  elif command -v crontab >/dev/null 2>&1; then
    say "systemctl is not available here: using an @reboot cron entry instead"
    install_cron
  else
    say "No service manager found (no systemctl, launchd or crontab): start OCP yourself with: ocp serve"
  fi
}

uninstall() {
  if [ -f "$UNIT_PATH" ]; then
    if command -v systemctl >/dev/null 2>&1; then
      systemctl_do disable --now "$UNIT_NAME" || true
    fi
    run rm -f "$UNIT_PATH"
    if command -v systemctl >/dev/null 2>&1; then systemctl_do daemon-reload || true; fi
  fi
  if [ -f "$PLIST_PATH" ]; then
    run launchctl bootout "gui/$(id -u)/${LAUNCHD_LABEL}" 2>/dev/null || true
    run rm -f "$PLIST_PATH"
  fi
  if command -v crontab >/dev/null 2>&1 && crontab -l 2>/dev/null | grep -q "$CRON_MARK"; then
    if [ "$DRY_RUN" = 1 ]; then say "+ remove the ocp line from crontab"; else
      crontab -l 2>/dev/null | grep -v "$CRON_MARK" | crontab -
    fi
  fi
  for name in $FILES $OPTIONAL_FILES .source; do run rm -f "${PREFIX}/${name}"; done
  run rm -rf "${PREFIX}/.previous" "${PREFIX}/__pycache__"
  run rmdir "$PREFIX" 2>/dev/null || true
  run rm -f "${BIN_DIR}/ocp" "$ENV_FILE"
  run rmdir "$CONFIG_DIR" 2>/dev/null || true
  say "OCP is uninstalled. Its data (keys, usage) stays in ${OCP_HOME:-$HOME/.ocp}; remove that yourself if you want."
}

if [ "$UNINSTALL" = 1 ]; then
  uninstall
  exit 0
fi

PYTHON=$(find_python) || die "OCP needs Python 3.9 or newer (python3 was not found or is older)"
if [ -z "$SOURCE" ]; then
  here=$(dirname "$0")
  if [ -f "${here}/ocp.py" ]; then
    SOURCE=$(cd "$here" && pwd)
  else
    die "run this from a copy of OCP, or give --source DIR|URL (or OCP_INSTALL_URL) when piping it into sh"
  fi
fi

say "Installing OCP into ${PREFIX} (from ${SOURCE})"
run mkdir -p "$PREFIX" "$BIN_DIR" "$CONFIG_DIR"
run chmod 700 "$CONFIG_DIR"
for name in $FILES; do
  fetch "$name" "${PREFIX}/${name}.new"
  run mv "${PREFIX}/${name}.new" "${PREFIX}/${name}"
done
for name in $OPTIONAL_FILES; do
  case "$SOURCE" in
    http://*|https://*) if fetch "$name" "${PREFIX}/${name}.new" 2>/dev/null; then run mv "${PREFIX}/${name}.new" "${PREFIX}/${name}"; fi ;;
    *) if [ -f "${SOURCE%/}/${name}" ]; then fetch "$name" "${PREFIX}/${name}"; fi ;;
  esac
done
run chmod 755 "${PREFIX}/ocp.py"
if [ "$DRY_RUN" = 1 ]; then say "+ record the source in ${PREFIX}/.source"; else say "$SOURCE" > "${PREFIX}/.source"; fi

if [ ! -f "$ENV_FILE" ] && [ "$DRY_RUN" = 0 ]; then
  (umask 077 && printf '# OCP settings, read by its service and the ocp command (0600: may hold secrets).\n# Add CLAUDE_CODE_OAUTH_TOKEN=... here after running: claude setup-token\n' > "$ENV_FILE")
fi
[ -n "$BIND" ] && set_env CLAUDE_BIND "$BIND"
[ -n "$PORT" ] && set_env CLAUDE_PROXY_PORT "$PORT"
[ -n "$AUTH_MODE" ] && set_env CLAUDE_AUTH_MODE "$AUTH_MODE"
if [ "$AUTH_MODE" = shared ] && [ -z "$(env_value PROXY_API_KEY)" ]; then
  set_env PROXY_API_KEY "$("$PYTHON" -c 'import secrets; print("ocp_" + secrets.token_urlsafe(24))')"
  say "A shared key was generated into ${ENV_FILE} (PROXY_API_KEY)."
fi
CLAUDE_PATH=$(command -v claude 2>/dev/null || true)
if [ -n "$CLAUDE_PATH" ]; then
  set_env CLAUDE_BIN "$CLAUDE_PATH"
else
  say "The claude CLI was not found: install it with npm i -g @anthropic-ai/claude-code, then run install.sh again."
fi
set_env OCP_UPDATE_URL "$SOURCE"
[ "$DRY_RUN" = 1 ] || chmod 600 "$ENV_FILE"

write_file "${BIN_DIR}/ocp" 755 <<EOF
#!/bin/sh
# The ocp command, installed by OCP's install.sh: OCP's settings from ${ENV_FILE}, then ocp.py.
set -a
[ -f "${ENV_FILE}" ] && . "${ENV_FILE}"
OCP_COMMAND=ocp
set +a
exec "${PYTHON}" "${PREFIX}/ocp.py" "\$@"
EOF

install_service

say ""
say "Next steps:"
say "  1. claude setup-token   (then put CLAUDE_CODE_OAUTH_TOKEN=<token> into ${ENV_FILE} and run: ocp restart)"
say "  2. ocp keys add NAME    (one key per person, when --auth-mode multi)"
say "  3. ocp lan              (the line to run on each client)"
case ":${PATH}:" in
  *":${BIN_DIR}:"*) ;;
  *) say "  Note: ${BIN_DIR} is not on your PATH; add it, or run ${BIN_DIR}/ocp" ;;
esac
