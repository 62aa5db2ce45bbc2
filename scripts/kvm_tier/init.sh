#!/bin/sh
# /init of the kvm-tier initramfs (busybox sh as PID 1; run.sh builds it in).
#
# Shows the host's / read-only (9p tag hostroot) under a fresh tmpfs /tmp, mounts the host's
# writable run directory (9p tag hostout) at its host path, runs its cmd.sh as root chrooted into
# the host root, writes the exit status next to it and powers off.
export PATH=/bin
say() { echo "[kvm-tier-init] $*" >/dev/console; }
fail() {
	say "FATAL: $*"
	[ -d /out ] && echo "$*" >>/out/init-error
	sync
	poweroff -f
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
OUT=
for a in $(cat /proc/cmdline); do case "$a" in kvm_tier.out=*) OUT=${a#kvm_tier.out=} ;; esac; done
[ -n "$OUT" ] || fail "no kvm_tier.out= on the kernel command line"
for m in $(cat /lib/modules/order); do insmod "/lib/modules/$m.ko" || fail "insmod $m"; done

P9="trans=virtio,version=9p2000.L,msize=262144"
mount -t 9p -o "$P9" hostout /out || fail "mount hostout"
cut -d' ' -f1 /proc/uptime >/out/booted
. /out/env # GUEST_LIMIT, BINDS

R=/newroot
mount -t 9p -o "$P9,cache=loose,ro" hostroot $R || fail "mount hostroot"
mount --bind $R/tmp /hosttmp || fail "bind the host's /tmp"
mount -t tmpfs -o mode=1777,size=60% tmpfs $R/tmp || fail "tmpfs /tmp"
for d in $BINDS; do # host dirs under /tmp the command needs (a checkout there, say)
	case "$d" in /tmp/?*) ;; *) continue ;; esac
	[ -d "/hosttmp/${d#/tmp/}" ] || continue
	mkdir -p "$R$d" && mount --bind "/hosttmp/${d#/tmp/}" "$R$d" || fail "bind $d"
done
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/shm $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t tmpfs -o mode=755 tmpfs $R/run
[ -d $R/var/tmp ] && mount -t tmpfs -o mode=1777 tmpfs $R/var/tmp
mkdir -p "$R$OUT" && mount --bind /out "$R$OUT" || fail "bind $OUT"
mkdir -p $R/tmp/home
hostname kvm-tier
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up

chroot $R /usr/bin/env -i HOME=/tmp/home TERM=dumb LANG=C.UTF-8 \
	PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
	/usr/bin/timeout -s INT -k 20 "$GUEST_LIMIT" /bin/bash "$OUT/cmd.sh" >/out/stdout 2>/out/stderr </dev/null
echo $? >/out/rc
dmesg >/out/dmesg 2>/dev/null
sync
umount "$R$OUT" /out 2>/dev/null
poweroff -f
