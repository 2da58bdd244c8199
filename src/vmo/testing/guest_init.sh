#!/bin/sh
# /init of VMO's test guest: a busybox system that boots in seconds under TCG.
#
# One file, several roles chosen by $1, so the initramfs carries a single script:
#   (none)      PID 1: install busybox applets, then become busybox init (reads /etc/inittab)
#   boot        sysinit: mounts, modules, NoCloud seed, network, services, ready marker
#   dhcp-hook   udhcpc event script: applies a DHCP lease
#   info        TCP 5432 handler: one line about the guest, then close
#   echo        TCP 7 handler: echo back what the client sends
#   modprobe    /sbin/modprobe (the kernel's request_module too): load a module by name or alias
#   power-button  ACPI power button: clean poweroff through init
#   shutdown    init's shutdown action

PATH=/sbin:/bin:/usr/sbin:/usr/bin
export PATH
STATE=/run/vmo
SEED=/run/vmo/seed
AGENT_PORT=org.qemu.guest_agent.0

log() { echo "vmo-guest: [$(cut -d' ' -f1 /proc/uptime)] $*" > /dev/console; }

pid1() {
	/bin/busybox mkdir -p /proc /sys /dev /run /tmp /sbin /usr/bin /usr/sbin
	/bin/busybox --install -s
	exec /sbin/init
}

mount_basics() {
	mount -t proc proc /proc
	mount -t sysfs sysfs /sys
	mount -t devtmpfs devtmpfs /dev 2>/dev/null
	mkdir -p /dev/pts /dev/shm "$STATE" "$SEED"
	mount -t devpts devpts /dev/pts
	mount -t tmpfs tmpfs /tmp
}

# /usr/lib/vmo/<bundle>.cpio.gz: big, rarely needed files (qemu-ga and its libraries; ext4)
# that the kernel need not inflate at every boot. The first caller unpacks; others wait for it.
unpack() { # bundle
	mkdir -p "$STATE"
	[ -e "$STATE/unpacked.$1" ] && return 0
	archive=/usr/lib/vmo/$1.cpio.gz
	if mkdir "$STATE/unpacking.$1" 2>/dev/null; then
		[ -f "$archive" ] && (cd / && gunzip -c "$archive" | cpio -i -d -m -u 2>/dev/null) &&
			rm "$archive" && touch "$STATE/unpacked.$1"
	else
		tries=0
		while [ ! -e "$STATE/unpacked.$1" ] && [ "$tries" -lt 100 ]; do
			tries=$((tries + 1))
			sleep 0.1
		done
	fi
	[ -e "$STATE/unpacked.$1" ] || { log "could not unpack $archive"; return 1; }
}

# /etc/vmo/modules: "<name> <path>..." (the module and its dependencies in insmod order);
# /etc/vmo/modaliases: "<glob> <name>" from the modules' own alias= strings. Matching the
# devices' modalias against them is what udev+modprobe would do, and skips absent hardware.
load() {
	for name in "$@"; do
		set -- $(grep "^$name " /etc/vmo/modules)
		[ $# -gt 1 ] || { log "no module $name"; continue; }
		shift
		for ko in "$@"; do
			[ -f "$ko" ] || unpack modules
			mod=${ko##*/}
			mod=$(echo "${mod%.ko}" | tr - _)
			[ -d "/sys/module/$mod" ] || insmod "$ko" 2>/dev/null
		done
	done
}

# modprobe [-q] [--] NAME...: NAME is a module of /etc/vmo/modules or an exact alias from
# /etc/vmo/aliases; the kernel asks for fs-ext2 on a mount, crypto-crc32c for checksums.
modprobe_cmd() {
	quiet=0
	status=0
	for arg in "$@"; do
		case "$arg" in
		-q) quiet=1 ;;
		-*) ;;
		*)
			name=$(echo "$arg" | tr - _)
			grep -q "^$name " /etc/vmo/modules ||
				name=$(awk -v a="$arg" '$1 == a { print $2; exit }' /etc/vmo/aliases)
			if [ -n "$name" ]; then
				load "$name"
			else
				[ "$quiet" = 1 ] || echo "modprobe: module $arg not found" >&2
				status=1
			fi
			;;
		esac
	done
	return "$status"
}

modules_for_bus() { # bus -> module names whose aliases match a device present on it
	cat /sys/bus/"$1"/devices/*/modalias 2>/dev/null | awk '
	NR == FNR {
		# a modalias glob as an anchored regex ([...] classes mean the same in both)
		re = $1; gsub(/[.+(){}|^$]/, "\\\\&", re); gsub(/\*/, ".*", re); gsub(/\?/, ".", re)
		pat[++n] = "^" re "$"; name[n] = $2
		# busybox awk compiles dynamic regexes on every use: compare the literal head first
		head[n] = $1; sub(/[*?[].*/, "", head[n]); hlen[n] = length(head[n])
		next
	}
	{
		for (i = 1; i <= n; i++)
			if (substr($0, 1, hlen[i]) == head[i] && $0 ~ pat[i] && !seen[name[i]]++) print name[i]
	}
	' /etc/vmo/modaliases -
}

# Disk controllers probe empty ports for most of a second under TCG: load them in the
# background while the virtio devices (NICs, usually the seed) are already usable.
SLOW_MODULES="ata_piix ahci"

load_modules() {
	load $(cat /etc/vmo/modules-always)
	slow=""
	fast=""
	for name in $(modules_for_bus pci); do
		case " $SLOW_MODULES " in *" $name "*) slow="$slow $name" ;; *) fast="$fast $name" ;; esac
	done
	load $fast
	load $(modules_for_bus virtio)
	(
		load $slow
		[ -d /sys/bus/scsi ] && load sr_mod sd_mod
	) &
}

# Mounts the NoCloud seed (volume label cidata, ISO9660 or vfat) on $SEED.
# Block devices appear asynchronously after the drivers load, so poll briefly.
mount_seed() {
	tries=0
	while [ "$tries" -lt 50 ]; do
		for label in cidata CIDATA; do
			dev=$(findfs "LABEL=$label" 2>/dev/null) || continue
			if mount -o ro "$dev" "$SEED" 2>/dev/null; then
				log "seed from $dev"
				return 0
			fi
		done
		tries=$((tries + 1))
		sleep 0.1
	done
	log "no cidata seed found"
	return 1
}

# Prints the value of a top-level key of meta-data (YAML, or JSON on one line).
meta_value() {
	[ -f "$SEED/meta-data" ] || return 0
	tr '{},\r' '\n\n\n\n' < "$SEED/meta-data" | awk -v k="$1" '
	{
		sub(/^[ \t]+/, ""); key = $0; sub(/[ \t]*:.*/, "", key); gsub(/"/, "", key)
		if (key != k) next
		v = $0; sub(/^[^:]*:[ \t]*/, "", v); gsub(/^["\047]|["\047][ \t]*$/, "", v); sub(/[ \t]+$/, "", v)
		print v; exit
	}'
}

# NoCloud network-config (v1 or v2 subset) -> one line per interface:
#   <mac|-> <name|-> <addr/prefix,...|-> <gateway|-> <dhcp 0|1>
network_plan() {
	awk '
	function unq(s) { gsub(/^[ \t"\047]+|[ \t"\047]+$/, "", s); return s }
	function prefix(mask,   n, i, p, b) {
		n = split(mask, p, "."); b = 0
		for (i = 1; i <= n; i++) {
			v = p[i] + 0
			while (v > 0) { b += v % 2; v = int(v / 2) }
		}
		return b
	}
	function add(a) { a = unq(a); if (a == "") return; addrs = (addrs == "" ? a : addrs "," a); last = a }
	function flush() {
		if (open && kind != "skip")
			print (mac == "" ? "-" : tolower(mac)), (name == "" ? "-" : name), (addrs == "" ? "-" : addrs), (gw == "" ? "-" : gw), dhcp
		open = 0; kind = ""; mac = ""; name = ""; addrs = ""; gw = ""; dhcp = 0; last = ""
	}
	{
		sub(/\r$/, "")
		if ($0 ~ /^[ \t]*(#.*)?$/) next
		match($0, /^ */); ind = RLENGTH
		line = substr($0, ind + 1)
		item = 0
		if (line ~ /^- /) { item = 1; line = substr(line, 3); sub(/^ */, "", line) }
		# a key closes every open key at its indentation or deeper; "- " items sit at the dash,
		# which may be at the parent key'"'"'s own indentation (PyYAML'"'"'s indentless sequences)
		while (depth > 0 && (kind_ind[depth] > ind || (kind_ind[depth] == ind && !(item && keys[depth] == "addresses")))) depth--
		parent = (depth > 0 ? keys[depth] : "")
		if (item && parent == "config") { flush(); open = 1 }
		key = ""; val = line
		if (match(line, /^[^ :]+:( |$)/)) {
			key = substr(line, 1, RLENGTH); sub(/: *$/, "", key); sub(/:$/, "", key)
			key = unq(key)
			val = substr(line, RLENGTH + 1)
		}
		if (key != "" && parent == "ethernets") { flush(); open = 1; name = key }
		if (key != "") {
			depth++; keys[depth] = key; kind_ind[depth] = ind + (item ? 2 : 0)
		}
		if (!open) next
		val = unq(val)
		if (key == "" && item && parent == "addresses") { add(val); next }
		if (key == "type" && val == "physical") kind = "physical"
		else if (key == "type" && parent == "config" && val != "physical") kind = "skip"
		else if (key == "type" && val ~ /^dhcp/) dhcp = 1
		else if (key == "mac_address" || key == "macaddress") mac = val
		else if (key == "name" && parent == "config") name = val
		else if (key == "set-name") name = val
		else if (key == "address" && parent == "subnets") add(val)
		else if (key == "netmask" && last != "" && last !~ /\//) {
			addrs = substr(addrs, 1, length(addrs) - length(last)) last "/" prefix(val); last = ""
		}
		else if (key == "addresses" && parent != "nameservers" && val ~ /^\[/) {
			gsub(/\[|\]/, "", val); n = split(val, list, ","); for (i = 1; i <= n; i++) add(list[i])
		}
		else if ((key == "gateway" || key == "gateway4" || key == "via") && val !~ /:/ && gw == "") gw = val
		else if (key == "dhcp4" && val ~ /^(true|yes|on)$/) dhcp = 1
	}
	END { flush() }
	' "$1"
}

prefix_len() { echo "$1" | grep -q / && echo "$1" || echo "$1/24"; }

nic_macs() {
	for nic in /sys/class/net/*; do
		name=${nic##*/}
		[ "$name" = lo ] && continue
		cat "$nic/address"
	done
}

# Static addresses for a NIC from the plan, or nothing when DHCP should be used.
plan_for() { # name mac
	[ -s "$STATE/network-plan" ] || return 0
	awk -v n="$1" -v m="$2" '($1 == m || ($1 == "-" && $2 == n)) { print; exit }' "$STATE/network-plan"
}

configure_static() { # name addrs gateway
	ip link set "$1" up
	for a in $(echo "$2" | tr , ' '); do
		ip addr add "$(prefix_len "$a")" dev "$1"
	done
	[ "$3" != "-" ] && ip route add default via "$3" dev "$1" 2>/dev/null
	log "$1 static $2 gw $3"
}

network_up() {
	ip link set lo up
	[ -f "$SEED/network-config" ] && network_plan "$SEED/network-config" > "$STATE/network-plan"
	pids=""
	for nic in /sys/class/net/*; do
		name=${nic##*/}
		[ "$name" = lo ] && continue
		plan=$(plan_for "$name" "$(cat "$nic/address")")
		set -- $plan
		if [ -n "$plan" ] && [ "$3" != "-" ]; then
			configure_static "$name" "$3" "$4"
		else
			ip link set "$name" up
			# -b: keep trying in the background after ~4 s instead of blocking boot
			udhcpc -i "$name" -t 4 -T 1 -b -S -s "/init" -p "$STATE/udhcpc.$name.pid" \
				-x "hostname:$(hostname)" > /dev/null 2>&1 &
			pids="$pids $!"
		fi
	done
	[ -n "$pids" ] && wait $pids
}

dhcp_hook() { # udhcpc calls: /init <event>; we dispatch from "bound" etc.
	case "$1" in
	deconfig)
		ip addr flush dev "$interface" 2>/dev/null
		ip link set "$interface" up
		;;
	bound | renew)
		ip addr flush dev "$interface" 2>/dev/null
		ip addr add "$ip/${mask:-24}" dev "$interface"
		for r in $router; do
			ip route add default via "$r" dev "$interface" 2>/dev/null
			break
		done
		[ -n "$dns" ] && for d in $dns; do echo "nameserver $d"; done > /etc/resolv.conf
		echo "vmo-guest: $interface dhcp $ip/${mask:-24} gw $router" > /dev/console
		;;
	esac
}

# cloud-config subset (hostname, write_files, runcmd) -> a shell script.
cloud_config_script() {
	awk '
	function unq(s) { gsub(/^[ \t]+|[ \t]+$/, "", s); if (s ~ /^".*"$/ || s ~ /^\047.*\047$/) s = substr(s, 2, length(s) - 2); return s }
	function sq(s) { gsub(/\047/, "\047\\\047\047", s); return "\047" s "\047" }
	function endfile() {
		if (path != "") {
			print "mkdir -p \"$(dirname " sq(path) ")\""
			print "cat > " sq(path) " <<\047VMO_EOF\047"
			printf "%s", content
			print "VMO_EOF"
			if (perms != "") print "chmod " perms " " sq(path)
		}
		path = ""; content = ""; perms = ""; inblock = 0
	}
	{ sub(/\r$/, "") }
	inblock {
		match($0, /^ */)
		if ($0 ~ /^[ \t]*$/) { content = content "\n"; next }
		if (RLENGTH >= bind) { content = content substr($0, bind + 1) "\n"; next }
		inblock = 0
	}
	/^[^ #-][^:]*:/ {
		endfile(); section = $0; sub(/:.*/, "", section)
		if (section == "hostname") { v = $0; sub(/^[^:]*:/, "", v); print "hostname " sq(unq(v)); print "echo " sq(unq(v)) " > /etc/hostname" }
		next
	}
	section == "write_files" && /^ *- *path:/ { endfile(); v = $0; sub(/^[^:]*:/, "", v); path = unq(v); next }
	section == "write_files" && /^ *-? *permissions:/ { v = $0; sub(/^[^:]*:/, "", v); perms = unq(v); next }
	section == "write_files" && /^ *-? *content:/ {
		v = $0; sub(/^[^:]*:/, "", v); v = unq(v)
		if (v ~ /^[|>]/) { match($0, /^ */); inblock = 1; bind = RLENGTH + 2; if ($0 ~ /^ *- /) bind += 2 }
		else content = v "\n"
		next
	}
	section == "runcmd" && /^ *- / {
		v = $0; sub(/^ *- */, "", v)
		if (v ~ /^\[/) { gsub(/^\[|\]$/, "", v); n = split(v, a, ","); v = ""; for (i = 1; i <= n; i++) v = v " " sq(unq(a[i])) }
		else v = unq(v)
		print v
		next
	}
	END { endfile() }
	' "$1"
}

run_user_data() {
	ud="$SEED/user-data"
	[ -s "$ud" ] || return 0
	first=$(head -n 1 "$ud" | tr -d '\r')
	case "$first" in
	'#!'*)
		cp "$ud" "$STATE/user-data.sh" && chmod +x "$STATE/user-data.sh"
		log "running user-data script"
		"$STATE/user-data.sh" > "$STATE/user-data.log" 2>&1
		;;
	'#cloud-config'*)
		cloud_config_script "$ud" > "$STATE/cloud-config.sh"
		log "applying cloud-config"
		sh "$STATE/cloud-config.sh" > "$STATE/user-data.log" 2>&1
		;;
	*) log "user-data format not supported: $first" ;;
	esac
}

start_counter() {
	echo 0 > "$STATE/counter"
	(
		n=0
		while :; do
			sleep 1
			n=$((n + 1))
			echo "$n" > "$STATE/counter.new" && mv "$STATE/counter.new" "$STATE/counter"
		done
	) > /dev/null 2>&1 &
}

start_services() {
	# -ll keeps one listener forking a handler per connection
	nc -ll -p 5432 -e /init info > /dev/null 2>&1 &
	nc -ll -p 7 -e /init echo > /dev/null 2>&1 &
	# acpid runs /etc/acpi/PWRF/00000080 on the power button (KubeVirt's graceful stop)
	[ -d /dev/input ] || return 0
	acpid -d -c /etc/acpi > "$STATE/acpid.log" 2>&1 &
	# The ready marker promises that a power-button press is handled: a press before acpid has
	# opened the input devices would be lost (seen on a loaded host).
	acpid_pid=$!
	tries=0
	until ls -l "/proc/$acpid_pid/fd" 2>/dev/null | grep -q /dev/input/event; do
		tries=$((tries + 1))
		[ "$tries" -lt 100 ] || { log "acpid has no input device open"; break; }
		sleep 0.02
	done
}

# udev would link /dev/virtio-ports/<name> to the port QEMU named; without udev, do it here.
# Ports appear shortly after virtio_console binds, so poll for a few seconds.
agent_port() {
	[ -n "$(ls /sys/bus/virtio/drivers/virtio_console 2>/dev/null | grep '^virtio')" ] || return 1
	tries=0
	while [ "$tries" -lt 100 ]; do
		for port in /sys/class/virtio-ports/*; do
			[ "$(cat "$port/name" 2>/dev/null)" = "$AGENT_PORT" ] || continue
			[ -c "/dev/${port##*/}" ] || continue
			mkdir -p /dev/virtio-ports
			ln -sf "../${port##*/}" "/dev/virtio-ports/$AGENT_PORT"
			echo "/dev/virtio-ports/$AGENT_PORT"
			return 0
		done
		tries=$((tries + 1))
		sleep 0.1
	done
	return 1
}

# Debian's qemu-ga on the virtio-serial port, restarted if it dies; runs in the background so
# that it never delays the ready marker.
start_guest_agent() {
	[ -f /usr/lib/vmo/agent.cpio.gz ] || command -v qemu-ga > /dev/null || return 0
	(
		dev=$(agent_port) || exit 0
		unpack agent || exit 0
		# not on the console: the line would land in the middle of what a user types there
		echo "qemu-ga on $dev" >> "$STATE/qemu-ga.log"
		while :; do
			qemu-ga -m virtio-serial -p "$dev" -l "$STATE/qemu-ga.log"
			echo "qemu-ga exited ($?); restarting" >> "$STATE/qemu-ga.log"
			sleep 1
		done
	) < /dev/null > /dev/null 2>&1 &
}

addresses() {
	ip -o -4 addr show scope global | awk '{ print $4 }' | cut -d/ -f1 | tr '\n' ',' | sed 's/,$//'
}

boot() {
	mount_basics
	load_modules
	log "modules loaded"
	hostname vmo-guest
	mount_seed
	meta_host=$(meta_value local-hostname)
	[ -n "$meta_host" ] && hostname "$meta_host"
	hostname > /etc/hostname
	meta_value instance-id > "$STATE/instance-id"
	network_up
	run_user_data
	start_counter
	start_services
	start_guest_agent
	macs=$(nic_macs | tr '\n' ',' | sed 's/,$//')
	echo "VMO-GUEST-READY hostname=$(hostname) ip=$(addresses) mac=$macs" > /dev/console
}

info() {
	macs=$(nic_macs | tr '\n' ',' | sed 's/,$//')
	echo "vmo-guest $(hostname) counter=$(cat "$STATE/counter") macs=$macs"
}

case "$1" in
"") if [ $$ -eq 1 ]; then pid1; fi ;;
boot) boot ;;
deconfig | bound | renew | leasefail | nak) dhcp_hook "$1" ;;
info) info ;;
echo) exec cat ;;
modprobe) shift; modprobe_cmd "$@" ;;
power-button) log "ACPI power button: powering off"; poweroff ;;
shutdown) log "shutting down"; sync; umount -a -r 2>/dev/null ;;
*) log "unknown role: $1"; exit 2 ;;
esac
