#!/usr/bin/env bash
# Build (or reuse) the nhigate image and a pause (pod sandbox) image as OCI image archives,
# without a Docker daemon, for a local containerd (`ctr -n k8s.io images import FILE`).
#
# usage: hack/build-image.sh [--force] [--keep-rootfs] [--print]
#   --print        only print the four lines below (what a build would produce); build nothing
#
# Both images follow their Dockerfile (images/Dockerfile, images/pause/Dockerfile): the config
# (ENV, USER, WORKDIR, ENTRYPOINT, CMD, LABEL) is read from the final stage by hack/oci_image.py;
# the filesystem is built here the same way the Dockerfile builds it:
#   base      Debian bookworm minbase + python3 from debootstrap (cached separately; ~2 min)
#   nhigate   nhigate's wheel + binary wheels pinned by images/constraints.txt, installed offline
#             with pip run from its own wheel (pip itself never lands in the image); user nonroot
#             (65532:65532) with a passwd/group entry
#   pause     images/pause/pause.c compiled with gcc -static
# Then each rootfs is packed as a single-layer OCI archive.
#
# Tags come from a content hash of everything that goes into an image, so a changed source tree
# gets a new tag (and IfNotPresent pulls never pick a stale image). Archives are cached under
# ${NHIGATE_CACHE:-$HOME/.cache/nhigate}/images/; a warm call only hashes and prints.
#
# stdout carries exactly these four lines (progress goes to stderr), so callers can `eval` it:
#   NHIGATE_IMAGE_REF=nhigate.local/nhigate:<version>-<hash12>
#   NHIGATE_IMAGE_ARCHIVE=<cache>/images/nhigate-<version>-<hash12>.oci.tar
#   NHIGATE_PAUSE_REF=nhigate.local/pause:<hash12>
#   NHIGATE_PAUSE_ARCHIVE=<cache>/images/pause-<hash12>.oci.tar
# Needs root (debootstrap, chroot); installs debootstrap/gcc/libc6-dev with apt-get if missing.
set -euo pipefail

HACK="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "${HACK}/.." && pwd)"
NHIGATE_CACHE="${NHIGATE_CACHE:-${HOME}/.cache/nhigate}"
IMAGES="${NHIGATE_CACHE}/images"
OCI=(python3 "${HACK}/oci_image.py")
REGISTRY="nhigate.local"

FORCE=0
KEEP_ROOTFS=0
PRINT_ONLY=0
for arg in "$@"; do
  case "${arg}" in
    --force) FORCE=1 ;;
    --keep-rootfs) KEEP_ROOTFS=1 ;;
    --print) PRINT_ONLY=1 ;;
    *)
      echo "usage: $0 [--force] [--keep-rootfs] [--print]" >&2
      exit 2
      ;;
  esac
done

log() {
  printf '[%s] build-image: %s\n' "$(date +%H:%M:%S)" "$*" >&2
}

# The base rootfs recipe. Its cache key is this text: change a package or a step below and bump
# BASE_REVISION, and the base is rebuilt.
BASE_SUITE="bookworm"
BASE_PACKAGES="python3,ca-certificates,passwd"
BASE_REVISION="1"
# pip used to install the wheels into the rootfs (the version hack/lib/common.sh pins).
PIP_VERSION="25.3"
NONROOT_NAME="nonroot"

VERSION="$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "${ROOT}/pyproject.toml")"
SELF=(hack/build-image.sh hack/oci_image.py)
NHIGATE_HASH="$("${OCI[@]}" hash --root "${ROOT}" pyproject.toml README.md src images "${SELF[@]}" | cut -c1-12)"
PAUSE_HASH="$("${OCI[@]}" hash --root "${ROOT}" images/pause "${SELF[@]}" | cut -c1-12)"
BASE_KEY="$(printf '%s\n' "${BASE_SUITE}" "${BASE_PACKAGES}" "${BASE_REVISION}" "$(uname -m)" | sha256sum | cut -c1-12)"

NHIGATE_REF="${REGISTRY}/nhigate:${VERSION}-${NHIGATE_HASH}"
NHIGATE_ARCHIVE="${IMAGES}/nhigate-${VERSION}-${NHIGATE_HASH}.oci.tar"
PAUSE_REF="${REGISTRY}/pause:${PAUSE_HASH}"
PAUSE_ARCHIVE="${IMAGES}/pause-${PAUSE_HASH}.oci.tar"
BASE_DIR="${IMAGES}/base-${BASE_SUITE}-${BASE_KEY}"

print_result() {
  printf 'NHIGATE_IMAGE_REF=%s\n' "${NHIGATE_REF}"
  printf 'NHIGATE_IMAGE_ARCHIVE=%s\n' "${NHIGATE_ARCHIVE}"
  printf 'NHIGATE_PAUSE_REF=%s\n' "${PAUSE_REF}"
  printf 'NHIGATE_PAUSE_ARCHIVE=%s\n' "${PAUSE_ARCHIVE}"
}

if [[ ${PRINT_ONLY} -eq 1 ]]; then
  print_result
  exit 0
fi
if [[ ${FORCE} -eq 0 && -f "${NHIGATE_ARCHIVE}" && -f "${PAUSE_ARCHIVE}" ]]; then
  log "cached: ${NHIGATE_REF}, ${PAUSE_REF}"
  print_result
  exit 0
fi

if [[ "$(id -u)" -ne 0 ]]; then
  log "needs root (debootstrap and chroot build the image's filesystem)"
  exit 1
fi

mkdir -p "${IMAGES}"
exec 8>"${IMAGES}/build.lock"
log "waiting for build lock ${IMAGES}/build.lock"
flock 8
if [[ ${FORCE} -eq 0 && -f "${NHIGATE_ARCHIVE}" && -f "${PAUSE_ARCHIVE}" ]]; then
  log "another build finished meanwhile: ${NHIGATE_REF}, ${PAUSE_REF}"
  print_result
  exit 0
fi
# Unmount whatever is mounted below the image cache, deepest first (debootstrap mounts /proc
# and /sys, sometimes binds /dev, in its target, and only unmounts them when it finishes).
unmount_cache() {
  local mnt
  while read -r mnt; do
    if [[ -n "${mnt}" ]]; then umount -l "${mnt}" 2>/dev/null || true; fi
  done < <(findmnt -rn -o TARGET | grep -F "${IMAGES}/" | sort -r)
}

# rm -rf that never crosses into another file system (a mount left behind is skipped, not emptied).
remove_tree() {
  rm -rf --one-file-system "$@"
}

# Holding the lock, no other build is running: what a killed build left behind can go.
unmount_cache
remove_tree "${IMAGES}"/.work.* "${IMAGES}"/*.partial

START=${SECONDS}
WORK="$(mktemp -d "${IMAGES}/.work.XXXXXX")"

# Leave nothing mounted and no half-built folder behind, whatever happens.
cleanup() {
  local rc=$?
  unmount_cache
  if [[ ${KEEP_ROOTFS} -eq 1 && ${rc} -eq 0 ]]; then
    log "kept work folder ${WORK} (removed by the next build)"
  else
    remove_tree "${WORK}"
  fi
  remove_tree "${BASE_DIR}.partial"
  exit "${rc}"
}
trap cleanup EXIT

ensure_build_packages() {
  local missing=()
  command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
  command -v gcc >/dev/null 2>&1 || missing+=(gcc)
  dpkg-query -W -f='${Status}' libc6-dev 2>/dev/null | grep -q 'ok installed' || missing+=(libc6-dev)
  command -v unshare >/dev/null 2>&1 || missing+=(util-linux)
  if [[ ${#missing[@]} -gt 0 ]]; then
    log "installing Debian packages: ${missing[*]}"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
  fi
}

# run_logged LOGFILE CMD...: run CMD with its output in LOGFILE, print a heartbeat every 20 s,
# and show the log tail if it fails.
run_logged() {
  local logfile=$1
  shift
  "$@" >"${logfile}" 2>&1 &
  local pid=$! rc=0 beat=${SECONDS}
  while kill -0 "${pid}" 2>/dev/null; do
    sleep 1
    if ((SECONDS - beat >= 20)) && kill -0 "${pid}" 2>/dev/null; then
      beat=${SECONDS}
      log "  ... $((SECONDS - START)) s, last: $(tail -n1 "${logfile}" | cut -c1-100)"
    fi
  done
  wait "${pid}" || rc=$?
  if [[ ${rc} -ne 0 ]]; then
    log "FAILED (exit ${rc}): $*"
    tail -n 40 "${logfile}" >&2
    return "${rc}"
  fi
}

# in_rootfs ROOTFS USERSPEC CMD...: run CMD in ROOTFS as USERSPEC with the image's environment,
# a read-only root and a fresh tmpfs on /tmp, as a pod with readOnlyRootFilesystem and an
# emptyDir on /tmp runs it. The mounts live in a private mount namespace and vanish with it.
in_rootfs() {
  local rootfs=$1 userspec=$2
  shift 2
  local env=()
  mapfile -t env < <(python3 -c 'import json, sys; print("\n".join(json.load(sys.stdin)["Env"]))' \
    < <("${OCI[@]}" config --dockerfile "${ROOT}/images/Dockerfile"))
  # shellcheck disable=SC2016 # expanded by the inner shell
  unshare --mount --propagation private -- /bin/sh -ec '
    root=$1; user=$2; shift 2
    mount --bind "$root" "$root"
    mount -o remount,bind,ro "$root"
    mount -t tmpfs -o mode=1777,size=64m tmpfs "$root/tmp"
    mount -t proc proc "$root/proc"
    exec chroot --userspec="$user" "$root" "$@"
  ' sh "${rootfs}" "${userspec}" /usr/bin/env -i "${env[@]}" "$@"
}

# The Debian mirror apt already uses on this machine (NHIGATE_DEBIAN_MIRROR overrides it).
debian_mirror() {
  if [[ -n "${NHIGATE_DEBIAN_MIRROR:-}" ]]; then
    echo "${NHIGATE_DEBIAN_MIRROR}"
    return
  fi
  "${OCI[@]}" apt-mirror --suite "${BASE_SUITE}"
}

build_base() {
  if [[ -f "${BASE_DIR}/.complete" ]]; then
    log "[base] cached: ${BASE_DIR}"
    return
  fi
  local mirror stage="${BASE_DIR}.partial"
  mirror="$(debian_mirror)"
  remove_tree "${stage}"
  mkdir -p "${stage}"
  log "[base] debootstrap ${BASE_SUITE} minbase + ${BASE_PACKAGES} from ${mirror} (~2 min)"
  run_logged "${WORK}/debootstrap.log" debootstrap --variant=minbase \
    --include="${BASE_PACKAGES}" "${BASE_SUITE}" "${stage}/rootfs" "${mirror}"
  local r="${stage}/rootfs"
  # What an image never needs: package caches and lists, docs, man pages, translations, logs.
  unmount_cache
  remove_tree "${r}"/var/cache/apt/* "${r}"/var/lib/apt/lists/* "${r}"/var/cache/debconf/*-old \
    "${r}"/usr/share/doc/* "${r}"/usr/share/man/* "${r}"/usr/share/info/* \
    "${r}"/usr/share/locale/* "${r}"/var/log/* "${r}"/tmp/* "${r}"/root/.cache
  # The container runtime provides /dev, /proc, /sys and /run; the image carries empty folders.
  find "${r}/dev" "${r}/proc" "${r}/sys" "${r}/run" -xdev -mindepth 1 -delete 2>/dev/null || true
  touch "${stage}/.complete"
  mv "${stage}" "${BASE_DIR}"
  log "[base] done after $((SECONDS - START)) s: $(du -sh "${BASE_DIR}/rootfs" | cut -f1)"
}

# A virtualenv of its own with the pinned pip, for the build side only (the project's .venv is
# left alone: other runs may be using it).
ensure_pip() {
  PIP_VENV="${IMAGES}/pip-venv-${PIP_VERSION}"
  PY="${PIP_VENV}/bin/python"
  if [[ ! -f "${PIP_VENV}/.complete" ]]; then
    log "[nhigate] virtualenv with pip ${PIP_VERSION} for the build: ${PIP_VENV}"
    remove_tree "${PIP_VENV}"
    python3 -m venv "${PIP_VENV}"
    "${PY}" -m pip install -q --disable-pip-version-check "pip==${PIP_VERSION}" >&2
    touch "${PIP_VENV}/.complete"
  fi
}

build_wheels() {
  local wheels="${WORK}/wheels" src="${WORK}/src" pyver
  mkdir -p "${wheels}" "${WORK}/pip" "${src}"
  ensure_pip
  # Wheels for the image's Python, whatever Python this machine runs.
  pyver="$(chroot "${BASE_DIR}/rootfs" /usr/bin/python3 -c \
    'import sys; print("%d.%d" % sys.version_info[:2])')"
  # Build from a copy of what the Dockerfile copies, so no build/ or egg-info lands in the tree.
  cp -a "${ROOT}/pyproject.toml" "${ROOT}/README.md" "${src}/"
  cp -a "${ROOT}/src" "${src}/src"
  find "${src}" \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
  log "[nhigate] building nhigate's wheel and fetching pinned binary wheels (pip)"
  run_logged "${WORK}/pip-wheel.log" "${PY}" -m pip wheel --disable-pip-version-check \
    --no-deps --wheel-dir "${wheels}" "${src}"
  run_logged "${WORK}/pip-download.log" "${PY}" -m pip download --disable-pip-version-check \
    --only-binary=:all: --python-version "${pyver}" --dest "${wheels}" \
    -r "${ROOT}/images/constraints.txt"
  run_logged "${WORK}/pip-download-pip.log" "${PY}" -m pip download \
    --disable-pip-version-check --only-binary=:all: --no-deps --dest "${WORK}/pip" \
    "pip==${PIP_VERSION}"
}

build_nhigate() {
  local r="${WORK}/nhigate-rootfs"
  log "[nhigate] rootfs from the base"
  cp -a "${BASE_DIR}/rootfs" "${r}"
  mkdir -p "${r}/tmp/build"
  cp -a "${WORK}/wheels" "${r}/tmp/build/wheels"
  cp "${WORK}/pip/pip-${PIP_VERSION}-py3-none-any.whl" "${r}/tmp/build/pip.whl"
  cp "${ROOT}/images/constraints.txt" "${r}/tmp/build/constraints.txt"
  log "[nhigate] installing nhigate==${VERSION} offline, exactly the pinned versions"
  # pip runs from its wheel, so pip is never installed. The base's python3 is Debian's, which
  # marks itself externally managed; this rootfs has no other package manager use for it.
  run_logged "${WORK}/pip-install.log" env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root \
    LANG=C.UTF-8 "$(command -v chroot)" "${r}" /usr/bin/python3 /tmp/build/pip.whl/pip install \
    --no-cache-dir --no-index --disable-pip-version-check --root-user-action=ignore \
    --break-system-packages --find-links=/tmp/build/wheels -c /tmp/build/constraints.txt \
    "nhigate==${VERSION}"
  remove_tree "${r}/tmp/build" "${r}/root/.cache"
  # python:*-slim has `python` on PATH and the chart's `helm test` Pod runs it.
  ln -sfn /usr/bin/python3 "${r}/usr/local/bin/python"
  "${OCI[@]}" add-user --rootfs "${r}" --name "${NONROOT_NAME}" --uid 65532 --gid 65532 \
    --home /tmp --shell /usr/sbin/nologin
  chmod 1777 "${r}/tmp"

  log "[nhigate] smoke test as 65532:65532, read-only root, tmpfs /tmp"
  local user
  in_rootfs "${r}" 65532:65532 nhigate --help >/dev/null
  in_rootfs "${r}" 65532:65532 nhigate controller --help >/dev/null
  in_rootfs "${r}" 65532:65532 nhigate proxy --help >/dev/null
  # Every compiled dependency loads in the image's Python (not only those --help touches).
  in_rootfs "${r}" 65532:65532 python3 -c 'import aiohttp, cryptography.hazmat.bindings._rust
import frozenlist, httptools, multidict, orjson, propcache, pydantic_core, uvloop, yaml, yarl
import h2, hpack, hyperframe
import nhigate.controller.run, nhigate.proxy.server, nhigate.proxy.http2, nhigate.proxy.h2_upstream'
  user="$(in_rootfs "${r}" 65532:65532 python -c 'import getpass; print(getpass.getuser())')"
  [[ "${user}" == "${NONROOT_NAME}" ]] || {
    log "getpass.getuser() in the image printed ${user:-nothing}, expected ${NONROOT_NAME}"
    return 1
  }

  log "[nhigate] packing ${NHIGATE_REF}"
  "${OCI[@]}" pack --rootfs "${r}" --dockerfile "${ROOT}/images/Dockerfile" \
    --ref "${NHIGATE_REF}" --out "${WORK}/nhigate.oci.tar" >/dev/null
  "${OCI[@]}" inspect "${WORK}/nhigate.oci.tar" >/dev/null
  mv "${WORK}/nhigate.oci.tar" "${NHIGATE_ARCHIVE}"
  log "[nhigate] ${NHIGATE_ARCHIVE}: $(du -h "${NHIGATE_ARCHIVE}" | cut -f1) archive," \
    "$(du -sh "${r}" | cut -f1) unpacked"
}

build_pause() {
  local r="${WORK}/pause-rootfs"
  log "[pause] gcc -static images/pause/pause.c"
  mkdir -p "${r}"
  gcc -Os -Wall -Wextra -Werror -static -o "${r}/pause" "${ROOT}/images/pause/pause.c"
  strip "${r}/pause"
  "${r}/pause" -v >/dev/null
  "${OCI[@]}" pack --rootfs "${r}" --dockerfile "${ROOT}/images/pause/Dockerfile" \
    --ref "${PAUSE_REF}" --out "${WORK}/pause.oci.tar" >/dev/null
  "${OCI[@]}" inspect "${WORK}/pause.oci.tar" >/dev/null
  mv "${WORK}/pause.oci.tar" "${PAUSE_ARCHIVE}"
  log "[pause] ${PAUSE_ARCHIVE}: $(du -h "${PAUSE_ARCHIVE}" | cut -f1)"
}

ensure_build_packages
if [[ ${FORCE} -eq 1 || ! -f "${PAUSE_ARCHIVE}" ]]; then
  build_pause
fi
if [[ ${FORCE} -eq 1 || ! -f "${NHIGATE_ARCHIVE}" ]]; then
  build_base
  build_wheels
  build_nhigate
fi
# Keep the three newest archives of each image (a node may still run the previous one).
prune_archives() {
  local kind=$1 old
  while read -r old; do
    [[ -n "${old}" ]] && rm -f "${old}"
  done < <(find "${IMAGES}" -maxdepth 1 -name "${kind}-*.oci.tar" -printf '%T@ %p\n' |
    sort -rn | tail -n +4 | cut -d' ' -f2-)
}
prune_archives nhigate
prune_archives pause
log "done after $((SECONDS - START)) s"
print_result
