# shellcheck shell=bash
# tap.sh: the check lines of the VM tier's scripts, sourced by each: one
# "ok - ..." or "not ok - ..." line per check, counted in PASS and FAIL.
PASS=0
FAIL=0
ok() {
	PASS=$((PASS + 1))
	echo "ok - $*"
}
not_ok() {
	FAIL=$((FAIL + 1))
	echo "not ok - $*"
}
