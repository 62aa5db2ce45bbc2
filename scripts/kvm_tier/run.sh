#!/usr/bin/env bash
# scripts/kvm_tier/run.sh — tiermem's kernel-VM test tier: boot Debian's Linux 7.3 (userfaultfd RWP
# is in mainline) under QEMU and run ONE command inside it as root, with the host's root filesystem
# visible read-only at the same paths, so the checkout's .venv runs unchanged. Exits with the
# command's status.
#
#   scripts/kvm_tier/run.sh [--] CMD [ARGS...]
#
# Exit status: CMD's own; 77 = skipped (QEMU or the kernel packages cannot be had here; the reason
# is printed); 124 = time limit hit; 125 = the harness failed (no boot, bad setup).
#
# Steps (docs/kvm-tier.md): install qemu-system-x86, busybox-static, cpio, xz-utils from the OS if
# missing; download Debian experimental's linux-{binary,modules,base}-7.3-amd64 with a private apt
# sources list (mirror taken from this machine's apt sources, system apt state untouched) into the
# cache; build a busybox initramfs holding the 9p modules and init.sh; boot (KVM if it works, else
# TCG, retrying the rare boot-time oops); run CMD; power off.
#
# Knobs (environment, defaults in brackets):
#   KVM_TIER_CACHE    downloads, kernel, initramfs [${XDG_CACHE_HOME:-~/.cache}/tiermem/kvm-tier]
#   KVM_TIER_TIMEOUT  hard wall-clock limit for the whole run incl. downloads and boot, s [600]
#   KVM_TIER_ACCEL    auto|kvm|tcg [auto: KVM when /dev/kvm boots the kernel, else TCG -cpu max]
#   KVM_TIER_TRIES    boots to try when the guest dies before /init [3]
#   KVM_TIER_MEM / KVM_TIER_SMP   guest RAM / vCPUs [2G / 2]
#   KVM_TIER_DEBVER   Debian package version [7.3~rc7-1~exp1; the mirror's current one if gone]
#   KVM_TIER_PASSENV  names of host environment variables passed to CMD [""]
#   KVM_TIER_BINDS    extra host dirs under /tmp to show in the guest's fresh /tmp [""]
#   KVM_TIER_QUIET=1  no progress lines on stderr
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${KVM_TIER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tiermem/kvm-tier}
TIMEOUT=${KVM_TIER_TIMEOUT:-600}
ACCEL=${KVM_TIER_ACCEL:-auto}
TRIES=${KVM_TIER_TRIES:-3}
MEM=${KVM_TIER_MEM:-2G}
SMP=${KVM_TIER_SMP:-2}
DEBVER=${KVM_TIER_DEBVER:-7.3~rc7-1~exp1}
KVER=7.3-amd64 # the generic flavour: cloud-amd64 lacks 9p
MODS="netfs 9pnet 9pnet_virtio 9p"
T_START=$(date +%s)
DEADLINE=$((T_START + TIMEOUT))

log() { [ "${KVM_TIER_QUIET:-0}" = 1 ] || echo "[kvm-tier] $*" >&2; }
die() { echo "[kvm-tier] ERROR: $*" >&2; exit 125; }
skip() { echo "[kvm-tier] SKIP: $*" >&2; exit 77; }
[ "${1:-}" = -- ] && shift
[ $# -ge 1 ] || die "usage: $0 [--] CMD [ARGS...]"
[ "$(uname -m)" = x86_64 ] || skip "the tier boots an amd64 kernel; this host is $(uname -m)"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi; }

# --- host packages from the OS -------------------------------------------------------------------
ensure_host_pkgs() {
	local missing=()
	command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
	{ [ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx insmod && ! ldd /bin/busybox >/dev/null 2>&1; } ||
		missing+=(busybox-static)
	command -v cpio >/dev/null || missing+=(cpio)
	command -v xz >/dev/null || missing+=(xz-utils)
	[ ${#missing[@]} -eq 0 ] && return
	command -v apt-get >/dev/null || skip "missing ${missing[*]} and no apt-get to install them"
	log "installing ${missing[*]} from the OS"
	local A=(-o DPkg::Lock::Timeout=600 -y -q --no-install-recommends)
	as_root apt-get "${A[@]}" install "${missing[@]}" >&2 ||
		{ as_root apt-get -o DPkg::Lock::Timeout=600 -q update >&2 && as_root apt-get "${A[@]}" install "${missing[@]}" >&2; } ||
		skip "cannot install ${missing[*]} from the OS"
}

# --- the kernel: Debian experimental's linux-{binary,modules,base}-7.3-amd64 -----------------------
debian_mirror() { # the main archive URI this machine's apt already uses
	{
		sed -n 's/^URIs:[[:space:]]*//p' /etc/apt/sources.list.d/*.sources 2>/dev/null || true
		awk '$1=="deb"{print $2}' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true
	} | tr ' ' '\n' | grep -E '/debian/?$' | head -n 1 || true
}

fetch_debs() {
	local D=$CACHE/apt mirror p have=1
	for p in linux-binary-$KVER linux-modules-$KVER linux-base-$KVER; do
		ls "$CACHE"/debs/"${p}"_*_amd64.deb >/dev/null 2>&1 || have=0
	done
	[ $have = 1 ] && return
	command -v apt-get >/dev/null || skip "no apt-get to download the 7.3 kernel packages"
	mirror=$(debian_mirror)
	[ -n "$mirror" ] || skip "no Debian mirror in this machine's apt sources to download the 7.3 kernel from"
	mkdir -p "$D"/{lists/partial,cache/archives/partial} "$CACHE/debs"
	# a private sources list and state: the system's apt configuration and lists stay untouched
	printf 'deb %s experimental main\n' "$mirror" >"$D/sources.list"
	A=(-o Dir::Etc::sourcelist="$D/sources.list" -o Dir::Etc::sourceparts=- -o Dir::State::Lists="$D/lists"
		-o Dir::Cache="$D/cache" -o Debug::NoLocking=1 -o APT::Sandbox::User="$(id -un)" -q)
	log "updating the private package lists (experimental from $mirror)"
	apt-get "${A[@]}" update >&2 || skip "cannot reach the Debian mirror $mirror"
	local ver=$DEBVER
	if ! apt-cache "${A[@]}" show "linux-binary-$KVER=$ver" >/dev/null 2>&1; then
		ver=$(apt-cache "${A[@]}" policy "linux-binary-$KVER" 2>/dev/null | sed -n 's/^ *Candidate: *//p')
		[ -n "$ver" ] && [ "$ver" != "(none)" ] || skip "linux-binary-$KVER is not on $mirror (experimental)"
		log "version $DEBVER is gone from the mirror; using $ver"
	fi
	for p in linux-binary-$KVER linux-modules-$KVER linux-base-$KVER; do
		log "downloading $p=$ver"
		(cd "$CACHE/debs" && apt-get "${A[@]}" download "$p=$ver" >&2) || skip "cannot download $p=$ver"
	done
}

ensure_kernel() {
	KROOT=$CACHE/kernel
	KDIR=$KROOT/usr/lib/modules/$KVER
	[ -f "$KDIR/vmlinuz" ] && [ -d "$KDIR/kernel" ] && return
	fetch_debs
	log "extracting the kernel packages"
	rm -rf "$KROOT.tmp" && mkdir -p "$KROOT.tmp"
	local f
	for f in "$CACHE"/debs/linux-{binary,modules,base}-"$KVER"_*_amd64.deb; do dpkg-deb -x "$f" "$KROOT.tmp"; done
	[ -f "$KROOT.tmp/usr/lib/modules/$KVER/vmlinuz" ] || die "no vmlinuz in the $KVER packages"
	rm -rf "$KROOT" && mv "$KROOT.tmp" "$KROOT"
	grep -q '^CONFIG_USERFAULTFD_RWP=y' "$KDIR/config" 2>/dev/null ||
		log "WARNING: $KVER's config lacks CONFIG_USERFAULTFD_RWP=y: the rwp tests will skip inside"
}

# --- the initramfs: static busybox, the 9p modules in load order, init.sh --------------------------
modfile() { find "$KDIR/kernel" -name "$1.ko*" -print -quit; }
moddeps() { xz -dcf "$(modfile "$1")" | tr '\0' '\n' | sed -n 's/^depends=//p' | tr ',' ' '; }
add_mod() { # dependencies first
	local m=$1 d
	case " $ORDER " in *" $m "*) return ;; esac
	[ -n "$(modfile "$m")" ] || die "module $m is not in $KVER"
	for d in $(moddeps "$m"); do add_mod "${d//-/_}"; done
	ORDER="$ORDER $m"
}
ensure_initramfs() {
	local key root m
	key=$({ cat "$HERE/init.sh"; echo "$KVER $MODS"; cat "$KDIR/modules.order" 2>/dev/null; sha256sum /bin/busybox; } |
		sha256sum | cut -c1-16)
	INITRD=$CACHE/initramfs-$key.cpio.gz
	[ -f "$INITRD" ] && return
	log "building the initramfs"
	root=$CACHE/initramfs.tmp
	rm -rf "$root" && mkdir -p "$root"/{bin,proc,sys,dev,lib/modules,newroot,out,hosttmp}
	cp /bin/busybox "$root/bin/busybox"
	for m in $(/bin/busybox --list); do [ "$m" = busybox ] || ln -s busybox "$root/bin/$m"; done
	ORDER=""
	for m in $MODS; do add_mod "$m"; done
	for m in $ORDER; do xz -dcf "$(modfile "$m")" >"$root/lib/modules/$m.ko"; done
	echo $ORDER >"$root/lib/modules/order"
	install -m 755 "$HERE/init.sh" "$root/init"
	(cd "$root" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) >"$INITRD.tmp"
	mv "$INITRD.tmp" "$INITRD" && rm -rf "$root"
}

# --- boot and run -------------------------------------------------------------------------------
QPID="" TAILS=()
cleanup() {
	[ -n "$QPID" ] && kill "$QPID" 2>/dev/null
	for p in "${TAILS[@]}"; do kill "$p" 2>/dev/null; done
	[ -n "${OUT:-}" ] && rm -rf "$OUT"
	true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ensure_host_pkgs
mkdir -p "$CACHE"
exec 9>"$CACHE/lock" # one VM at a time per cache: the host has few cores
left=$((DEADLINE - $(date +%s)))
flock -w "$((left > 1 ? left : 1))" 9 || die "another kvm-tier VM held $CACHE/lock for ${TIMEOUT}s"
ensure_kernel
ensure_initramfs

OUT=$(mktemp -d "$CACHE/run.XXXXXX") # the guest's writable share: command, output, status
BINDS=${KVM_TIER_BINDS:-}
case "$PWD/" in /tmp/*) BINDS="$BINDS $PWD" ;; esac # a checkout under /tmp is hidden by the guest's tmpfs
GUEST_LIMIT=$((DEADLINE - $(date +%s) - 30))
[ "$GUEST_LIMIT" -gt 30 ] || die "no time left to boot (KVM_TIER_TIMEOUT=$TIMEOUT)"
{
	echo "# written by scripts/kvm_tier/run.sh"
	printf 'export KVM_TIER_GUEST=1 PYTHONDONTWRITEBYTECODE=1\n'
	for v in ${KVM_TIER_PASSENV:-}; do [ -n "${!v+x}" ] && printf 'export %s=%q\n' "$v" "${!v}"; done
	printf 'cd %q || exit 125\n' "$PWD"
	printf 'exec'; printf ' %q' "$@"; echo
} >"$OUT/cmd.sh"
printf 'GUEST_LIMIT=%s\nBINDS=%q\n' "$GUEST_LIMIT" "$BINDS" >"$OUT/env"

APPEND="console=ttyS0 quiet loglevel=3 panic=-1 oops=panic mitigations=off rdinit=/init kvm_tier.out=$OUT"
boot() { # $1 = kvm|tcg; returns 0 once /init reported in
	local acc=$1 wait_s cpu
	rm -f "$OUT/booted"
	# a KVM boot reaches /init in seconds; one that has not after 20 s is stuck (seen with -cpu host)
	if [ "$acc" = kvm ]; then cpu=host; wait_s=20; else cpu=max; wait_s=240; fi
	log "booting Linux $KVER ($acc, -m $MEM -smp $SMP)"
	TB=$(date +%s)
	qemu-system-x86_64 -name tiermem-kvm-tier -m "$MEM" -smp "$SMP" -no-reboot -nographic -nodefaults \
		-no-user-config -monitor none -serial "file:$OUT/console.log" -accel "$acc" -cpu "$cpu" \
		-kernel "$KDIR/vmlinuz" -initrd "$INITRD" -append "$APPEND" \
		-virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap" \
		-virtfs "local,path=$OUT,mount_tag=hostout,security_model=none,multidevs=remap" \
		</dev/null >"$OUT/qemu.log" 2>&1 &
	QPID=$!
	while [ ! -s "$OUT/booted" ]; do
		if ! kill -0 "$QPID" 2>/dev/null; then
			wait "$QPID" 2>/dev/null || true
			QPID=""
			log "$acc: the guest died before /init: $(tail -c 300 "$OUT/qemu.log" | tr '\n' ' ') $(grep -a -m1 -E 'Oops|panic|BUG' "$OUT/console.log" | tr -d '\r')"
			return 1
		fi
		if [ $(($(date +%s) - TB)) -ge $wait_s ] || [ "$(date +%s)" -ge "$DEADLINE" ]; then
			log "$acc: no /init after $(($(date +%s) - TB))s; console: $(tail -c 300 "$OUT/console.log" | tr -d '\r' | tr '\n' ' ')"
			kill "$QPID" 2>/dev/null
			wait "$QPID" 2>/dev/null || true
			QPID=""
			return 1
		fi
		sleep 0.2
	done
	log "$acc: /init after $(($(date +%s) - TB))s"
}

booted=0
# a host whose /dev/kvm failed to boot the kernel once is remembered, keyed by host kernel and QEMU
KVM_VERDICT=$CACHE/kvm-fails-$(uname -r)-$(qemu-system-x86_64 --version | head -n 1 | tr -dc 'a-zA-Z0-9.')
if [ "$ACCEL" != tcg ] && [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
	if [ "$ACCEL" = kvm ] || [ ! -e "$KVM_VERDICT" ]; then
		if boot kvm; then booted=1; else touch "$KVM_VERDICT"; fi
	else
		log "KVM failed to boot this kernel before on this host: TCG (rm $KVM_VERDICT to retry KVM)"
	fi
fi
# multi-threaded TCG now and then oopses on an int3 while the kernel patches its text at boot: retry
if [ $booted = 0 ] && [ "$ACCEL" != kvm ]; then
	for _ in $(seq 1 "$TRIES"); do boot tcg && { booted=1; break; }; done
fi
[ $booted = 1 ] || die "Linux $KVER did not boot (accel $ACCEL)"

touch "$OUT/stdout" "$OUT/stderr"
tail -n +1 -F --pid="$QPID" -s 0.3 "$OUT/stdout" 2>/dev/null &
TAILS+=($!)
tail -n +1 -F --pid="$QPID" -s 0.3 "$OUT/stderr" >&2 2>/dev/null &
TAILS+=($!)
timed_out=0
while kill -0 "$QPID" 2>/dev/null; do
	if [ "$(date +%s)" -ge "$DEADLINE" ]; then
		timed_out=1
		log "time limit (${TIMEOUT}s) hit: stopping the VM"
		kill "$QPID"
		break
	fi
	sleep 0.5
done
wait "$QPID" 2>/dev/null || true
QPID=""
for p in "${TAILS[@]}"; do wait "$p" 2>/dev/null || true; done
TAILS=()
[ -s "$OUT/init-error" ] && log "guest init: $(cat "$OUT/init-error")"
if [ -s "$OUT/rc" ]; then rc=$(cat "$OUT/rc"); elif [ $timed_out = 1 ]; then rc=124; else rc=125; fi
[ "$rc" = 124 ] && log "the command hit the time limit"
[ "$rc" = 125 ] && [ ! -s "$OUT/rc" ] && log "the guest stopped without a status; console tail: $(tail -c 600 "$OUT/console.log" | tr -d '\r')"
log "done in $(($(date +%s) - T_START))s (boot $(cut -d' ' -f1 "$OUT/booted" 2>/dev/null)s guest uptime), status $rc"
exit "$rc"
