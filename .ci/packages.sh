# Sourced by .ci/run: install the Debian packages the tests start on loopback, when any is missing.
# PostgreSQL (accounts), Redis (shared limits), nginx (the replica topology), Prometheus (scraping),
# Chromium (the playground in a real browser). apt-get update runs once, only when something is missing.
# Their tests carry a marker each (pyproject.toml): a missing service fails them under CI=true.
install_test_packages() {
  local missing=()
  ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1 || missing+=(postgresql)
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  [ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 || missing+=(nginx)
  command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
  [ -x /usr/bin/chromium ] || missing+=(chromium)
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "ci: missing ${missing[*]} and cannot apt-get install here; their tests fail under CI=true"
    return 0
  fi
  echo "ci: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null ||
    echo "ci: apt-get install ${missing[*]} failed; their tests fail under CI=true"
  # Debian starts the services it installs; the tests start their own on other ports.
  for svc in postgresql redis-server nginx prometheus; do
    command -v systemctl >/dev/null 2>&1 && systemctl stop "$svc" >/dev/null 2>&1 || true
    command -v service >/dev/null 2>&1 && service "$svc" stop >/dev/null 2>&1 || true
  done
}
