#!/bin/sh
# udhcpc hook for lab guests (netns and QEMU alike): apply what the DHCP
# server handed out, drop it on deconfig.
case "$1" in
  deconfig) ip -4 addr flush dev "$interface" ;;
  bound|renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    ;;
esac
exit 0
