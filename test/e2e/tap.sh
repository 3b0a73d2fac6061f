# shellcheck shell=bash
# tap.sh: the check lines of the VM tier's scripts, sourced by each: one
# "ok - ..." or "not ok - ..." line per check, counted in PASS and FAIL.
# expect NAME WANT GOT: a check that GOT is WANT, saying what it got.
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
expect() {
	if [[ $3 == "$2" ]]; then ok "$1: $3"; else not_ok "$1: want '$2', got '$3'"; fi
}
