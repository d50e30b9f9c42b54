# apt_install PACKAGE...: installs Debian packages with apt-get, as root or through sudo.
# Sourced by setup.sh and dev-services.sh, which define log and die.

apt_install() {
    local sudo=""
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null || die "missing packages ($*) and not root: install them first"
        sudo="sudo"
    fi
    command -v apt-get >/dev/null || die "missing packages ($*) and no apt-get: install them first"
    log "installing $* with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    # The package lists of a fresh machine may be missing or stale: refresh once on failure.
    if ! $sudo apt-get install -y -q --no-install-recommends "$@" >/dev/null; then
        $sudo apt-get update -q >/dev/null
        $sudo apt-get install -y -q --no-install-recommends "$@" >/dev/null
    fi
}
