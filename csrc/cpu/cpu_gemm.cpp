// cpu_gemm.cpp: row-major GEMM over a runtime-resolved Fortran BLAS, with an ATen fallback.
// See cpu_gemm.h for the contract and the FUSED_BPTT_CPU_GEMM switch.
#include "cpu/cpu_gemm.h"
#include "env.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <dlfcn.h>

#include <climits>

namespace fused_bptt {
namespace cpu {
namespace {

// Fortran BLAS, LP64 (32-bit integers) as MKL and OpenBLAS ship in the torch wheels. The hidden
// string-length arguments of the Fortran ABI are unused for one-character options.
using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*,
                          const float*, const int*, const float*, const int*, const float*, float*,
                          const int*);
using dgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*,
                          const double*, const double*, const int*, const double*, const int*,
                          const double*, double*, const int*);

struct Blas {
  sgemm_fn sgemm = nullptr;
  dgemm_fn dgemm = nullptr;
};

// Looks in libtorch_cpu first (found through the address of one of its functions, since
// Python loads torch with RTLD_LOCAL), then in the global scope.
void* find_symbol(const char* name) {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&at::get_num_threads), &info) && info.dli_fname) {
    if (void* lib = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD)) {
      void* sym = dlsym(lib, name);
      dlclose(lib);
      if (sym) return sym;
    }
  }
  return dlsym(RTLD_DEFAULT, name);
}

const Blas& blas() {
  static const Blas b = [] {
    Blas r;
    r.sgemm = reinterpret_cast<sgemm_fn>(find_symbol("sgemm_"));
    r.dgemm = reinterpret_cast<dgemm_fn>(find_symbol("dgemm_"));
    if (!r.sgemm || !r.dgemm) r = Blas{};  // both or neither: one path per process
    return r;
  }();
  return b;
}

void call_blas(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda,
               const float* b, int ldb, float beta, float* c, int ldc) {
  blas().sgemm(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

void call_blas(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda,
               const double* b, int ldb, double beta, double* c, int ldc) {
  blas().dgemm(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

// A row-major [rows, cols] matrix with row stride ld, as a Tensor view without a copy.
template <typename scalar_t>
at::Tensor view(const scalar_t* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
  at::Tensor t = at::from_blob(const_cast<scalar_t*>(p), {rows, cols}, {ld, 1},
                               at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value));
  return trans ? t.t() : t;
}

bool fits_int(int64_t v) { return v <= INT_MAX; }

}  // namespace

GemmMode gemm_mode_from_env() {
  // Same order as GemmMode.
  return static_cast<GemmMode>(env_choice("FUSED_BPTT_CPU_GEMM", {"auto", "aten", "blas"}));
}

bool blas_available(GemmMode mode) { return mode != GemmMode::kAten && blas().sgemm != nullptr; }

template <typename scalar_t>
void gemm(GemmMode mode, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, scalar_t alpha,
          const scalar_t* A, int64_t lda, const scalar_t* B, int64_t ldb, scalar_t beta, scalar_t* C,
          int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {  // BLAS rejects lda = 0; the product is empty, only beta * C remains
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == 0 ? 0 : beta * C[i * ldc + j];
    return;
  }
  const bool dims_fit = fits_int(M) && fits_int(N) && fits_int(K) && fits_int(lda) &&
                        fits_int(ldb) && fits_int(ldc);
  if (blas_available(mode) && dims_fit) {
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
    call_blas(trans_b ? 'T' : 'N', trans_a ? 'T' : 'N', static_cast<int>(N), static_cast<int>(M),
              static_cast<int>(K), alpha, B, static_cast<int>(ldb), A, static_cast<int>(lda), beta,
              C, static_cast<int>(ldc));
    return;
  }
  at::Tensor a = trans_a ? view(A, K, M, lda, true) : view(A, M, K, lda, false);
  at::Tensor b = trans_b ? view(B, N, K, ldb, true) : view(B, K, N, ldb, false);
  view(C, M, N, ldc, false).addmm_(a, b, beta, alpha);
}

// MKL's mixed-precision GEMMs (Fortran ABI as sgemm_; MKL_BF16 and MKL_F16 are 16-bit integers):
// C (float32) = alpha * op(A) op(B) + beta * C with A and B in bfloat16 / float16.
using gemm_lowp_fn = void (*)(const char*, const char*, const int*, const int*, const int*,
                              const float*, const void*, const int*, const void*, const int*,
                              const float*, float*, const int*);

template <typename S>
gemm_lowp_fn lowp_blas() {
  static const gemm_lowp_fn f = reinterpret_cast<gemm_lowp_fn>(find_symbol(
      std::is_same_v<S, c10::BFloat16> ? "gemm_bf16bf16f32_" : "gemm_f16f16f32_"));
  return f;
}

// True when MKL's low-precision GEMM for S was found and `mode` allows it.
template <typename S>
bool blas_lowp_available(GemmMode mode) {
  return mode != GemmMode::kAten && lowp_blas<S>() != nullptr;
}

// Where MKL's low-precision GEMM is faster than widening + sgemm (see cpu_gemm.h): bfloat16 on
// AMX. (float16's AMX, AMX-FP16, is newer than GCC 12 can name; MKL's float16 GEMM elsewhere runs
// at the float32 rate at best.)
template <typename S>
bool lowp_blas_is_fast() {
  if constexpr (std::is_same_v<S, c10::BFloat16>) {
#if defined(__x86_64__) || defined(__i386__)
    static const bool amx = __builtin_cpu_supports("amx-bf16");
    return amx;
#else
    return false;
#endif
  } else {
    return false;
  }
}

template <typename S>
bool lowp_gemms_in_float32(GemmMode mode) {
  return mode == GemmMode::kAuto && !(blas_lowp_available<S>(mode) && lowp_blas_is_fast<S>());
}

template <typename S>
void gemm_lowp(GemmMode mode, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
               const S* A, int64_t lda, const S* B, int64_t ldb, float beta, float* C,
               int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {  // as in gemm(): only beta * C remains
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == 0 ? 0 : beta * C[i * ldc + j];
    return;
  }
  const bool dims_fit = fits_int(M) && fits_int(N) && fits_int(K) && fits_int(lda) &&
                        fits_int(ldb) && fits_int(ldc);
  if (blas_lowp_available<S>(mode) && dims_fit) {
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T, as in gemm().
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int ia = static_cast<int>(ldb), ib = static_cast<int>(lda), ic = static_cast<int>(ldc);
    const float alpha = 1;
    lowp_blas<S>()(&ta, &tb, &m, &n, &k, &alpha, B, &ia, A, &ib, &beta, C, &ic);
    return;
  }
  const at::Tensor a = trans_a ? view(A, K, M, lda, true) : view(A, M, K, lda, false);
  const at::Tensor b = trans_b ? view(B, N, K, ldb, true) : view(B, K, N, ldb, false);
  at::Tensor c = view(C, M, N, ldc, false);
  const at::Tensor product = at::mm(a, b);
  if (beta == 0) {
    c.copy_(product);
  } else {
    c.mul_(beta).add_(product);
  }
}

template bool lowp_gemms_in_float32<c10::BFloat16>(GemmMode);
template bool lowp_gemms_in_float32<c10::Half>(GemmMode);
template void gemm_lowp<c10::BFloat16>(GemmMode, bool, bool, int64_t, int64_t, int64_t,
                                       const c10::BFloat16*, int64_t, const c10::BFloat16*,
                                       int64_t, float, float*, int64_t);
template void gemm_lowp<c10::Half>(GemmMode, bool, bool, int64_t, int64_t, int64_t,
                                   const c10::Half*, int64_t, const c10::Half*, int64_t, float,
                                   float*, int64_t);

template void gemm<float>(GemmMode, bool, bool, int64_t, int64_t, int64_t, float, const float*,
                          int64_t, const float*, int64_t, float, float*, int64_t);
template void gemm<double>(GemmMode, bool, bool, int64_t, int64_t, int64_t, double, const double*,
                           int64_t, const double*, int64_t, double, double*, int64_t);

}  // namespace cpu
}  // namespace fused_bptt
