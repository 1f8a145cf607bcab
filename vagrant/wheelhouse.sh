#!/usr/bin/env bash
# Build, or find in the cache, a wheelhouse for the lb VM: every wheel that
# deploy/install.sh --system needs there to make lb's virtualenv (pip,
# lb's build requirement setuptools, and its runtime dependencies), so the
# VM installs lb without reaching PyPI. Downloaded here, on the host, for
# the guest's Python (Debian 12: CPython 3.11, x86-64, glibc 2.36).
#
#   vagrant/wheelhouse.sh          prints the wheelhouse's directory
#   LB_VAGRANT_WHEELHOUSE="$(vagrant/wheelhouse.sh)" vagrant up
#
# The Vagrantfile syncs the directory to the lb VM and provision/lb.sh tells
# pip to use only it. Runtime dependencies are pinned to the versions this
# checkout's .venv has (deploy/install.sh makes it), so the VM runs what the
# tests ran. Cached in $LB_VAGRANT_CACHE/wheelhouse (/var/cache/lb-vagrant)
# under a hash of the requirements; other wheelhouses are pruned.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
cache=${LB_VAGRANT_CACHE:-/var/cache/lb-vagrant}/wheelhouse
python=${PYTHON:-$repo/.venv/bin/python}
guest_python=3.11  # Debian 12's
guest_glibc=36  # 2.36: wheels tagged manylinux_2_17 .. manylinux_2_36 (pip takes the list as given)

log() { echo "wheelhouse: $*" >&2; }
[ -x "$python" ] || { echo "wheelhouse.sh: no $python (run deploy/install.sh first)" >&2; exit 1; }

requirements=$("$python" - "$repo/pyproject.toml" <<'EOF'
import re, sys, tomllib
from importlib.metadata import PackageNotFoundError, version
pyproject = tomllib.load(open(sys.argv[1], "rb"))
print("pip")
for spec in pyproject["build-system"]["requires"]:
    print(spec)
for spec in pyproject["project"]["dependencies"]:
    name = re.match(r"[A-Za-z0-9_.-]+", spec).group(0)
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        print(spec)
EOF
)

key=$( { cat "$0"; echo "$requirements"; } | sha256sum | cut -c1-12)
out="$cache/$key"
if [ -f "$out/complete" ]; then
  log "cached: $out"
  echo "$out"
  exit 0
fi
work="$cache/$key.partial"
rm -rf "$work"
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT
platforms=(--platform manylinux2014_x86_64)
for minor in $(seq 17 "$guest_glibc"); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
log "downloading for CPython $guest_python (glibc 2.$guest_glibc): ${requirements//$'\n'/ }"
echo "$requirements" >"$work/requirements.txt"
"$python" -m pip download -q --disable-pip-version-check --dest "$work" --only-binary=:all: \
  --python-version "$guest_python" --implementation cp "${platforms[@]}" \
  -r "$work/requirements.txt" >&2
touch "$work/complete"
trap - EXIT
mv "$work" "$out"
for old in "$cache"/*; do
  [ "$old" = "$out" ] || [ ! -f "$old/complete" ] || rm -rf "$old"
done
log "$(find "$out" -name '*.whl' | wc -l) wheels in $out"
echo "$out"
