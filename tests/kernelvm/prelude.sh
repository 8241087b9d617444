# Prepended to every command the host runs in the VM.
export PATH=/sbin:/bin
ip() { /sbin/ip "$@"; }
