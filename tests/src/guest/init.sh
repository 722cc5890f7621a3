#!/bin/busybox sh
# /init of the lab's QEMU guest: bring up virtio-net, keep a DHCP lease
# with busybox udhcpc, and answer the test on the serial console. Replies
# start with "HVNET " so they stand out from kernel messages.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /run /tmp
stty -echo 2>/dev/null
for m in $(cat /modules.order); do
  insmod "/lib/modules/$m.ko" || echo "HVNET error insmod $m"
done
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
ip link set lo up
ip link set eth0 up
udhcpc -f -i eth0 -s /udhcpc.script -t 100 -T 2 -A 1 -p /run/udhcpc.pid >/tmp/udhcpc.log 2>&1 &

stats() {
  s=/sys/class/net/eth0/statistics
  echo "HVNET stats $(cat $s/rx_packets) $(cat $s/tx_packets) $(cat $s/rx_bytes) $(cat $s/tx_bytes) $(cat $s/rx_dropped)"
}

# The MSI-X entry of the virtio-net RX queue, from the hwirq that
# /proc/interrupts shows as "<n>-edge" for virtio0-input.0: the PCI/MSI
# domain encodes it as (device id << 11) | entry index.
rx_vector() {
  v=$(grep 'virtio0-input.0' /proc/interrupts | sed -n 's/.* \([0-9][0-9]*\)-edge.*/\1/p')
  echo $(( ${v:-1} & 2047 ))
}

# Physical address of the vector-control word of MSI-X entry $1 of eth0's
# PCI function: walk the capability list to MSI-X (id 0x11), read its
# table BIR/offset, add the BAR's address from sysfs.
msix_control_addr() {
  pci=$(readlink -f /sys/class/net/eth0/device/..)
  ptr=$(( $(od -An -tu1 -j 52 -N 1 "$pci/config") ))
  while [ "$ptr" -ne 0 ]; do
    id=$(( $(od -An -tu1 -j "$ptr" -N 1 "$pci/config") ))
    if [ "$id" -eq 17 ]; then
      table=$(( $(od -An -tu4 -j $((ptr + 4)) -N 4 "$pci/config") ))
      bar=$(sed -n "$(( (table & 7) + 1 ))p" "$pci/resource" | cut -d' ' -f1)
      echo $(( bar + (table & ~7) + 16 * $1 + 12 ))
      return 0
    fi
    ptr=$(( $(od -An -tu1 -j $((ptr + 1)) -N 1 "$pci/config") ))
  done
  return 1
}

# Sets (mask) or clears (unmask) the per-vector mask bit of the RX queue's
# MSI-X entry: the incident's fault, RX interrupts held back while TX works.
set_rx_mask() {
  vec=$(rx_vector)
  addr=$(msix_control_addr "$vec") || { echo "HVNET error no MSI-X capability"; return; }
  ctl=$(devmem "$addr" 32)
  if [ "$1" = 1 ]; then new=$(( ctl | 1 )); else new=$(( ctl & ~1 )); fi
  devmem "$addr" 32 "$new"
  echo "HVNET ok vector $vec control $(devmem "$addr" 32)"
}

echo "HVNET ready"
while read -r cmd arg; do
  case "$cmd" in
    stats) stats ;;
    addr) echo "HVNET addr $(ip -4 addr show dev eth0 | sed -n 's/.*inet \([0-9.]*\).*/\1/p' | head -n 1)" ;;
    renew) kill -USR1 "$(cat /run/udhcpc.pid)" && echo "HVNET ok" ;;
    mask) set_rx_mask 1 ;;
    unmask) set_rx_mask 0 ;;
    ping) ping -q -i 0.2 "$arg" >/dev/null 2>&1 & echo $! >/run/ping.pid; echo "HVNET ok" ;;
    stop-ping) kill "$(cat /run/ping.pid)"; echo "HVNET ok" ;;
    dhcplog) echo "HVNET dhcplog $(tr '\n' '|' </tmp/udhcpc.log)" ;;
    "") ;;
    *) echo "HVNET error unknown command $cmd" ;;
  esac
done
