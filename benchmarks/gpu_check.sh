#!/usr/bin/env bash
# gpu_check.sh: one device run of specdiff_ext on an H100 / H200 with no network.
#
# Steps (each under `timeout`; a failed step does not stop the others):
#   0 environment   GPU, driver, nvcc, python, torch, compute-sanitizer
#   1 wheels        .whl/*.whl -> /tmp/site (FlashInfer + apache-tvm-ffi, see
#                   benchmarks/fetch_flashinfer.py); FlashInfer's sampling module is JIT-built
#                   in the background while the next steps run
#   2 build         pip install . for the present card; ptxas registers / spills of each kernel
#   3 build_info    specdiff_ext.build_info()
#   4 tests         pytest -m cuda python_tests                 } side by side
#   5 sanitizers    compute-sanitizer memcheck, racecheck and    } over benchmarks/sanitize_case.py
#                   initcheck (our kernels only)
#   6 bench         benchmarks/bench_ops.py --device cuda (+ FlashInfer when it built)
#   7 summary       a short table, printed last
#
# Usage, from the repo root of a checkout:   bash benchmarks/gpu_check.sh
# Environment:
#   OUT               results folder: gpu_check.log (the full log), bench_cuda.json
#                     (default /tmp/gpu_check_out)
#   GPU_CHECK_BUDGET  seconds for the whole run (default 560); later steps get what is left
#   SPECDIFF_CUDA_ARCHS  default: the card's compute capability (90 on Hopper)
#   BENCH_ARGS        extra arguments for bench_ops.py (e.g. "--ops verify --G 8")
#   SKIP_BUILD=1      use the specdiff_ext already importable (no pip install)
#   SANITIZER_TOOLS   default "memcheck racecheck initcheck"; SANITIZER_ALL_KERNELS=1 also
#                     instruments torch's kernels
set -u -o pipefail

T0=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-560}
DEADLINE=$((T0 + BUDGET))
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
RES=${OUT:-/tmp/gpu_check_out}
mkdir -p "$RES"
W=/tmp/gpu_check_work
rm -rf "$W" && mkdir -p "$W"
LOG=$RES/gpu_check.log
: >"$LOG"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
NPROC=$(nproc 2>/dev/null || echo 8)

say() { echo "$*" | tee -a "$LOG"; }
elapsed() { echo $(($(date +%s) - T0)); }
# limit MAX [RESERVE]: seconds a step may take: MAX, or less so that RESERVE s remain after it
limit() {
  local l=$((DEADLINE - $(date +%s) - ${2:-0}))
  ((l > $1)) && l=$1
  ((l < 5)) && l=5
  echo "$l"
}
# append FILE to the full log under a header
keep() { { echo "----- $1"; cat "$2" 2>/dev/null; echo; } >>"$LOG"; }
rc_of() { cat "$W/$1.rc" 2>/dev/null || echo "not run"; }

# ---------------------------------------------------------------------------------------------
say "== 0 environment ($(date -u +%H:%M:%S) UTC; budget ${BUDGET} s)"
if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then
    CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null; then
    CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
  else
    CUDA_HOME=/usr/local/cuda
  fi
fi
export CUDA_HOME
export PATH="$CUDA_HOME/bin:$(dirname "$($PY -c 'import sys; print(sys.executable)')"):$PATH"
SAN=$(command -v compute-sanitizer || ls "$CUDA_HOME"/compute-sanitizer/compute-sanitizer 2>/dev/null | head -1)
CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
[ -z "$CAP" ] && CAP=$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)
ARCH=${SPECDIFF_CUDA_ARCHS:-${CAP/./}}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.sm,clocks.mem --format=csv,noheader
  echo "nvcc: $(nvcc --version 2>/dev/null | tail -1) ($CUDA_HOME)"
  echo "compute-sanitizer: ${SAN:-not found} $($SAN --version 2>/dev/null | tail -1)"
  timeout 60 $PY -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")'
  echo "arch: ${ARCH:-unknown}; cores: $NPROC"
} 2>&1 | tee -a "$LOG"

# ---------------------------------------------------------------------------------------------
say "== 1 wheels"
FI_PID=""
if ls .whl/*.whl >/dev/null 2>&1; then
  if timeout 120 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >"$W/wheels.log" 2>&1; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    say "installed into /tmp/site: $(cd .whl && ls *.whl | tr '\n' ' ')"
    # FlashInfer JIT: cache under /tmp, the card's arch, cuRAND headers and libcuda where found
    export FLASHINFER_WORKSPACE_BASE=/tmp/fi_ws FLASHINFER_CUDA_ARCH_LIST=${CAP:-9.0}
    CURAND_INC=""
    for d in "$CUDA_HOME/include" \
      $($PY -c 'import importlib.util as u; s = u.find_spec("nvidia"); print(" ".join(p + "/cu13/include " + p + "/curand/include" for p in (s.submodule_search_locations if s else [])))' 2>/dev/null) \
      "$ROOT/.whl/curand_include"; do
      if [ -f "$d/curand.h" ]; then CURAND_INC=$d; break; fi
    done
    if [ -n "$CURAND_INC" ] && [ "$CURAND_INC" != "$CUDA_HOME/include" ]; then
      export FLASHINFER_EXTRA_CUDAFLAGS="-I$CURAND_INC"
    fi
    if [ ! -e "$CUDA_HOME/lib64/stubs/libcuda.so" ] && [ ! -e "$CUDA_HOME/lib64/libcuda.so" ]; then
      LIBCUDA=$(ldconfig -p 2>/dev/null | awk '/libcuda\.so(\.1)? /{print $NF; exit}')
      [ -z "$LIBCUDA" ] && LIBCUDA=$(ls /usr/local/nvidia/lib64/libcuda.so* /usr/lib/x86_64-linux-gnu/libcuda.so* 2>/dev/null | head -1)
      if [ -n "$LIBCUDA" ]; then
        mkdir -p /tmp/fi_libcuda && ln -sf "$LIBCUDA" /tmp/fi_libcuda/libcuda.so
        export FLASHINFER_EXTRA_LDFLAGS="-L/tmp/fi_libcuda"
      fi
    fi
    say "flashinfer JIT: curand.h in ${CURAND_INC:-NOT FOUND}; extra cuda flags '${FLASHINFER_EXTRA_CUDAFLAGS:-}'; ldflags '${FLASHINFER_EXTRA_LDFLAGS:-}'"
    (
      MAX_JOBS=$NPROC timeout -k 10 "$(limit 400 60)" $PY -c '
import time
t = time.time()
import flashinfer, flashinfer.sampling
from flashinfer.jit.sampling import gen_sampling_module
gen_sampling_module().build(verbose=False)
print(f"flashinfer {flashinfer.__version__}: sampling module built in {time.time() - t:.0f} s")
' >"$W/fi_jit.log" 2>&1
      echo $? >"$W/fi_jit.rc"
    ) &
    FI_PID=$!
  else
    say "wheel install FAILED (rc $?):"; tail -5 "$W/wheels.log" | tee -a "$LOG"
  fi
else
  say "no .whl/: FlashInfer comparison off"
fi

# ---------------------------------------------------------------------------------------------
say "== 2 build (SPECDIFF_CUDA_ARCHS=$ARCH) at $(elapsed) s"
if [ "${SKIP_BUILD:-0}" = 1 ]; then
  say "SKIP_BUILD=1: using the specdiff_ext already importable"
  echo skipped >"$W/build.rc"
else
  SPECDIFF_CUDA=ON SPECDIFF_CUDA_ARCHS=$ARCH CMAKE_BUILD_PARALLEL_LEVEL=$NPROC \
    timeout -k 10 "$(limit 300 200)" $PY -m pip install --no-build-isolation --no-deps -v . \
    >"$W/build.log" 2>&1
  echo $? >"$W/build.rc"
  keep "build log" "$W/build.log"
  say "build rc $(rc_of build) in $(elapsed) s"
  [ "$(rc_of build)" != 0 ] && grep -E "error|Error|FAILED" "$W/build.log" | head -20 | tee -a "$LOG"
  # Run everything from the checkout: give its package the freshly built _C (the installed copy
  # is shadowed by ./specdiff_ext when python runs from the repo root).
  INST=$(cd /tmp && $PY -c 'import os, specdiff_ext._C as c; print(os.path.dirname(c.__file__))' 2>/dev/null)
  if [ -n "$INST" ] && [ "$INST" != "$ROOT/specdiff_ext" ]; then
    cp -f "$INST"/_C*.so "$ROOT/specdiff_ext/" && say "copied $(cd "$INST" && ls _C*.so) into ./specdiff_ext"
  fi
fi
# ptxas resource report of every kernel: registers, stack, spills
$PY - "$W/build.log" >"$W/ptxas.txt" 2>&1 <<'EOF'
import re, subprocess, sys
try:
    text = open(sys.argv[1], errors="replace").read()
except OSError:
    text = ""
fn, arch, rows = None, "", {}
for line in text.splitlines():
    m = re.search(r"Compiling entry function '([^']+)' for '(\w+)'", line)
    if m:
        fn, arch = m.group(1), m.group(2)
        continue
    m = re.search(r"Function properties for (\S+)", line)
    if m:
        fn = m.group(1)
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and fn:
        rows.setdefault((fn, arch), {}).update(stack=int(m.group(1)), st=int(m.group(2)), ld=int(m.group(3)))
        continue
    m = re.search(r"Used (\d+) registers", line)
    if m and fn:
        rows.setdefault((fn, arch), {})["regs"] = int(m.group(1))
names = [f for f, _ in rows]
try:
    dem = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
except OSError:
    dem = names
spills = 0
print(f"{'kernel':<72} {'arch':>6} {'regs':>4} {'stack':>5} {'spill st/ld':>11}")
for (key, r), d in zip(rows.items(), dem + names[len(dem):]):
    sp = r.get("st", 0) + r.get("ld", 0)
    spills += sp > 0
    d = re.sub(r"\(.*", "", (d or key[0]).replace("(anonymous namespace)::", "")).replace("void ", "", 1)
    print(f"{d[:72]:<72} {key[1]:>6} {r.get('regs', '?'):>4} {r.get('stack', '?'):>5} "
          f"{str(r.get('st', '?')) + '/' + str(r.get('ld', '?')):>11}{'  SPILL' if sp else ''}")
print(f"PTXAS kernels={len(rows)} max_regs={max((r.get('regs', 0) for r in rows.values()), default=0)} "
      f"spilling={spills}")
EOF
cat "$W/ptxas.txt" >>"$LOG"  # the table goes to the log; spills and the totals to the screen too
grep -E "SPILL|^PTXAS|Error|Traceback" "$W/ptxas.txt"

# ---------------------------------------------------------------------------------------------
say "== 3 build_info at $(elapsed) s"
timeout 60 $PY -c 'import specdiff_ext; print(specdiff_ext.build_info())' >"$W/build_info.log" 2>&1
echo $? >"$W/build_info.rc"
tail -3 "$W/build_info.log" | tee -a "$LOG"

# ---------------------------------------------------------------------------------------------
say "== 4+5 tests and compute-sanitizer (side by side) at $(elapsed) s"
T45=$(limit 210 150)
(
  timeout -k 10 "$T45" $PY -m pytest -m cuda python_tests -q -p no:cacheprovider >"$W/tests.log" 2>&1
  echo $? >"$W/tests.rc"
) &
P_TESTS=$!
P_SAN=""
TOOLS=${SANITIZER_TOOLS:-memcheck racecheck initcheck}
if [ -n "$SAN" ]; then
  # instrument only our kernels (namespace specdiff) unless SANITIZER_ALL_KERNELS=1
  KFILTER=""
  if [ "${SANITIZER_ALL_KERNELS:-0}" != 1 ] && "$SAN" --help 2>/dev/null | grep -q -- "--kernel-name "; then
    KFILTER="--kernel-name kns=specdiff"
  fi
  say "compute-sanitizer tools: $TOOLS; ${KFILTER:-all kernels}"
  for tool in $TOOLS; do
    (
      # shellcheck disable=SC2086
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 10 "$T45" "$SAN" --tool "$tool" $KFILTER \
        --error-exitcode 99 --print-limit 30 $PY benchmarks/sanitize_case.py >"$W/$tool.log" 2>&1
      echo $? >"$W/$tool.rc"
    ) &
    P_SAN="$P_SAN $!"
  done
else
  say "compute-sanitizer not found: sanitizers skipped"
fi
wait $P_TESTS $P_SAN
keep "pytest -m cuda" "$W/tests.log"
say "tests rc $(rc_of tests): $(grep -E '[0-9]+ (passed|failed|skipped|deselected|errors?)|no tests ran' "$W/tests.log" | tail -1)"
grep -E "^(FAILED|ERROR) " "$W/tests.log" | head -15 | tee -a "$LOG"
for tool in $TOOLS; do
  [ -f "$W/$tool.log" ] || continue
  keep "compute-sanitizer --tool $tool" "$W/$tool.log"
  say "$tool rc $(rc_of $tool): $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|sanitize_case:' "$W/$tool.log" | tr '\n' ' ')"
  grep -E "^========= (Invalid|Error|Race|Warning|Uninitialized|Program hit)" "$W/$tool.log" | sort | uniq -c | sort -rn | head -8 | tee -a "$LOG"
done

# ---------------------------------------------------------------------------------------------
say "== 6 bench at $(elapsed) s"
FI_ARG=""
if [ -n "$FI_PID" ]; then
  wait "$FI_PID"
  keep "flashinfer JIT" "$W/fi_jit.log"
  if [ "$(rc_of fi_jit)" = 0 ]; then
    say "$(tail -1 "$W/fi_jit.log")"
  else
    say "flashinfer JIT FAILED (rc $(rc_of fi_jit)): $(grep -E 'error|Error' "$W/fi_jit.log" | head -3 | cut -c1-300)"
    FI_ARG="--flashinfer off"
  fi
else
  FI_ARG="--flashinfer off"
fi
# shellcheck disable=SC2086
timeout -k 10 "$(limit 300 12)" $PY benchmarks/bench_ops.py --device cuda --json "$RES/bench_cuda.json" \
  --compile on --compile-ops verify,gather_logprobs --compile-timeout 90 --compile-budget 120 \
  --flashinfer-timeout 120 --warmup-ms 10 --rep-ms 40 $FI_ARG ${BENCH_ARGS:-} >"$W/bench.log" 2>&1
echo $? >"$W/bench.rc"
keep "bench_ops.py" "$W/bench.log"
say "== 6a sampling controls: verify with top-k / top-p / min-p vs plain, FlashInfer's sampler at $(elapsed) s"
# shellcheck disable=SC2086
timeout -k 10 "$(limit 120 8)" $PY benchmarks/bench_ops.py --filters --device cuda --B 1,8,32 \
  --json "$RES/filters_cuda.json" --warmup-ms 5 --rep-ms 20 $FI_ARG >"$W/filters.log" 2>&1
echo $? >"$W/filters.rc"
keep "bench_ops.py --filters" "$W/filters.log"
say "== 6a' verify_tree against a plain-torch walk at $(elapsed) s"
timeout -k 10 "$(limit 60 4)" $PY benchmarks/bench_ops.py --tree --device cuda --B 1,8,32 --N 16,64 \
  --json "$RES/tree_cuda.json" --warmup-ms 5 --rep-ms 20 >"$W/tree.log" 2>&1
echo $? >"$W/tree.rc"
keep "bench_ops.py --tree" "$W/tree.log"
say "== 6b kernel profile at $(elapsed) s"
timeout -k 5 "$(limit 90 8)" $PY benchmarks/profile_ops.py --json "$RES/profile_cuda.json" >"$W/profile.log" 2>&1
echo $? >"$W/profile.rc"
keep "profile_ops.py" "$W/profile.log"
cat "$W/profile.log" | tail -8
say "bench rc $(rc_of bench) at $(elapsed) s"

# ---------------------------------------------------------------------------------------------
$PY - "$W" "$RES/bench_cuda.json" "$(elapsed)" >"$W/summary.txt" 2>&1 <<'EOF'
import json, os, re, sys
w, bench_json, elapsed = sys.argv[1], sys.argv[2], sys.argv[3]

def read(name):
    try:
        return open(os.path.join(w, name), errors="replace").read()
    except OSError:
        return ""

def rc(name):
    return read(name + ".rc").strip() or "not run"

rows = []
ptx = re.search(r"PTXAS kernels=(\d+) max_regs=(\d+) spilling=(\d+)", read("ptxas.txt"))
build = f"rc {rc('build')}"
if ptx:
    build += (f"; {ptx.group(1)} kernels, max {ptx.group(2)} registers, "
              + ("no spills" if ptx.group(3) == "0" else f"{ptx.group(3)} kernels SPILL"))
rows.append(("build", build))
bi = read("build_info.log").strip().splitlines()
rows.append(("build_info", bi[-1][:100] if bi else f"rc {rc('build_info')}"))
t = [l for l in read("tests.log").splitlines()
     if re.search(r"\d+ (passed|failed|skipped|deselected|errors?)\b|no tests ran", l)]
rows.append(("tests -m cuda", f"{t[-1].strip('= ') if t else 'no result'} (rc {rc('tests')})"))
for tool in ("memcheck", "racecheck", "initcheck"):
    log = read(tool + ".log")
    if not log:
        rows.append((tool, "not run"))
        continue
    parts = []
    m = re.search(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", log)
    if m:
        parts.append(f"{m.group(1)} hazards ({m.group(2)} errors, {m.group(3)} warnings)")
    m = re.search(r"ERROR SUMMARY: (\d+) errors?", log)
    if m:
        parts.append(f"{m.group(1)} errors")
    m = re.search(r"sanitize_case: .*", log)
    parts.append(m.group(0) if m else "sanitize_case gave no verdict")
    rows.append((tool, f"{'; '.join(parts)} (rc {rc(tool)})"))
fi = read("fi_jit.log").strip().splitlines()
rows.append(("flashinfer", (fi[-1][:100] if rc("fi_jit") == "0" else f"JIT rc {rc('fi_jit')}")
             if rc("fi_jit") != "not run" else "not run (no .whl/, or the wheels did not install)"))
try:
    data = json.load(open(bench_json))
    res = data["results"]
except (OSError, ValueError, KeyError):
    data, res = {}, []
rows.append(("bench", f"{len(res)} cases (rc {rc('bench')}) -> {bench_json}"))
print(f"\n================ gpu_check summary ({elapsed} s) ================")
for k, v in rows:
    print(f"{k:<14} {v}")
dev = (data.get("meta", {}).get("devices", {}) or {}).get("cuda", "")
copy = data.get("meta", {}).get("cuda_copy_gbps")
if res:
    print(f"verify on {dev}" + (f"; copy {copy:.0f} GB/s" if copy else ""))
    print(f"{'dtype':>5} {'B':>3} {'G':>3} {'V':>7} {'ours ms':>9} {'x ref':>7} {'x comp':>7} "
          f"{'x naive':>8} {'x fi':>6} {'GB/s':>7} {'acc':>5}")
    want = [(1, 8, 32000), (8, 8, 49152), (32, 8, 49152), (32, 8, 151936), (32, 16, 151936)]
    f = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"
    for r in res:
        if r["op"] == "verify" and (r["B"], r["G"], r["V"]) in want:
            s = r.get("speedup", {})
            print(f"{r['dtype']:>5} {r['B']:>3} {r['G']:>3} {r['V']:>7} {f(r['ms'].get('ours'), 4):>9} "
                  f"{f(s.get('ref')):>7} {f(s.get('compile')):>7} {f(s.get('naive')):>8} "
                  f"{f(s.get('fi')):>6} {f(r.get('gbps'), 0):>7} {f(r['accepted'].get('ours')):>5}")
    for op in ("rejection_sample", "gather_logprobs", "denoise_step"):
        sel = [r for r in res if r["op"] == op and r["ms"].get("ours") and r.get("gbps")]
        if sel:
            best = max(sel, key=lambda r: r["gbps"])
            print(f"{op}: {len(sel)} shapes, best {best['gbps']:.0f} GB/s at B={best['B']} G={best['G']} "
                  f"V={best['V']} ({best['ms']['ours']:.4f} ms, x ref {f(best['speedup'].get('ref'))})")
EOF
keep "summary" "$W/summary.txt"
cat "$W/summary.txt"
