#!/usr/bin/env bash
# Run a command in a privileged debian:12 container with the checkout at /src, and
# /dev/kvm passed in when the runner has it (TCG otherwise). The lab needs root for
# loop devices and device-mapper, hence --privileged; the image cache lives in the
# workspace (.cache/xen-blklab) so actions/cache can keep it between runs.
set -euo pipefail
kvm=()
if [ -e /dev/kvm ]; then kvm=(--device /dev/kvm); fi
exec docker run --rm --privileged "${kvm[@]}" \
  -v "$PWD:/src" -w /src \
  -e CI=true -e LAB_CACHE=/src/.cache/xen-blklab -e PRESET -e EXPECT -e DRIVER \
  debian:12 bash -euo pipefail -c '
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends make python3 python3-venv git ca-certificates
    git config --global --add safe.directory /src
    '"$1"
