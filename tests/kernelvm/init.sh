#!/bin/sh
# /init of the ipipfast kernel-VM initramfs (busybox + real iproute2).
# Kernel console (ttyS0) gets boot chatter; ttyS1 carries the host command channel.
export PATH=/sbin:/bin
# busybox sh runs its own applets ahead of PATH: force the real iproute2.
ip() { /sbin/ip "$@"; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run

for m in $(cat /etc/kernelvm/modules); do
    insmod "/lib/modules/$m.ko" || echo "kernelvm: insmod $m failed"
done

getarg() {
    for a in $(cat /proc/cmdline); do
        case "$a" in "$1="*) echo "${a#*=}" ;; esac
    done
}
VM_IP=$(getarg ipipfast.ip)
VM_GW=$(getarg ipipfast.gw)
VM_NAME=$(getarg ipipfast.name)
VM_NONCE=$(getarg ipipfast.nonce)

hostname "${VM_NAME:-kernelvm}"
ip link set lo up
n=0
while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 200 ]; do sleep 0.05; n=$((n + 1)); done
ip link set eth0 up
[ -n "$VM_IP" ] && ip addr add "$VM_IP" dev eth0
[ -n "$VM_GW" ] && ip route add default via "$VM_GW"

stty -F /dev/ttyS1 raw -echo -icrnl -opost
exec </dev/ttyS1 >/dev/ttyS1 2>/dev/console

# Request:  "<id> <timeout-seconds> <base64 script>\n"
# Reply:    "@@B <id>\n" base64(output) "@@E <id> <exit code>\n"
# Each command runs in its own session; on timeout the whole session is killed
# (exit code 137).  Jobs it leaves in the background keep running.
echo "@@READY $VM_NONCE"
while :; do
    if ! read -r id t b64; then sleep 0.1; continue; fi
    [ -n "$id" ] && [ -n "$t" ] || continue
    { cat /etc/kernelvm/prelude.sh; echo "$b64" | base64 -d; } >"/tmp/c.$id"
    setsid sh "/tmp/c.$id" </dev/null >"/tmp/o.$id" 2>&1 &
    pid=$!
    (sleep "$t"; kill -9 -- "-$pid") >/dev/null 2>&1 &
    w=$!
    wait "$pid"
    rc=$?
    kill "$w" 2>/dev/null
    echo "@@B $id"
    base64 "/tmp/o.$id"
    echo "@@E $id $rc"
    rm -f "/tmp/c.$id" "/tmp/o.$id"
done
