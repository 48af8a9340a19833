// Every library header the CPU kernel sources use, included by each
// instruction-set build (isa/*.cpp) BEFORE its `#pragma GCC target` region and
// its namespace. Functions from these headers are therefore compiled for the
// baseline instruction set in every build, so that when the linker keeps one
// copy of an inline function it is always one every CPU can run (no AVX-512
// code leaking into the default build through a shared inline function). The
// kernels' own headers (common/*.h, cpu/*.h) are included inside the region and
// the namespace instead: one copy per build, under its own names.
//
// A kernel source that needs another library header must add it here: included
// for the first time inside the namespace, it would not compile.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/capability.h"

#if FADA_CPU_X86_ISAS
#include <immintrin.h>
#endif
