# shellcheck shell=bash
# storage-e2e.sh: Kubernetes' external storage e2e suite on zq-csi (issue
# 17, step 5), sourced by node-up.sh in the guest once the chart is
# installed with the class zq-csi-e2e. e2e.test (scripts/kube-tools.sh e2e,
# from test/kube/e2esuite) runs with the driver definition
# test/kube/e2e-driver.yaml; the specs that do not apply to zq-csi are left
# out by test/kube/e2e-skip.tsv, each with its reason, and all the others
# run (under TCG on 2 cores, about 5 minutes). Each spec that ran is a
# check; those that did not are counted by reason, and listed one by one in
# $work/logs/e2e-skipped.tsv.

e2e_logs=$work/logs
reasons=$root/test/kube/e2e-skip.tsv
# ZQ_KUBE_E2E_ALL=1: the specs left out for time only run too
keep=$'^$'
[[ ${ZQ_KUBE_E2E_ALL:-0} == 1 ]] && keep=$'\ttime:'
skip=$(grep -v -e '^#' -e '^$' "$reasons" | grep -v -e "$keep" | cut -f1 | paste -sd '|')
# the suite's specs for this driver (the binary holds a few others)
scope='External Storage \[Driver: zq-csi.io\]'
# ZQ_KUBE_E2E_FOCUS=REGEX: only the specs of this driver that match it;
# ZQ_KUBE_E2E_TIMEOUT: the whole suite's limit (a Go duration, 4h)
focus=$scope
[[ -n ${ZQ_KUBE_E2E_FOCUS:-} ]] && focus="$scope.*(${ZQ_KUBE_E2E_FOCUS})"
t0=$SECONDS
e2e.test --kubeconfig "$KUBECONFIG" --storage.testdriver "$root/test/kube/e2e-driver.yaml" --repo-root "$root" \
	--ginkgo.focus "$focus" --ginkgo.skip "$skip" --ginkgo.timeout "${ZQ_KUBE_E2E_TIMEOUT:-4h}" --ginkgo.no-color \
	--ginkgo.json-report "$e2e_logs/e2e-report.json" >"$e2e_logs/e2e.log" 2>&1 || true
echo "# storage e2e: e2e.test ran for $((SECONDS - t0))s (its output: $e2e_logs/e2e.log in the guest)"
if [[ -s $e2e_logs/e2e-report.json ]]; then
	# (into a file: the guest's /dev has no /dev/fd for a process substitution)
	e2ereport --scope "$scope" --reasons "$reasons" \
		--skipped "$e2e_logs/e2e-skipped.tsv" "$e2e_logs/e2e-report.json" >"$e2e_logs/e2e-checks" || true
	passed=0
	while IFS= read -r line; do
		case $line in
		"ok - "*) ok "storage e2e: ${line#ok - }" && passed=$((passed + 1)) ;;
		"not ok - "*) not_ok "storage e2e: ${line#not ok - }" ;;
		*) echo "$line" ;;
		esac
	done <"$e2e_logs/e2e-checks"
	((passed > 0)) || not_ok "storage e2e: no spec passed"
else
	not_ok "storage e2e: e2e.test wrote no report: $(tail -n 20 "$e2e_logs/e2e.log")"
fi
