#!/usr/bin/env bash
# Run a command as if this CPU had no AVX-512 (an approximation of a VM that hides it), e.g.
#
#   bash benchmarks/avx512_hidden.sh python benchmarks/bench_rnn.py --backend cpu --versus-gemm mkl
#
# Every party is capped at AVX2: oneDNN (torch's own and the onednn extra) by ONEDNN_MAX_CPU_ISA,
# MKL by MKL_ENABLE_INSTRUCTIONS, torch's ATen kernels by ATEN_CPU_CAPABILITY, and rnnkit's kernels
# are compiled with -mno-avx512f after -march=native into a cache directory of their own (where the
# GEMM sources' measurements are kept too, apart from the uncapped machine's). What it cannot hide:
# the caches, clock and memory system of the CPU that runs it.
set -euo pipefail
if [ $# -eq 0 ]; then
  echo "usage: bash benchmarks/avx512_hidden.sh COMMAND [ARGS...]" >&2
  exit 2
fi
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
cat > "$tools/c++" <<'CXX'
#!/usr/bin/env bash
exec c++ "$@" -mno-avx512f
CXX
chmod +x "$tools/c++"
export CXX="$tools/c++"
export ONEDNN_MAX_CPU_ISA=AVX2 DNNL_MAX_CPU_ISA=AVX2
export MKL_ENABLE_INSTRUCTIONS=AVX2
export ATEN_CPU_CAPABILITY=avx2
export RNNKIT_CACHE="${RNNKIT_AVX2_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rnnkit-avx2}"
"$@"
