#!/usr/bin/env bash
# make deploy-check: render every overlay, then lint, validate and scan it, offline.
#   deploy/check.sh [VENV]     VENV holds the pinned tools (scripts/deploy_requirements.txt)
# 1. kubectl kustomize deploy/overlays/<name>  ->  build/deploy/<name>.yaml
# 2. yamllint --strict, on the sources and on the rendered output
# 3. kubernetes-validate --strict against one Kubernetes minor; a kind it has no schema for is
#    a failure (the tool itself only warns, so its warnings are failures here)
# 4. checkov --framework kubernetes on the rendered output, and --framework dockerfile on
#    deploy/Dockerfile: zero failed checks; every skip is written, with its reason, in the
#    manifest (checkov.io/skip annotations) or the Dockerfile (checkov:skip comment)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${1:-.venv-deploy}
BIN=$VENV/bin
KUBERNETES_VERSION=1.37.0
OUT=build/deploy

rm -rf "$OUT"
mkdir -p "$OUT"
overlays=()
for dir in deploy/overlays/*/; do
    name=$(basename "$dir")
    "$BIN/kubectl" kustomize "$dir" >"$OUT/$name.yaml"
    overlays+=("$OUT/$name.yaml")
    echo "rendered $dir -> $OUT/$name.yaml"
done

"$BIN/yamllint" --strict -c deploy/.yamllint deploy "${overlays[@]}"
echo "yamllint: ok"

# --quiet prints only warnings and failures: any line at all fails the check.
"$BIN/kubernetes-validate" --strict --quiet -k "$KUBERNETES_VERSION" "${overlays[@]}" \
    | tee "$OUT/kubernetes-validate.log"
if [ -s "$OUT/kubernetes-validate.log" ]; then
    echo "kubernetes-validate: failed (a WARN is a resource without a schema)" >&2
    exit 1
fi
echo "kubernetes-validate: every resource valid against Kubernetes $KUBERNETES_VERSION (strict)"

# checkov exits non-zero on any failed check; --skip-download keeps it offline. The full report
# goes to build/deploy/checkov-*.log; shown here: the totals, then every failure and every skip
# with the reason written in the manifest or the Dockerfile.
run_checkov() {
    local framework=$1
    shift
    local log="$OUT/checkov-$framework.log" status=0
    "$BIN/checkov" --skip-download --compact --framework "$framework" "$@" >"$log" 2>&1 || status=$?
    grep -E "scan results|Passed checks" "$log" || true
    grep -B1 -A2 -E "(FAILED|SKIPPED) for resource" "$log" | grep -v -- "^--$" || true
    if [ "$status" -ne 0 ]; then
        echo "checkov ($framework): failed, exit $status (report: $log)" >&2
        return "$status"
    fi
}
files=()
for rendered in "${overlays[@]}"; do
    files+=(-f "$rendered")
done
run_checkov kubernetes "${files[@]}"
run_checkov dockerfile -f deploy/Dockerfile
echo "deploy-check: ok"
