#!/usr/bin/env bash
# Install everything buildatfs needs on a Debian 12 machine, as root: the FUSE, xattr and
# build packages from Debian, then buildatfs itself (editable) with its test extra.
#
# Safe to run again: each step is skipped when its result is already there. Prints nothing
# unless a step fails, then shows that step's output.
set -euo pipefail

repo_root=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)
cd "$repo_root"

log=$(mktemp)
trap 'rm -f "$log"' EXIT

# Run a command with its output kept aside; on failure print that output and stop.
run() {
    if ! "$@" >"$log" 2>&1; then
        cat "$log" >&2
        echo "setup.sh: this step failed: $*" >&2
        exit 1
    fi
}

if [[ $(id -u) -ne 0 ]]; then
    echo "setup.sh: run this as root (it installs Debian packages)." >&2
    exit 1
fi

# fuse3: fusermount3 and the kernel interface; libfuse3-dev, pkg-config and gcc: building
# pyfuse3 when no binary wheel fits; attr and acl: getfattr/setfattr and getfacl/setfacl
# for tests; debootstrap and tar: building base images for the Docker tests; docker.io:
# the real dockerd of the end-to-end test, and fuse-overlayfs as its other storage driver;
# systemd: systemd-analyze for the unit tests; fio and stress-ng: the load tests.
debian_packages=(fuse3 libfuse3-dev pkg-config gcc attr acl debootstrap tar docker.io
    fuse-overlayfs systemd fio stress-ng)
missing=()
for package in "${debian_packages[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)
    [[ $status == "install ok installed" ]] || missing+=("$package")
done
if ((${#missing[@]} > 0)); then
    export DEBIAN_FRONTEND=noninteractive
    run apt-get update -q
    run apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Reinstall only when the installed buildatfs is not an editable install of this very
# checkout, or when a requirement from pyproject.toml is missing or too old.
install_is_current() {
    python3 -I - "$repo_root" <<'EOF'
import json
import re
import sys
import sysconfig
import tomllib
from importlib import metadata
from pathlib import Path

repo_root = Path(sys.argv[1])
try:
    dist = metadata.distribution("buildatfs")
except metadata.PackageNotFoundError:
    sys.exit(1)
direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
if direct_url.get("url") != repo_root.as_uri():
    sys.exit(1)
if not direct_url.get("dir_info", {}).get("editable"):
    sys.exit(1)

project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
if dist.version != project["version"]:
    sys.exit(1)
scripts_dir = Path(sysconfig.get_path("scripts"))
if any(not (scripts_dir / script).exists() for script in project.get("scripts", {})):
    sys.exit(1)
requirements = project["dependencies"] + project["optional-dependencies"]["test"]
for requirement in requirements:
    # Only "name" and "name>=X.Y" are used in pyproject.toml; anything else reinstalls.
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:>=([0-9.]+))?", requirement)
    if match is None:
        sys.exit(1)
    name, minimum = match.groups()
    try:
        installed = metadata.version(name)
    except metadata.PackageNotFoundError:
        sys.exit(1)
    if minimum is not None:
        def release(version):
            return tuple(int(part) for part in re.findall(r"\d+", version)[:3])
        if release(installed) < release(minimum):
            sys.exit(1)
EOF
}

if ! install_is_current; then
    run python3 -m pip install --disable-pip-version-check --root-user-action=ignore \
        --no-input -q -e ".[test]"
fi

if ! command -v buildatfs >/dev/null; then
    echo "setup.sh: buildatfs was installed but its command is not on PATH ($PATH)." >&2
    exit 1
fi

# mount(8) runs /sbin/mount.fuse.buildatfs for `mount -t fuse.buildatfs` and fstab lines,
# and the systemd units in systemd/ start /usr/local/bin/buildatfs.
scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
ln -sfn "$scripts/mount.fuse.buildatfs" /sbin/mount.fuse.buildatfs
if [[ ! -e /usr/local/bin/buildatfs ]]; then
    ln -s "$scripts/buildatfs" /usr/local/bin/buildatfs
fi
