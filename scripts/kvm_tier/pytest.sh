#!/usr/bin/env bash
# scripts/kvm_tier/pytest.sh [PYTEST ARGS...] — run the tests marked `rwp` inside the Linux 7.3 VM.
#
# The selection is collected on the host (fast): only the files holding `rwp` tests are imported in
# the VM, where every file read crosses 9p under TCG. Extra arguments go to pytest in the VM. Status:
# pytest's; 0 with a SKIP line when run.sh reports 77 (QEMU or the kernel packages cannot be had).
#
#   RWP_TESTS   paths to collect from [tests]
#   RWP_TIME_SCALE   TIERMEM_TEST_TIME_SCALE inside the VM [10]
#   RWP_ALL          1: every rwp test; by default the heaviest files (benchmarks, the backend's process-guest
#                    suite, the demo: minutes each under TCG) are left to `make test-rwp-all`, so CI stays in budget
#   KVM_TIER_TIMEOUT the whole tier's limit, boot included, s [1200]
set -euo pipefail
export KVM_TIER_TIMEOUT=${KVM_TIER_TIMEOUT:-1200}
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY=${PY:-$PWD/.venv/bin/python}
[ -x "$PY" ] || { echo "kvm-tier: no $PY (run make setup-test)" >&2; exit 125; }
# shellcheck disable=SC2086
files=$("$PY" -m pytest --collect-only -q -m rwp -p no:cacheprovider ${RWP_TESTS:-tests} 2>/dev/null |
	sed -n 's/::.*//p' | sort -u)
# The heavy files: each of their tests boots process guests that take minutes under TCG.
HEAVY="tests/e2e/test_bench_uffd.py tests/e2e/test_uffd_backend.py tests/integration/test_demo.py"
if [ "${RWP_ALL:-0}" != 1 ] && [ -z "${RWP_TESTS:-}" ]; then
	files=$(for f in $files; do case " $HEAVY " in *" $f "*) ;; *) echo "$f" ;; esac; done)
fi
[ -n "$files" ] || { echo "kvm-tier: no test is marked rwp under ${RWP_TESTS:-tests}" >&2; exit 1; }
echo "[kvm-tier] rwp tests in: $(echo $files)" >&2
rc=0
# shellcheck disable=SC2086
scripts/kvm_tier/run.sh env TIERMEM_TEST_TIME_SCALE="${RWP_TIME_SCALE:-10}" \
	"$PY" -m pytest -p no:cacheprovider -m rwp -v -rs --durations=0 --durations-min=1 "$@" $files || rc=$?
if [ "$rc" = 77 ]; then
	echo "[kvm-tier] SKIPPED: the kernel-VM tier cannot run on this machine (reason above)" >&2
	exit 0
fi
exit "$rc"
