#!/usr/bin/env bash
# Copy the CRDs (crds/*.yaml, the source of truth) into the Helm chart, which can only read files
# inside itself (charts/nhigate/crd-files/, rendered by templates/crds.yaml).
#
# usage: hack/sync-chart-crds.sh [--check]
#   --check: change nothing; exit 1 and name the files that differ (for CI).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="${ROOT}/crds"
DST="${ROOT}/charts/nhigate/crd-files"
CHECK=0
case "${1:-}" in
  --check) CHECK=1 ;;
  "") ;;
  *)
    echo "usage: $0 [--check]" >&2
    exit 2
    ;;
esac

shopt -s nullglob
sources=("${SRC}"/*.yaml)
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "no CRDs in ${SRC}" >&2
  exit 1
fi

if [[ ${CHECK} -eq 1 ]]; then
  if ! diff -r -q "${SRC}" "${DST}" --exclude='*.yml' --exclude='.*' >&2; then
    echo "charts/nhigate/crd-files/ is stale: run hack/sync-chart-crds.sh" >&2
    exit 1
  fi
  echo "chart CRDs in sync (${#sources[@]} files)" >&2
  exit 0
fi

mkdir -p "${DST}"
rm -f "${DST}"/*.yaml
cp "${sources[@]}" "${DST}/"
echo "copied ${#sources[@]} CRD files into ${DST}" >&2
