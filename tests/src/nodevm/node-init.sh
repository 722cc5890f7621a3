#!/bin/busybox sh
# /init of the compute-node VM: a Debian kernel with hvnet, the lab's node
# pieces (iproute2, dnsmasq, busybox udhcpc, the fake VMM) and chosen lab
# tests. Runs every step of /plan ("<label><TAB><command>") in order and
# reports on the serial console in lines starting "HVNET-NODE ", then
# powers off. A step's own output stays in the VM unless it fails (the
# console is a 115200-baud serial line).
/bin/busybox mkdir -p /bb
/bin/busybox --install -s /bb
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/bb
export HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /run /tmp /root /var/lib/misc
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
ln -sf /run /var/run 2>/dev/null
for m in $(cat /modules.order); do
  insmod "/lib/modules/$m.ko" || echo "HVNET-NODE insmod-failed $m"
done
ip link set lo up
echo "HVNET-NODE kernel $(uname -r)"
tab=$(printf '\t')
while IFS="$tab" read -r label cmd; do
  [ -z "$label" ] && continue
  echo "HVNET-NODE begin $label"
  start=$(date +%s)
  sh -c "$cmd" >/tmp/step.log 2>&1 </dev/null
  rc=$?
  grep '^HVNET-NODE ' /tmp/step.log
  if [ "$rc" -ne 0 ]; then
    tail -n 80 /tmp/step.log | sed 's/^/HVNET-NODE log /'
  fi
  echo "HVNET-NODE end $label $rc $(( $(date +%s) - start ))"
done </plan
echo "HVNET-NODE done"
sync
poweroff -f
