#!/usr/bin/env bash
# db-workloads.sh -- databases on a mounted zoned filesystem, each checked
# by its own tools; runs in the VM harness guest, as root.
#
#   test/e2e/db-workloads.sh rocksdb|postgres DIR
#
# DIR is the mount point of a zoned filesystem (btrfs or f2fs), on a zq-csi
# volume (driver's TestKernelDatabases) or on a zoned null_blk (the ceiling,
# in scripts/bench-db.sh). Prints "ok - ..."/"not ok - ..." per check and
# "# figure: NAME VALUE UNIT" per measured figure; exits 1 if a check
# failed.
#
# rocksdb (Debian's rocksdb-tools): db_bench fillseq, overwrite, compact and
#   readrandom with checksum verification, every key found; then db_bench
#   killed with SIGKILL in the middle of synchronous overwrites; the
#   database must reopen, pass verifychecksum and ldb checkconsistency, and
#   still hold every key.
# postgres (Debian's PostgreSQL 15): initdb with data checksums, pgbench -i
#   and a timed run; the postmaster killed with SIGKILL right after it (no
#   checkpoint since), restarted: every transaction pgbench counted as
#   committed has its pgbench_history row. Then killed in the middle of a
#   second run: it recovers and pg_amcheck finds nothing wrong.
set -uo pipefail

workload=${1:?usage: db-workloads.sh rocksdb|postgres DIR}
dir=${2:?usage: db-workloads.sh rocksdb|postgres DIR}
FAIL=0
# the databases' own logs, outside DIR: they must outlive a filesystem
# that failed
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
ok() { echo "ok - $*"; }
not_ok() {
	echo "not ok - $*"
	FAIL=$((FAIL + 1))
}
figure() { echo "# figure: $*"; }
# rate OUTPUT BENCH: db_bench's ops/sec for BENCH
rate() { sed -n "s/^$2 *:.* \([0-9]*\) ops\/sec.*/\1/p" <<<"$1" | head -n 1; }

rocksdb() {
	local db=$dir/rocksdb n=100000 out pid
	local common=(--db="$db" --num=$n --value_size=100 --compression_type=none --seed=1)
	if out=$(db_bench "${common[@]}" --benchmarks=fillseq,overwrite,compact,readrandom --reads=$n --verify_checksum=1 2>&1); then
		ok "rocksdb: db_bench fillseq,overwrite,compact,readrandom"
	else
		not_ok "rocksdb: db_bench: $(tail -n 5 <<<"$out")"
	fi
	if grep -q "($n of $n found)" <<<"$out"; then
		ok "rocksdb: readrandom with --verify_checksum found all $n keys"
	else
		not_ok "rocksdb: readrandom: $(grep '^readrandom' <<<"$out")"
	fi
	figure "rocksdb-fillseq $(rate "$out" fillseq) ops/s"
	figure "rocksdb-overwrite $(rate "$out" overwrite) ops/s"
	figure "rocksdb-readrandom $(rate "$out" readrandom) ops/s"

	# SIGKILL in the middle of synchronous (WAL-fsynced) overwrites.
	db_bench "${common[@]}" --use_existing_db=1 --benchmarks=overwrite --sync=1 --duration=120 >"$logs/killed.log" 2>&1 &
	pid=$!
	sleep 8
	if kill -0 "$pid" 2>/dev/null; then
		kill -9 "$pid"
		ok "rocksdb: db_bench killed (SIGKILL) in the middle of synchronous overwrites"
	else
		not_ok "rocksdb: the synchronous overwrite ended before it was killed: $(tail -n 3 "$logs/killed.log")"
	fi
	wait "$pid" 2>/dev/null
	if out=$(db_bench "${common[@]}" --use_existing_db=1 --benchmarks=verifychecksum,readrandom --reads=$n --verify_checksum=1 2>&1) &&
		grep -q "($n of $n found)" <<<"$out"; then
		ok "rocksdb: after the kill the database opens, verifies its checksums and holds all $n keys"
	else
		not_ok "rocksdb: reopening after the kill: $(tail -n 5 <<<"$out")"
	fi
	if out=$(ldb --db="$db" checkconsistency 2>&1) && [[ $out == OK* ]]; then
		ok "rocksdb: ldb checkconsistency"
	else
		not_ok "rocksdb: ldb checkconsistency: $out"
	fi
}

postgres() {
	local bin=/usr/lib/postgresql/15/bin data=$dir/pg out n count pid
	[[ -x $bin/postgres ]] || {
		not_ok "postgres: $bin/postgres not found (Debian's postgresql-15)"
		return
	}
	as_pg() { runuser -u postgres -- "$@"; }
	# the server on a unix socket in /tmp only; dynamic shared memory in
	# the data directory (the guest may have no /dev/shm)
	start() { as_pg "$bin/pg_ctl" -D "$data" -l "$logs/pg.log" -w -t 300 -o "-k /tmp -c listen_addresses= -c dynamic_shared_memory_type=mmap" start >/dev/null 2>&1; }
	sql() { as_pg "$bin/psql" -h /tmp -At -d postgres -c "$1"; }
	chown postgres: "$dir" "$logs"
	if as_pg "$bin/initdb" -D "$data" --data-checksums -A trust >"$logs/initdb.log" 2>&1 && start; then
		ok "postgres: initdb --data-checksums and start"
	else
		not_ok "postgres: initdb or start: $(tail -n 5 "$logs/initdb.log" "$logs/pg.log" 2>/dev/null)"
		return
	fi
	if out=$(as_pg "$bin/pgbench" -h /tmp -i -s 4 postgres 2>&1); then ok "postgres: pgbench -i -s 4"; else not_ok "postgres: pgbench -i: $(tail -n 3 <<<"$out")"; fi
	out=$(as_pg "$bin/pgbench" -h /tmp -c 2 -T 15 postgres 2>&1)
	n=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out")
	if [[ -n $n ]] && ((n > 0)); then ok "postgres: pgbench -c 2 -T 15: $n transactions"; else not_ok "postgres: pgbench run: $(tail -n 5 <<<"$out")"; fi
	figure "postgres-pgbench $(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out" | head -n 1) tps"

	# SIGKILL of the postmaster right after the run: no checkpoint since,
	# the commits live in the WAL only.
	pid=$(head -n 1 "$data/postmaster.pid")
	kill -9 "$pid"
	while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
	pkill -9 -u postgres postgres 2>/dev/null
	sleep 1
	if start; then ok "postgres: restarts after SIGKILL (crash recovery)"; else not_ok "postgres: restart after SIGKILL: $(tail -n 5 "$logs/pg.log")"; fi
	count=$(sql "select count(*) from pgbench_history")
	expect_eq "postgres: every committed pgbench transaction has its history row after SIGKILL" "${n:-?}" "$count"

	# SIGKILL in the middle of a run
	# (-n: no vacuum first, which would empty pgbench_history)
	as_pg "$bin/pgbench" -h /tmp -n -c 2 -T 60 postgres >"$logs/killed.log" 2>&1 &
	sleep 10
	pid=$(head -n 1 "$data/postmaster.pid")
	kill -9 "$pid"
	while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
	pkill -9 -u postgres postgres 2>/dev/null
	wait
	sleep 1
	if start; then ok "postgres: recovers after SIGKILL in the middle of pgbench"; else not_ok "postgres: restart after the second SIGKILL: $(tail -n 5 "$logs/pg.log")"; fi
	count=$(sql "select count(*) from pgbench_history")
	if [[ $count =~ ^[0-9]+$ ]] && ((count >= ${n:-0})); then ok "postgres: history rows kept ($count >= $n)"; else not_ok "postgres: history rows $count after the second kill, $n before"; fi
	if out=$(as_pg "$bin/pg_amcheck" -h /tmp --install-missing --heapallindexed -d postgres 2>&1); then
		ok "postgres: pg_amcheck --heapallindexed finds nothing wrong"
	else
		not_ok "postgres: pg_amcheck: $(tail -n 5 <<<"$out")"
	fi
	as_pg "$bin/pg_ctl" -D "$data" -m fast -w stop >/dev/null || not_ok "postgres: stop"
}

expect_eq() {
	if [[ $2 == "$3" ]]; then ok "$1 ($3)"; else not_ok "$1: want $2, got $3"; fi
}

# diagnose: what a failed run needs to be understood, printed once
diagnose() {
	echo "# --- diagnosis: the kernel's last messages"
	dmesg | tail -n 90 | sed 's/^/# /'
	echo "# --- df $dir"
	df -h "$dir" | sed 's/^/# /'
	for f in "$logs"/*.log; do
		[[ -s $f ]] || continue
		echo "# --- $f"
		tail -n 15 "$f" | sed 's/^/# /'
	done
}

case $workload in
rocksdb) rocksdb ;;
postgres) postgres ;;
*)
	echo "db-workloads.sh: unknown workload $workload (rocksdb or postgres)" >&2
	exit 2
	;;
esac
((FAIL == 0)) || diagnose
((FAIL == 0))
