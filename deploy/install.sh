#!/bin/sh
# Installs the telemetry agent as a systemd service:
#   ROOT/opt/telemetry-agent/                      a virtual environment with the agent
#   ROOT/etc/systemd/system/telemetry-agent.service
#   ROOT/etc/telemetry-agent/agent.toml            never overwritten: a new example goes
#                                                  beside it as agent.toml.example
#   ROOT/etc/telemetry-agent/dbc/*.dbc             the repository's DBC files, if absent
#   ROOT/etc/sysctl.d/10-telemetry-agent.conf      room for SocketCAN receive buffers
# and, on the real root, applies the sysctl file and runs `systemctl daemon-reload`. Running
# it again upgrades the agent, the unit and the sysctl file and leaves the config alone.
#
# `--root DIR` installs under DIR instead of / (tests, chroots). A virtual environment
# holds absolute paths, so the agent runs from ROOT/opt/telemetry-agent, where it was
# installed: build an image from inside its chroot, not by copying a staged tree.
set -eu

usage() {
    cat <<'EOF'
Usage: deploy/install.sh [OPTIONS]          (as root, unless --root names another folder)

  --root DIR         install under DIR instead of / (systemd is not told)
  --python PATH      the Python (3.11+) that makes the virtual environment (default: python3)
  --source DIR       the project to pip-install (default: this repository)
  --wheel PATH       pip-install this wheel of the project instead
  --wheelhouse DIR   take every package from DIR, not from PyPI (an offline install)
  --no-deps          install the project alone: its dependencies are provided otherwise
  --vehicle-id ID    the vehicle_id of a newly written agent.toml (default: CHANGE-ME)
  -h, --help         this help
EOF
}

die() {
    echo "install.sh: $*" >&2
    exit 1
}

# The service runs as an unprivileged dynamic user, which must be able to read the venv and
# the config: a root umask of 077 would lock it out.
umask 022

REPO=$(cd "$(dirname "$0")/.." && pwd)
ROOT=/
PYTHON=python3
SOURCE=$REPO
WHEEL=
WHEELHOUSE=
NO_DEPS=
VEHICLE_ID=

while [ $# -gt 0 ]; do
    case $1 in
    --root) ROOT=${2:?--root needs a folder}; shift 2 ;;
    --root=*) ROOT=${1#*=}; shift ;;
    --python) PYTHON=${2:?--python needs a path}; shift 2 ;;
    --python=*) PYTHON=${1#*=}; shift ;;
    --source) SOURCE=${2:?--source needs a folder}; shift 2 ;;
    --source=*) SOURCE=${1#*=}; shift ;;
    --wheel) WHEEL=${2:?--wheel needs a file}; shift 2 ;;
    --wheel=*) WHEEL=${1#*=}; shift ;;
    --wheelhouse) WHEELHOUSE=${2:?--wheelhouse needs a folder}; shift 2 ;;
    --wheelhouse=*) WHEELHOUSE=${1#*=}; shift ;;
    --no-deps) NO_DEPS=1; shift ;;
    --vehicle-id) VEHICLE_ID=${2:?--vehicle-id needs an id}; shift 2 ;;
    --vehicle-id=*) VEHICLE_ID=${1#*=}; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
    esac
done

# R is the root without its trailing slash ("" for /), so "$R/etc" never reads "//etc".
case $ROOT in
/*) ;;
*) ROOT=$(pwd)/$ROOT ;;
esac
R=$ROOT
while [ "${R%/}" != "$R" ]; do R=${R%/}; done

if [ -z "$R" ] && [ "$(id -u)" != 0 ]; then
    die "installing into / needs root: sudo make install-service (or --root DIR)"
fi
case $VEHICLE_ID in
*[!A-Za-z0-9._-]*) die "--vehicle-id: letters, digits, '.', '_' and '-' only" ;;
esac
if [ -n "$WHEEL" ] && [ ! -f "$WHEEL" ]; then
    die "--wheel: no such file $WHEEL"
fi

PREFIX=$R/opt/telemetry-agent
CONF=$R/etc/telemetry-agent
UNIT_DIR=$R/etc/systemd/system
DEPLOY=$REPO/deploy

# The virtual environment: made once, then reused, so a second run upgrades in place.
if [ ! -x "$PREFIX/bin/python" ]; then
    mkdir -p "$R/opt"
    "$PYTHON" -m venv "$PREFIX" ||
        die "could not make a virtual environment with $PYTHON (Debian: apt-get install python3-venv)"
fi
"$PREFIX/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "$PREFIX has a Python older than 3.11: remove it, or use --python"

set -- --quiet --disable-pip-version-check --upgrade
if [ -n "$NO_DEPS" ]; then
    set -- "$@" --no-deps
fi
if [ -n "$WHEELHOUSE" ]; then
    set -- "$@" --no-index --find-links "$WHEELHOUSE"
fi
if [ -n "$WHEEL" ]; then
    "$PREFIX/bin/python" -m pip install "$@" "$WHEEL"
else
    # pip builds a source folder in place (build/, *.egg-info): as root in a developer's
    # checkout that would leave root-owned files behind. Build a copy instead.
    BUILD=$(mktemp -d)
    trap 'rm -rf "$BUILD"' EXIT
    (cd "$SOURCE" && tar -cf - --exclude=./.git --exclude=./.venv --exclude=./build \
        --exclude='*.egg-info' --exclude=__pycache__ --exclude=./.mypy_cache \
        --exclude=./.pytest_cache --exclude=./.ruff_cache --exclude=./.hypothesis \
        --exclude=./state .) | (cd "$BUILD" && tar -xf -)
    "$PREFIX/bin/python" -m pip install "$@" "$BUILD"
fi
echo "agent:  $PREFIX ($("$PREFIX/bin/python" -m pip show vehicle-telemetry-agent |
    sed -n 's/^Version: //p'))"

# The unit is ours: a new version replaces it. Local changes go in a drop-in.
mkdir -p "$UNIT_DIR"
install -m 0644 "$DEPLOY/telemetry-agent.service" "$UNIT_DIR/telemetry-agent.service"
echo "unit:   $UNIT_DIR/telemetry-agent.service"

# The config is the operator's: written once, never overwritten.
install -d -m 0755 "$CONF" "$CONF/dbc"
if [ -e "$CONF/agent.toml" ]; then
    install -m 0644 "$DEPLOY/agent.toml" "$CONF/agent.toml.example"
    echo "config: $CONF/agent.toml kept; the current example is agent.toml.example"
    if [ -n "$VEHICLE_ID" ]; then
        echo "install.sh: --vehicle-id ignored: $CONF/agent.toml exists" >&2
    fi
else
    NEW=$CONF/.agent.toml.new
    sed "s/^vehicle_id = \"CHANGE-ME\"/vehicle_id = \"${VEHICLE_ID:-CHANGE-ME}\"/" \
        "$DEPLOY/agent.toml" >"$NEW"
    chmod 0644 "$NEW"
    mv "$NEW" "$CONF/agent.toml"
    echo "config: $CONF/agent.toml (new: edit vehicle_id, the buses and the uplink)"
fi

# DBC files are the operator's too once there: copy only the missing ones.
for dbc in "$REPO"/dbc/*.dbc; do
    [ -f "$dbc" ] || continue
    name=$(basename "$dbc")
    if [ ! -e "$CONF/dbc/$name" ]; then
        install -m 0644 "$dbc" "$CONF/dbc/$name"
    elif ! cmp -s "$dbc" "$CONF/dbc/$name"; then
        echo "dbc:    $CONF/dbc/$name differs from the repository's: kept"
    fi
done
echo "dbc:    $CONF/dbc/"

# The cap on sockets' receive buffers, raised for the agent's SocketCAN sockets: ours, so a
# new version replaces it. systemd-sysctl applies it at every boot; on the real root it is
# applied now too, unless the cap is already as high (a higher one is left alone). Written
# to /proc directly: the sysctl command is procps', which a minimal Debian lacks.
SYSCTL=$R/etc/sysctl.d/10-telemetry-agent.conf
install -d -m 0755 "$R/etc/sysctl.d"
install -m 0644 "$DEPLOY/10-telemetry-agent.conf" "$SYSCTL"
echo "sysctl: $SYSCTL"
if [ -z "$R" ]; then
    wanted=$(sed -n 's/^net\.core\.rmem_max *= *//p' "$SYSCTL")
    current=$(cat /proc/sys/net/core/rmem_max 2>/dev/null || echo 0)
    if [ "$current" -lt "$wanted" ] &&
        ! { echo "$wanted" >/proc/sys/net/core/rmem_max; } 2>/dev/null; then
        echo "install.sh: could not apply $SYSCTL now: it applies at the next boot" >&2
    fi
fi

if [ -n "$R" ] || ! command -v systemctl >/dev/null 2>&1; then
    echo "installed under ${R:-/}; systemd was not told"
    exit 0
fi
# systemctl exists in containers and chroots too, where no systemd runs to reload: the
# install stands, and says so.
if ! systemctl daemon-reload; then
    echo "install.sh: systemctl daemon-reload failed (is systemd running?):" \
        "run it before starting the service" >&2
fi
cat <<EOF

Next:
  1. edit $CONF/agent.toml (vehicle_id, buses, DBC files, uplink), then check it:
       $PREFIX/bin/telemetry-agent check-config $CONF/agent.toml
  2. start it now and at every boot:
       systemctl enable --now telemetry-agent
     or, if it was running, run the new version:
       systemctl restart telemetry-agent
  3. watch it:
       systemctl status telemetry-agent; journalctl -u telemetry-agent -f
       curl -s http://127.0.0.1:9108/metrics | grep ^telemetry_agent_
EOF
