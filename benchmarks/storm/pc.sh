#!/bin/bash
# One simulated lab PC of the storm benchmark, run inside its own network namespace (benchmarks/storm/run.py).
# It waits on a shared lock (all PCs are "switched on" when the runner releases it), then does what a BIOS
# PXE PC does: DHCP as a PXE ROM (udhcpc: 1 DISCOVER try every 2 s, giving up after 10), TFTP of the loader
# it was told, DHCP again as iPXE, HTTP of the script iPXE is pointed at, then HTTP of the kernel and initrd
# that script names. One line of results: phase=microseconds since power-on, or fail=<phase>.
# Usage: pc.sh RESULT_FILE LOCK_FILE HOOK
res=$1 lock=$2 hook=$3
env_file=$res.env
export STORM_ENV=$env_file
flock -s "$lock" true
t0=${EPOCHREALTIME/./}
line=""
mark() { local now=${EPOCHREALTIME/./}; line="$line $1=$((now - t0))"; }  # microseconds
fail() { echo "fail=$1$line" >"$res"; exit 1; }
udhcpc -i eth0 -n -q -f -t 10 -T 2 -s "$hook" -V PXEClient:Arch:00000:UNDI:002001 -x 0x5d:0000 \
    -x 0x5e:010201 >/dev/null 2>&1 || fail dhcp
mark dhcp
. "$env_file"
server=${siaddr:-$serverid}
loader=${boot_file:-$bootfile}
[ -n "$loader" ] || fail no-loader
curl -sf --max-time 60 -o /dev/null "tftp://$server/$loader" || fail loader
mark loader
udhcpc -i eth0 -n -q -f -t 10 -T 2 -s "$hook" -r "$ip" -V PXEClient:Arch:00000:UNDI:002001 -x 0x5d:0000 \
    -x 0x5e:010201 -x 0x4d:69505845 -x 0xaf:130101 >/dev/null 2>&1 || fail ipxe-dhcp
mark ipxe_dhcp
. "$env_file"
script=${boot_file:-$bootfile}
case "$script" in http://*) ;; *) fail "no-script($script)" ;; esac
body=$(curl -sf --max-time 60 "$script") || fail script
mark script
# bootd's menu may chain to the entry's own script first: follow one chain
chain=$(printf '%s\n' "$body" | sed -n 's/^chain[^h]*\(http:[^ ]*\).*/\1/p' | head -1)
if [ -n "$chain" ] && ! printf '%s\n' "$body" | grep -q '^kernel '; then
    body=$(curl -sf --max-time 60 "$chain") || fail chain
fi
kernel=$(printf '%s\n' "$body" | sed -n 's/^kernel[^h]*\(http:[^ ]*\).*/\1/p' | head -1)
initrd=$(printf '%s\n' "$body" | sed -n 's/^initrd[^h]*\(http:[^ ]*\).*/\1/p' | head -1)
[ -n "$kernel" ] && [ -n "$initrd" ] || fail no-kernel
curl -sf --max-time 120 -o /dev/null "$kernel" || fail kernel
curl -sf --max-time 120 -o /dev/null "$initrd" || fail initrd
mark files
echo "ok=1$line" >"$res"
