#!/usr/bin/env bash
# Builds the e2e control-plane tools (kube-apiserver, kubectl, helm) from their
# published Go modules into a cache directory, idempotently: a tool is rebuilt only
# when its go.mod/go.sum changed since the last build.
#
#   e2e/tools/build.sh [--real-node [--in-chart-etcd]] [CACHE_DIR]   (default: <repo>/.e2e-cache/bin)
#
# --real-node also builds kubelet, kube-scheduler, kube-controller-manager, kube-proxy and the
# pod sandbox's pause program (scripts/real-node); the tests do not need them. --in-chart-etcd
# also builds etcd v3.5 (for the chart's etcd image) and CoreDNS (scripts/real-node --etcd in-chart).
#
# The e2e harness looks for the tools in $NINELIVES_E2E_BIN, else <repo>/.e2e-cache/bin.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
real_node=false
in_chart_etcd=false
if [[ "${1:-}" == "--real-node" ]]; then real_node=true; shift; fi
if [[ "${1:-}" == "--in-chart-etcd" ]]; then in_chart_etcd=true; shift; fi
bin="${1:-${NINELIVES_E2E_BIN:-$repo/.e2e-cache/bin}}"
mkdir -p "$bin"
# One package per core: two compiles of Kubernetes packages at once fit well within
# this machine kind's 24 GiB, and CI builds these tools on every fresh clone.
export GOFLAGS="${GOFLAGS:--p=$(nproc)} -buildvcs=false -trimpath"
export CGO_ENABLED=0

k8s_version="$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" {print $3}' "$here/kubernetes/go.mod")"
k8s_minor="$(echo "$k8s_version" | cut -d. -f2)"
version_pkg=k8s.io/component-base/version
k8s_ldflags="-s -w -X $version_pkg.gitVersion=$k8s_version -X $version_pkg.gitMajor=1 -X $version_pkg.gitMinor=$k8s_minor -X $version_pkg.gitTreeState=clean"

# build MODULE_DIR TOOL PACKAGE LDFLAGS
build() {
    local dir="$1" tool="$2" pkg="$3" ldflags="$4"
    local stamp="$bin/.$tool.stamp"
    local want
    want="$(cat "$dir/go.mod" "$dir/go.sum" | sha256sum | cut -d' ' -f1)"
    if [[ -x "$bin/$tool" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        echo "$tool: up to date ($bin/$tool)"
        return
    fi
    echo "$tool: building $pkg"
    local start=$SECONDS
    (cd "$dir" && go build -ldflags "$ldflags" -o "$bin/$tool.tmp" "$pkg")
    mv "$bin/$tool.tmp" "$bin/$tool"
    echo "$want" > "$stamp"
    echo "$tool: built in $((SECONDS - start)) s"
}

build "$here/kubernetes" kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$k8s_ldflags"
build "$here/kubernetes" kubectl k8s.io/kubernetes/cmd/kubectl "$k8s_ldflags"
build "$here/helm" helm helm.sh/helm/v4/cmd/helm "-s -w"
if $real_node; then
    build "$here/kubelet" kubelet k8s.io/kubernetes/cmd/kubelet "$k8s_ldflags"
    for tool in kube-scheduler kube-controller-manager kube-proxy; do
        build "$here/control" "$tool" "k8s.io/kubernetes/cmd/$tool" "$k8s_ldflags"
    done
    build "$here/pause" pause . "-s -w"
fi
if $in_chart_etcd; then
    build "$here/etcd" etcd-3.5 go.etcd.io/etcd/server/v3 "-s -w"
    build "$here/coredns" coredns github.com/coredns/coredns "-s -w"
fi
