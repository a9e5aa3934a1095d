#!/usr/bin/env bash
# Install or upgrade ie-gateway on a Linux VM (Azure Stack Hub or any systemd host).
# Idempotent: run it again to upgrade the package; configuration, keys and data are kept.
#
#   sudo deploy/install.sh                 # from a checkout of the repository
#
# Variables (all optional):
#   SRC_DIR      the repository (default: the folder above this script)
#   PACKAGE      what pip installs (default: SRC_DIR; a wheel path works too)
#   PIP_ARGS     extra pip arguments, e.g. an index or --find-links for offline wheels
#   PYTHON       interpreter for the venv (default: python3, must be >= 3.11)
#   DICOM_PORT   the port opened in the host firewall (default: 11112, as in gateway.yaml)
#   DESTDIR      lay the files out under this root instead of / (packaging, tests): no user,
#                no chown, no systemctl, no firewall
#   PIP_INSTALL  0 = create the venv without pip and install nothing (tests)
#   DEV_DIR      where to look for NVIDIA device nodes (default: /dev; tests point it elsewhere)
set -euo pipefail

SRC_DIR=${SRC_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
PACKAGE=${PACKAGE:-$SRC_DIR}
PIP_ARGS=${PIP_ARGS:-}
PYTHON=${PYTHON:-python3}
DICOM_PORT=${DICOM_PORT:-11112}
DESTDIR=${DESTDIR:-}
PIP_INSTALL=${PIP_INSTALL:-1}
DEV_DIR=${DEV_DIR:-/dev}

USER_NAME=ie-gateway
PREFIX=/opt/ie-gateway
ETC=/etc/ie-gateway
STATE=/var/lib/ie-gateway
UNIT=/etc/systemd/system/ie-gateway.service
GPU_DROPIN=/etc/systemd/system/ie-gateway.service.d/gpu.conf

say() { printf 'ie-gateway install: %s\n' "$*"; }
real_root() { [[ -z "$DESTDIR" ]]; }

ensure_user() {
    real_root || return 0
    if ! id -u "$USER_NAME" >/dev/null 2>&1; then
        useradd --system --home-dir "$STATE" --no-create-home --shell /usr/sbin/nologin "$USER_NAME"
        say "created system user $USER_NAME"
    fi
}

ensure_dirs() {
    install -d -m 0755 "$DESTDIR$PREFIX"
    install -d -m 0755 "$DESTDIR$ETC"
    install -d -m 0700 "$DESTDIR$ETC/credentials"
    install -d -m 0750 "$DESTDIR$STATE" "$DESTDIR$STATE/models"
    install -d -m 0755 "$DESTDIR$(dirname "$UNIT")"
    if real_root; then
        chown -R "$USER_NAME:$USER_NAME" "$STATE"
        chown "root:$USER_NAME" "$ETC"
        chmod 0750 "$ETC"
    fi
}

ensure_venv() {
    local venv="$DESTDIR$PREFIX/venv"
    if [[ ! -x "$venv/bin/python" ]]; then
        if [[ "$PIP_INSTALL" == 0 ]]; then
            "$PYTHON" -m venv --without-pip "$venv"
        else
            "$PYTHON" -m venv "$venv"
        fi
        say "created $PREFIX/venv"
    fi
    if [[ "$PIP_INSTALL" != 0 ]]; then
        # shellcheck disable=SC2086  # PIP_ARGS is a list of arguments on purpose
        "$venv/bin/pip" install --quiet --upgrade $PIP_ARGS "$PACKAGE"
        say "installed $("$venv/bin/pip" show ie-gateway | sed -n 's/^Version: //p')"
    fi
    install -d -m 0755 "$DESTDIR/usr/local/bin"
    ln -sfn "$PREFIX/venv/bin/ie-gateway" "$DESTDIR/usr/local/bin/ie-gateway"
}

# gateway.yaml as shipped runs from the checkout (relative paths, loopback); on the node it
# listens on the network and keeps its data under /var/lib. Only the DICOM listener's bind
# changes: the HTTP endpoint (health, metrics) stays on loopback. The demo publisher key (its
# private key is public) is not trusted on a node: the admin adds the real publishers' keys.
node_config() {
    sed -E \
        -e "/^  - name: demo /,/^    allow_code:/d" \
        -e "/^storage:/,/^[a-z]/ s|^(  root:).*|\\1 $STATE|" \
        -e "s|^models_dir:.*|models_dir: $STATE/models|" \
        -e "/^node:/,/^[a-z]/ s|^(  bind:).*|\\1 0.0.0.0|" \
        "$1"
}

ensure_config() {
    local dest="$DESTDIR$ETC"
    if [[ ! -e "$dest/gateway.yaml" ]]; then
        node_config "$SRC_DIR/config/gateway.yaml" > "$dest/gateway.yaml"
        chmod 0640 "$dest/gateway.yaml"
        say "wrote $ETC/gateway.yaml (edit it, then: ie-gateway check-config --config $ETC/gateway.yaml)"
    fi
    if [[ ! -e "$dest/routing.yaml" ]]; then
        install -m 0640 "$SRC_DIR/config/routing.yaml" "$dest/routing.yaml"
        say "wrote $ETC/routing.yaml"
    fi
    if [[ ! -e "$dest/environment" ]]; then
        install -m 0600 "$SRC_DIR/deploy/environment.example" "$dest/environment"
        say "wrote $ETC/environment (Azure settings; see deploy/README.md)"
    fi
    if [[ ! -e "$dest/credentials/anon-key" ]]; then
        (umask 077 && head -c 32 /dev/urandom | base64 > "$dest/credentials/anon-key")
        say "generated the anonymisation key $ETC/credentials/anon-key: back it up, it never leaves the node"
    fi
    if [[ ! -e "$dest/credentials/storage-connection-string" ]]; then
        # the unit loads it as a credential, so it must exist; empty = use the VM's managed identity
        (umask 077 && : > "$dest/credentials/storage-connection-string")
        say "created an empty $ETC/credentials/storage-connection-string (fill it for SAS/key access)"
    fi
    if real_root; then
        chown "root:$USER_NAME" "$dest/gateway.yaml" "$dest/routing.yaml"
    fi
}

# Model versions are immutable: copy the shipped ones that are not installed yet, never overwrite.
ensure_models() {
    local manifest version_dir name version dest
    while IFS= read -r -d '' manifest; do
        version_dir=$(dirname "$manifest")
        version=$(basename "$version_dir")
        name=$(basename "$(dirname "$version_dir")")
        dest="$DESTDIR$STATE/models/$name/$version"
        if [[ ! -e "$dest" ]]; then
            install -d -m 0750 "$(dirname "$dest")"
            cp -R "$version_dir" "$dest"
            say "installed model $name@$version"
        fi
    done < <(find "$SRC_DIR/models" -mindepth 3 -maxdepth 3 -name model.yaml -print0 2>/dev/null)
    if real_root; then
        chown -R "$USER_NAME:$USER_NAME" "$STATE/models"
    fi
}

ensure_unit() {
    install -m 0644 "$SRC_DIR/systemd/ie-gateway.service" "$DESTDIR$UNIT"
    real_root || return 0
    if command -v systemd-analyze >/dev/null 2>&1; then
        systemd-analyze verify "$UNIT"
    fi
    if [[ -d /run/systemd/system ]]; then
        systemctl daemon-reload
        systemctl enable ie-gateway.service
        systemctl try-restart ie-gateway.service
        say "unit enabled; start it with: systemctl start ie-gateway"
    else
        say "systemd is not running here: start the unit on the VM with systemctl start ie-gateway"
    fi
}

# PrivateDevices=yes in the unit hides every device, the GPU included, and `device: auto` would
# then run on the CPU. Where NVIDIA device nodes exist, a drop-in lets the unit reach exactly those.
ensure_gpu_access() {
    local dropin="$DESTDIR$GPU_DROPIN" nodes=() node
    for node in "$DEV_DIR"/nvidia[0-9]* "$DEV_DIR"/nvidiactl "$DEV_DIR"/nvidia-uvm "$DEV_DIR"/nvidia-uvm-tools \
                "$DEV_DIR"/nvidia-modeset; do
        [[ -e "$node" ]] && nodes+=("/dev/${node#"$DEV_DIR"/}")
    done
    if ((${#nodes[@]} == 0)); then
        if [[ -e "$dropin" ]]; then
            rm -f "$dropin"
            say "no NVIDIA devices any more: removed $GPU_DROPIN"
        fi
        return 0
    fi
    install -d -m 0755 "$(dirname "$dropin")"
    {
        echo "# Written by deploy/install.sh: NVIDIA devices found (${nodes[*]})."
        echo "# Replaces PrivateDevices=yes so CUDA can reach them; no other device is allowed."
        echo "# nvidia-uvm must be loaded at boot (the unit may not load kernel modules)."
        echo "[Service]"
        echo "PrivateDevices=no"
        echo "DevicePolicy=closed"
        for node in "${nodes[@]}"; do
            echo "DeviceAllow=$node rw"
        done
    } > "$dropin"
    chmod 0644 "$dropin"
    say "NVIDIA devices found: wrote $GPU_DROPIN (${#nodes[@]} device nodes)"
}

ensure_firewall() {
    real_root || return 0
    if command -v ufw >/dev/null 2>&1 && ufw status 2>/dev/null | grep -q "Status: active"; then
        ufw allow "$DICOM_PORT/tcp" >/dev/null
        say "ufw: allowed $DICOM_PORT/tcp"
    elif command -v firewall-cmd >/dev/null 2>&1 && firewall-cmd --state >/dev/null 2>&1; then
        firewall-cmd --quiet --permanent --add-port="$DICOM_PORT/tcp"
        firewall-cmd --quiet --reload
        say "firewalld: allowed $DICOM_PORT/tcp"
    else
        say "no host firewall found: allow $DICOM_PORT/tcp from the PACS and TPS only"
    fi
    say "also allow $DICOM_PORT/tcp in the VM's network security group, from the PACS/TPS addresses only"
}

ensure_user
ensure_dirs
ensure_venv
ensure_config
ensure_models
ensure_gpu_access
ensure_unit
ensure_firewall
say "done"
