# Sourced by the cached asset builders (build-real-os.sh, build-client-root.sh).
# asset_dir NAME: O = the absolute cache directory of that asset (${BOOTD_ASSETS:-<repo>/.cache/assets}/NAME),
# made if missing and locked (flock on fd 9) until the calling script exits: concurrent runs wait.
asset_dir() {
    local base=${BOOTD_ASSETS:-$ROOT/.cache/assets}
    O=$base/$1
    mkdir -p "$O"
    O=$(cd "$O" && pwd)
    exec 9>"$O/.lock"
    flock 9
}
