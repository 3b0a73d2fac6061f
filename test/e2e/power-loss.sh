#!/usr/bin/env bash
# power-loss.sh -- the whole guest loses power under two databases on zq-csi
# Filesystem volumes, boots again, and stages the same volumes.
#
#   test/e2e/power-loss.sh
#
# First boot: `zq-csi serve` with its pool and state on a host directory
# shared into the guest; through the CSI API (test/e2e/csictl) a btrfs
# volume holding PostgreSQL, into which a client commits numbered rows and
# writes each number to a host file once the commit is acknowledged, and an
# f2fs volume into which a loop writes files, fsyncs each and its directory,
# and then notes its name and checksum on the host. Once both have
# acknowledged enough, the host kills QEMU: the guest's kernel, page cache,
# ublk devices and the plugin with every write it had not flushed are gone.
# (The image files are on the host, which does not lose power: what the
# plugin had written to them stays; power cuts of the image file itself are
# the crash tier's, make crash.)
# Second boot: a new plugin drops the records of devices the reboot took;
# the images pass btrfs check and fsck.f2fs untouched; staging them again
# mounts them without formatting; PostgreSQL recovers with every
# acknowledged row present and pg_amcheck clean; every acknowledged file
# has its checksum. Prints "ok"/"not ok" per check and exits 1 if any
# failed. Needs Debian's PostgreSQL 15 (vm.sh installs it).
set -euo pipefail
E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$E2E_DIR/../.." && pwd -P)
FAIL=0
ok() { echo "ok - $*"; }
not_ok() {
	echo "not ok - $*"
	FAIL=$((FAIL + 1))
}

if [[ ${1:-} != --guest ]]; then
	# A directory of its own, outside the repository: its path names this
	# guest's QEMU on the host's process list.
	share=$(mktemp -d /var/tmp/zq-power.XXXXXX)
	share=$(cd "$share" && pwd -P)
	vm_pid=
	trap '[[ -n $vm_pid ]] && kill "$vm_pid" 2>/dev/null; rm -rf "$share"' EXIT
	(cd "$REPO_DIR" && go build -o "$share/zq-csi" ./cmd/zq-csi && go build -o "$share/csictl" ./test/e2e/csictl)
	export ZQ_VM_SHARES=$share ZQ_VM_MEM=${ZQ_VM_MEM:-3072}
	"$E2E_DIR/vm.sh" -- bash "$E2E_DIR/power-loss.sh" --guest write "$share" >"$share/write.log" 2>&1 &
	vm_pid=$!
	acked() { if [[ -f $share/$1 ]]; then wc -l <"$share/$1"; else echo 0; fi; }
	for ((i = 0; i < 900; i++)); do
		(($(acked pg.acked) >= 300 && $(acked files.acked) >= 30)) && break
		kill -0 "$vm_pid" 2>/dev/null || break
		sleep 1
	done
	commits=$(acked pg.acked) files=$(acked files.acked)
	if pkill -9 -f -- "path=$share,"; then
		ok "power cut: QEMU killed after $commits acknowledged commits and $files acknowledged files"
	else
		not_ok "power cut: no QEMU to kill (the first boot ended): $(tail -n 20 "$share/write.log")"
	fi
	wait "$vm_pid" 2>/dev/null || true
	vm_pid=
	((commits >= 300 && files >= 30)) || not_ok "the workloads acknowledged $commits commits and $files files in 15 minutes (want 300 and 30): $(tail -n 20 "$share/write.log")"
	rc=0
	"$E2E_DIR/vm.sh" -- bash "$E2E_DIR/power-loss.sh" --guest check "$share" || rc=$?
	((rc == 0 && FAIL == 0))
	exit
fi

# the guest: checks go on after a failure, each says what went wrong
set +e
phase=$2 dir=$3
sock=/tmp/csi.sock
pgbin=/usr/lib/postgresql/15/bin
# f2fs's volume has an open/active zone limit, btrfs's none: under one, the
# kernel's btrfs (6.12) aborts its transaction under fsync-heavy load
# (README, "Filesystem volumes")
f2fs_limits=(zone.max_open_zones=8 zone.max_active_zones=8)
ctl() { "$dir/csictl" -endpoint "unix://$sock" "$@"; }
as_pg() { runuser -u postgres -- "$@"; }
pg_start() { as_pg "$pgbin/pg_ctl" -D /tmp/pg/data -l /tmp/pg.log -w -t 600 -o "-k /tmp -c listen_addresses= -c dynamic_shared_memory_type=mmap" start >/dev/null 2>&1; }
sql() { as_pg "$pgbin/psql" -h /tmp -At -d postgres -c "$1"; }

"$dir/zq-csi" serve --endpoint "unix://$sock" --node-id vm-node --pool "$dir/pool" --state-dir "$dir/state" -v 2 2>"$dir/plugin-$phase.log" &
for ((i = 0; i < 300; i++)); do
	[[ -S $sock ]] && break
	sleep 0.1
done

if [[ $phase == write ]]; then
	set -e # a failed step ends the boot: the host sees nothing acknowledged
	pg=$(ctl -fstype btrfs create pvc-pg $((1 << 30)) zone.size=16Mi)
	files=$(ctl -fstype f2fs create pvc-files $((1 << 30)) zone.size=16Mi "${f2fs_limits[@]}" zone.conventional_zones=3)
	echo "$pg $files" >"$dir/ids"
	ctl -fstype btrfs stage "$pg" /tmp/pg-staging /tmp/pg
	ctl -fstype f2fs stage "$files" /tmp/files-staging /tmp/files
	chown postgres: /tmp/pg
	as_pg "$pgbin/initdb" -D /tmp/pg/data -A trust >"$dir/initdb.log" 2>&1
	pg_start
	sql "create table acked (id int primary key, pad text)" >/dev/null
	set +e
	# Files: written, fsynced with their directory, then noted.
	(
		for ((i = 1; ; i++)); do
			head -c $((256 << 10)) /dev/urandom >"/tmp/files/f$i"
			sync "/tmp/files/f$i" /tmp/files
			echo "f$i $(sha256sum <"/tmp/files/f$i" | cut -d' ' -f1)" >>"$dir/files.acked"
		done
	) &
	# Rows: one psql session; a number is noted once its INSERT (a commit
	# of its own) has answered.
	coproc PSQL { as_pg "$pgbin/psql" -h /tmp -At -q -d postgres; }
	for ((i = 1; ; i++)); do
		echo "insert into acked values ($i, repeat('x', 2000)) returning id;" >&"${PSQL[1]}"
		read -r id <&"${PSQL[0]}" || break
		echo "$id" >>"$dir/pg.acked"
	done
	echo "psql ended" >&2
	sleep infinity
fi

# ---- check: after the power cut
read -r pg files <"$dir/ids"
# fsck_image ID CMD...: attach the volume's image, run CMD DEVICE, detach
fsck_image() {
	local id=$1 dev out attach
	shift
	"$dir/zq-csi" attach --frontend ublk "$dir/pool/$id.qcow2" >/tmp/dev 2>/tmp/attach.log &
	attach=$!
	for ((i = 0; i < 300; i++)); do
		[[ -s /tmp/dev ]] && break
		sleep 0.1
	done
	dev=$(</tmp/dev)
	if out=$("$@" "$dev" 2>&1) && ! grep -q '\[Fail\]' <<<"$out"; then
		ok "$* on the volume after the power cut"
	else
		not_ok "$* after the power cut: $(tail -n 10 <<<"$out")"
	fi
	"$dir/zq-csi" detach "$dev"
	wait "$attach" || not_ok "zq-csi attach of $id: $(cat /tmp/attach.log)"
	rm -f /tmp/dev
}
fsck_image "$pg" btrfs check --readonly
if grep -q "device is gone; forgetting the record" "$dir/plugin-check.log"; then
	ok "the new plugin forgot the records of the devices the power cut took"
else
	not_ok "the new plugin did not drop the old records: $(tail -n 5 "$dir/plugin-check.log")"
fi
if ctl -fstype btrfs stage "$pg" /tmp/pg-staging /tmp/pg && ctl -fstype f2fs stage "$files" /tmp/files-staging /tmp/files; then
	ok "both volumes staged again"
else
	not_ok "staging again: $(tail -n 5 "$dir/plugin-check.log")"
	exit 1
fi
if grep -q "formatting a new Filesystem volume" "$dir/plugin-check.log"; then
	not_ok "the plugin formatted a volume that holds a filesystem"
else
	ok "neither volume formatted again"
fi
if pg_start; then ok "PostgreSQL recovers on the btrfs volume"; else not_ok "PostgreSQL start: $(tail -n 10 /tmp/pg.log)"; fi
sql "select id from acked order by id" >/tmp/present
sort -n "$dir/pg.acked" >/tmp/acked
missing=$(comm -23 /tmp/acked /tmp/present | wc -l)
if ((missing == 0)) && [[ -s /tmp/acked ]]; then
	ok "every acknowledged commit is present ($(wc -l </tmp/acked) acknowledged, $(wc -l </tmp/present) rows)"
else
	not_ok "$missing of $(wc -l </tmp/acked) acknowledged commits missing after the power cut"
fi
if out=$(as_pg "$pgbin/pg_amcheck" -h /tmp --install-missing --heapallindexed -d postgres 2>&1); then
	ok "pg_amcheck --heapallindexed finds nothing wrong"
else
	not_ok "pg_amcheck: $(tail -n 5 <<<"$out")"
fi
as_pg "$pgbin/pg_ctl" -D /tmp/pg/data -m fast -w stop >/dev/null 2>&1
bad=0
while read -r name sum; do
	[[ $(sha256sum <"/tmp/files/$name" 2>/dev/null | cut -d' ' -f1) == "$sum" ]] || bad=$((bad + 1))
done <"$dir/files.acked"
if ((bad == 0)); then
	ok "every acknowledged file on f2fs has its checksum ($(wc -l <"$dir/files.acked") files)"
else
	not_ok "$bad of $(wc -l <"$dir/files.acked") acknowledged files on f2fs missing or changed"
fi
# Unstaged before the guest powers off: a device left without its plugin
# would hold up the shutdown.
ctl unstage "$pg" /tmp/pg-staging /tmp/pg || not_ok "unstaging the btrfs volume"
ctl unstage "$files" /tmp/files-staging /tmp/files || not_ok "unstaging the f2fs volume"
# f2fs rolls its log forward when it mounts after a power cut: once that is
# done and the volume unmounted, its checker must find it consistent.
fsck_image "$files" fsck.f2fs --dry-run
echo "$FAIL failed"
((FAIL == 0))
