#!/bin/bash
# Runs the quickstart on 8 CPU host devices N times in a row and says, per run,
# whether it finished or hit the XLA:CPU collective rendezvous abort
# (docs/parallel.md, "Several devices on one CPU host"; issue 16, item 7).
#
#   benchmarks/cpu_devices_soak.sh [-n RUNS] [-d DEVICES] [-l] [-- MAIN_ARGS...]
#
#   -n RUNS     runs in a row (default 3)
#   -d DEVICES  --xla_force_host_platform_device_count (default 8)
#   -l          a concurrent CPU load during the runs: one busy-loop process
#               (`python -c 'while True: pass'`), killed at the end
#   MAIN_ARGS   extra main.py flags, e.g. --config.epochs=5 for shorter runs
#
# Every run gets a fresh --workdir under a temporary folder. XLA_FLAGS and the
# other variables of the calling shell pass through; main.py keeps a
# PJRT_NPROC that is set, so `PJRT_NPROC=8 benchmarks/cpu_devices_soak.sh -l`
# runs 8 devices on a 2-core machine with XLA's default pool of 8 threads,
# without the library's setting (parallel.configure_cpu_threads). Output: one
# line per run, then `completed: k/N`. Run it inside the project venv.
cd "$(dirname "$0")/.." || exit 1
runs=3
devices=8
load=0
while getopts "n:d:l" opt; do
  case $opt in
    n) runs=$OPTARG ;;
    d) devices=$OPTARG ;;
    l) load=1 ;;
    *) exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ "$1" = "--" ] && shift

tmp=$(mktemp -d /tmp/cpu_devices_soak.XXXXXX)
load_pid=
cleanup() {
  [ -n "$load_pid" ] && kill "$load_pid" 2>/dev/null
}
trap cleanup EXIT
if [ "$load" = 1 ]; then
  python -c 'while True: pass' &
  load_pid=$!
fi
echo "devices=$devices runs=$runs load=$load logs in $tmp" \
  "XLA_FLAGS+=${XLA_FLAGS:-} args: $*"

completed=0
for i in $(seq 1 "$runs"); do
  log=$tmp/run$i.log
  start=$(date +%s.%N)
  XLA_FLAGS="--xla_force_host_platform_device_count=$devices ${XLA_FLAGS:-}" \
    python main.py --workdir="$tmp/run$i" "$@" >"$log" 2>&1
  rc=$?
  wall=$(echo "$(date +%s.%N) - $start" | bc)
  if grep -q "rendezvous" "$log"; then rendezvous=yes; else rendezvous=no; fi
  steps=$(grep -oE "step [0-9]+/[0-9]+" "$log" | tail -1)
  [ "$rc" = 0 ] && completed=$((completed + 1))
  printf 'run %d: exit %s, %.0f s, rendezvous message: %s, last logged: %s\n' \
    "$i" "$rc" "$wall" "$rendezvous" "${steps:-none}"
done
echo "completed: $completed/$runs"
