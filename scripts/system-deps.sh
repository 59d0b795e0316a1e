#!/usr/bin/env bash
# Installs the Debian packages the lab and the observability tests need (iproute2, iptables, procps, iperf3,
# prometheus, chromium) where we are root and apt-get exists. Never fails the build: without them the tests
# that need them skip with the reason.
set -u
missing=()
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v tc >/dev/null 2>&1 || missing+=(iproute2)
command -v iptables >/dev/null 2>&1 || missing+=(iptables)
command -v sysctl >/dev/null 2>&1 || missing+=(procps)
command -v iperf3 >/dev/null 2>&1 || missing+=(iperf3)
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: not root or no apt-get; missing ${missing[*]} (the tests that need them will skip)"
  exit 0
fi
echo "system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null 2>&1 || true
apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${missing[@]}" | sort -u) >/dev/null 2>&1 \
  || echo "system-deps: apt-get install failed; the tests that need them will skip"
exit 0
