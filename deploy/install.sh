#!/usr/bin/env bash
# Install or upgrade ie-gateway on a Linux VM (Azure Stack Hub or any systemd host).
# Idempotent: run it again to upgrade the package; configuration, keys and data are kept.
#
#   sudo deploy/install.sh --allow-from 10.1.2.3,10.1.2.9    # from a checkout of the repository
#
# The node is installed safe: no caller may associate, no routing rule, no model, and the unit
# (enabled) starts only once `ie-gateway check-config` passes. Options:
#   --allow-from ADDR[,ADDR...]  open the DICOM port in ufw/firewalld to these sources only
#                                (without it no port is opened)
#   --demo                       the demo instead: config/gateway.yaml (dcmtk's default callers,
#                                listening on loopback only), the rule to demo-thorax and the demo
#                                models (synthetic phantoms, never for patients)
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
#   SYS_DIR      where to look for NVIDIA cards on the PCI bus (default: /sys; tests too)
#   ALLOW_FROM, DEMO=1   the same as --allow-from and --demo
set -euo pipefail

ALLOW_FROM=${ALLOW_FROM:-}
DEMO=${DEMO:-0}
while (($#)); do
    case "$1" in
        --allow-from) ALLOW_FROM=${2:?--allow-from needs addresses}; shift 2 ;;
        --allow-from=*) ALLOW_FROM=${1#*=}; shift ;;
        --demo) DEMO=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p;}' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) printf 'ie-gateway install: unknown option %s (see --help)\n' "$1" >&2; exit 2 ;;
    esac
done

SRC_DIR=${SRC_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
PACKAGE=${PACKAGE:-$SRC_DIR}
PIP_ARGS=${PIP_ARGS:-}
PYTHON=${PYTHON:-python3}
DICOM_PORT=${DICOM_PORT:-11112}
DESTDIR=${DESTDIR:-}
PIP_INSTALL=${PIP_INSTALL:-1}
DEV_DIR=${DEV_DIR:-/dev}
SYS_DIR=${SYS_DIR:-/sys}

USER_NAME=ie-gateway
PREFIX=/opt/ie-gateway
ETC=/etc/ie-gateway
STATE=/var/lib/ie-gateway
UNIT=/etc/systemd/system/ie-gateway.service
GPU_DROPIN=/etc/systemd/system/ie-gateway.service.d/gpu.conf
MODULES_LOAD=/etc/modules-load.d/ie-gateway-nvidia.conf
DOC=/usr/share/doc/ie-gateway

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
        # the library versions CI tested this release with: two nodes installed a month apart
        # run the same ones
        local constraints=()
        [[ -f "$SRC_DIR/constraints.txt" ]] && constraints=(-c "$SRC_DIR/constraints.txt")
        # shellcheck disable=SC2086  # PIP_ARGS is a list of arguments on purpose
        "$venv/bin/pip" install --quiet --upgrade "${constraints[@]}" $PIP_ARGS "$PACKAGE"
        say "installed $("$venv/bin/pip" show ie-gateway | sed -n 's/^Version: //p')"
    fi
    install -d -m 0755 "$DESTDIR/usr/local/bin"
    ln -sfn "$PREFIX/venv/bin/ie-gateway" "$DESTDIR/usr/local/bin/ie-gateway"
}

# The demo's gateway.yaml runs from the checkout (relative paths); on the node its data lives
# under /var/lib. It keeps listening on loopback: its callers have no host pins. It trusts the demo
# publisher key (whose private key ships in the repo): a demo node runs only the demo models.
demo_config() {
    sed -E \
        -e "/^storage:/,/^[a-z]/ s|^(  root:).*|\\1 $STATE|" \
        -e "s|^models_dir:.*|models_dir: $STATE/models|" \
        "$1"
}

ensure_config() {
    local dest="$DESTDIR$ETC"
    if [[ ! -e "$dest/gateway.yaml" ]]; then
        if [[ "$DEMO" == 1 ]]; then
            demo_config "$SRC_DIR/config/gateway.yaml" > "$dest/gateway.yaml"
            install -m 0640 "$SRC_DIR/config/routing.yaml" "$dest/routing.yaml"
            say "wrote the DEMO $ETC/gateway.yaml and routing.yaml (loopback only, synthetic models)"
        else
            install -m 0640 "$SRC_DIR/deploy/production/gateway.yaml" "$dest/gateway.yaml"
            say "wrote $ETC/gateway.yaml: no callers, no destinations (edit it, then: ie-gateway check-config)"
        fi
        chmod 0640 "$dest/gateway.yaml"
    fi
    if [[ ! -e "$dest/routing.yaml" ]]; then
        install -m 0640 "$SRC_DIR/deploy/production/routing.yaml" "$dest/routing.yaml"
        say "wrote $ETC/routing.yaml: no rules"
    fi
    if [[ ! -e "$dest/site-names.yaml" ]]; then
        install -m 0640 "$SRC_DIR/config/site-names.yaml" "$dest/site-names.yaml"
        say "wrote $ETC/site-names.yaml (an example ROI names file for a destination's names:)"
    fi
    if [[ ! -e "$dest/environment" ]]; then
        install -m 0600 "$SRC_DIR/deploy/environment.example" "$dest/environment"
        say "wrote $ETC/environment (Azure settings; see docs/install.md)"
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
        chown "root:$USER_NAME" "$dest/gateway.yaml" "$dest/routing.yaml" "$dest/site-names.yaml"
    fi
}

# Model versions are immutable: copy the shipped ones that are not installed yet, never overwrite.
# Only the demo installs them: they are trained on synthetic phantoms.
ensure_models() {
    [[ "$DEMO" == 1 ]] || return 0
    local manifest version_dir name version dest
    while IFS= read -r -d '' manifest; do
        version_dir=$(dirname "$manifest")
        version=$(basename "$version_dir")
        name=$(basename "$(dirname "$version_dir")")
        dest="$DESTDIR$STATE/models/$name/$version"
        if [[ ! -e "$dest" ]]; then
            install -d -m 0750 "$(dirname "$dest")"
            cp -R "$version_dir" "$dest"
            say "installed demo model $name@$version"
        fi
    done < <(find "$SRC_DIR/models" -mindepth 3 -maxdepth 3 -name model.yaml -print0 2>/dev/null)
    if real_root; then
        chown -R "$USER_NAME:$USER_NAME" "$STATE/models"
    fi
}

# The unit's Documentation= points here.
ensure_docs() {
    install -d -m 0755 "$DESTDIR$DOC"
    install -m 0644 "$SRC_DIR/README.md" "$DESTDIR$DOC/README.md" 2>/dev/null || true
    if [[ -d "$SRC_DIR/docs" ]]; then
        cp -R "$SRC_DIR/docs/." "$DESTDIR$DOC/"
    fi
    [[ -f "$SRC_DIR/CHANGELOG.md" ]] && install -m 0644 "$SRC_DIR/CHANGELOG.md" "$DESTDIR$DOC/CHANGELOG.md"
    return 0
}

ensure_unit() {
    install -m 0644 "$SRC_DIR/systemd/ie-gateway.service" "$DESTDIR$UNIT"
    real_root || return 0
    if command -v systemd-analyze >/dev/null 2>&1; then
        systemd-analyze verify "$UNIT"
    fi
    if [[ -d /run/systemd/system ]]; then
        systemctl daemon-reload
        # enabled, not started: it starts (now or at boot) only once check-config passes
        systemctl enable ie-gateway.service
        systemctl try-restart ie-gateway.service
        say "unit enabled, not started; once check-config passes: systemctl start ie-gateway"
    else
        say "systemd is not running here: start the unit on the VM with systemctl start ie-gateway"
    fi
}

# PrivateDevices=yes in the unit hides every device, the GPU included, and `device: auto` would
# then run on the CPU. Where the machine has an NVIDIA card (on the PCI bus, driver or not) or
# its device nodes, a drop-in lets the unit reach the NVIDIA device classes, whatever nodes the
# driver creates later; nvidia-uvm is loaded at boot (the unit may not load kernel modules).
has_nvidia() {
    local node dev
    for node in "$DEV_DIR"/nvidia[0-9]* "$DEV_DIR"/nvidiactl; do
        [[ -e "$node" ]] && return 0
    done
    for dev in "$SYS_DIR"/bus/pci/devices/*; do
        [[ -r "$dev/vendor" && -r "$dev/class" ]] || continue
        [[ "$(cat "$dev/vendor")" == 0x10de && "$(cat "$dev/class")" == 0x03* ]] && return 0
    done
    return 1
}

ensure_gpu_access() {
    local dropin="$DESTDIR$GPU_DROPIN" modules="$DESTDIR$MODULES_LOAD"
    if ! has_nvidia; then
        if [[ -e "$dropin" ]]; then
            rm -f "$dropin" "$modules"
            say "no NVIDIA GPU any more: removed $GPU_DROPIN"
        fi
        return 0
    fi
    install -d -m 0755 "$(dirname "$dropin")" "$(dirname "$modules")"
    cat > "$dropin" <<'DROPIN'
# Written by deploy/install.sh: this machine has an NVIDIA GPU.
# Replaces PrivateDevices=yes so CUDA can reach it: the NVIDIA device classes (by major number,
# so nodes the driver creates later count too), and no other device.
[Service]
PrivateDevices=no
DevicePolicy=closed
DeviceAllow=char-nvidia-frontend rw
DeviceAllow=char-nvidia-uvm rw
DeviceAllow=char-nvidia-caps rw
DROPIN
    chmod 0644 "$dropin"
    printf '# Written by deploy/install.sh: CUDA needs nvidia-uvm, which the unit may not load itself.\nnvidia-uvm\n' \
        > "$modules"
    chmod 0644 "$modules"
    say "NVIDIA GPU found: wrote $GPU_DROPIN (device classes) and $MODULES_LOAD (nvidia-uvm at boot)"
}

# The DICOM port is opened only to the sources given (--allow-from), never to everyone.
ensure_firewall() {
    real_root || return 0
    local sources=() source
    IFS=', ' read -r -a sources <<< "$ALLOW_FROM"
    if ((${#sources[@]} == 0)); then
        say "no --allow-from: the DICOM port $DICOM_PORT/tcp is not opened in the host firewall"
    elif command -v ufw >/dev/null 2>&1 && ufw status 2>/dev/null | grep -q "Status: active"; then
        for source in "${sources[@]}"; do
            ufw allow proto tcp from "$source" to any port "$DICOM_PORT" >/dev/null
        done
        say "ufw: allowed $DICOM_PORT/tcp from ${sources[*]}"
    elif command -v firewall-cmd >/dev/null 2>&1 && firewall-cmd --state >/dev/null 2>&1; then
        local family
        for source in "${sources[@]}"; do
            family=ipv4 && [[ "$source" == *:* ]] && family=ipv6
            firewall-cmd --quiet --permanent --add-rich-rule="rule family=\"$family\" source address=\"$source\" \
port port=\"$DICOM_PORT\" protocol=\"tcp\" accept"
        done
        firewall-cmd --quiet --reload
        say "firewalld: allowed $DICOM_PORT/tcp from ${sources[*]}"
    else
        say "no host firewall found: allow $DICOM_PORT/tcp from ${sources[*]} only"
    fi
    say "also allow $DICOM_PORT/tcp in the VM's network security group, from the PACS/TPS addresses only"
}

ensure_user
ensure_dirs
ensure_venv
ensure_config
ensure_models
ensure_docs
ensure_gpu_access
ensure_unit
ensure_firewall
say "done"
