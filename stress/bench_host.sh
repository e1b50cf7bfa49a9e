#!/usr/bin/env bash
# The multi-core numbers of README.md and docs/dataplane.md, for one host:
#
#   stress/bench_host.sh PART OUTDIR      (PART: dataplane | api | api-large | quant | hosts)
#
# dataplane  the data plane alone over loopback TCP: I/O threads off and on, K = 1..16,
#            against gloo in the same harness (stress/bench_dataplane.py)
# api        through the public API (pccl bench allreduce --tcp-only --algorithm ring),
#            N = 2, 4, 8 at 16M and 64M elements, side by side with gloo
# api-large  the same at 256M elements
# quant      uint8 against float32 through the API, N = 2 and 4 at 64M
# hosts      every peer in its own network namespace over unshaped veth links (needs root)
#
# Every command stops by itself (each tool has its own time limit). Output: one .txt per
# step in OUTDIR, and everything on stdout.
set -u
part=${1:?PART: dataplane | api | api-large | quant | hosts}
out=${2:-bench-out}
py=${PY:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
run() {  # run NAME CMD...: stdout and a copy in OUTDIR/NAME.txt, noise filtered
    local name=$1
    shift
    echo "## $*"
    "$@" 2>&1 | grep -v -e '^\[W' -e '^#   (' | tee "$out/$name.txt"
}
dp="$py stress/bench_dataplane.py --tcp-only --algorithms ring --reps 5 --sizes 16M 64M"
api="$py -m pccl_py bench allreduce --tcp-only --algorithm ring --compare gloo --repeat 5"
case $part in
dataplane)
    run dp-loop $dp --world 2 4 --io-threads off --streams 4
    run dp-threads $dp --world 2 4 --io-threads on --streams 4 8
    run dp-streams $dp --world 2 --io-threads on --streams 1 2 16
    run dp-gloo $dp --world 2 4 --backend gloo
    ;;
api)
    for n in 2 4 8; do run "api-n$n" $api --world $n --sizes 16M,64M; done
    run api-n2-loop $api --world 2 --sizes 16M,64M --io-threads off
    ;;
api-large)
    for n in 2 4 8; do run "api-large-n$n" $api --world $n --sizes 256M --repeat 3; done
    ;;
quant)
    for n in 2 4; do
        run "quant-n$n-f32" $py -m pccl_py bench allreduce --tcp-only --algorithm ring --world $n --sizes 64M --repeat 5
        run "quant-n$n-u8" $py -m pccl_py bench allreduce --tcp-only --world $n --sizes 64M --repeat 5 --quant uint8
    done
    ;;
hosts)
    for n in 2 4; do
        run "hosts-n$n" $py stress/hosts.py --peers $n --rate none --sizes 16M,64M --repeat 5 --compare gloo
    done
    ;;
*)
    echo "unknown part $part" >&2
    exit 2
    ;;
esac
