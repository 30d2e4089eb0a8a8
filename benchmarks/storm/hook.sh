#!/bin/sh
# udhcpc's event script for benchmarks/storm/pc.sh: configure the address, leave what the server said.
case "$1" in
deconfig) ip addr flush dev "$interface" ;;
bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    printf "ip='%s' siaddr='%s' serverid='%s' boot_file='%s' bootfile='%s'\n" \
        "$ip" "$siaddr" "$serverid" "$boot_file" "$bootfile" >"$STORM_ENV" ;;
esac
exit 0
