// CUDA dense attention: a tile kernel (rows x key split, online softmax, fp32 accumulation)
// and a combine kernel that merges key splits through their (max, sum) states.
//
// Block layout: kWarpsPerBlock warps; warp w owns rows [w*RPW, (w+1)*RPW) of the block's
// row tile. Keys stream through shared memory in tiles of 32, one key per lane for the
// scores; the probabilities are then broadcast lane by lane and every lane accumulates DV/32
// output columns of each of its rows (DV, the value width, is D except for GTA's latents). K and V are read from global memory once per block and
// shared by all rows of the GQA group, which is what makes grouped decode cheap.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cmath>
#include <stdexcept>
#include <string>

#include "hsr/cuda/dense_attention.h"

namespace hsr::cuda {
namespace {

constexpr int kThreads = kWarpsPerBlock * 32;
constexpr int kTile = int(kKeyTileCuda);
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ float2 to_f2(const __half* x) {
  return __half22float2(*reinterpret_cast<const __half2*>(x));
}
__device__ __forceinline__ float2 to_f2(const __nv_bfloat16* x) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(x));
}
__device__ __forceinline__ float2 to_f2(const float* x) { return make_float2(x[0], x[1]); }

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Shared-memory row padding (elements) so that 32 lanes reading 4-byte words of 32 different
// key rows at one column hit 32 different banks.
template <typename T>
constexpr int row_pad() { return sizeof(T) == 4 ? 1 : 2; }

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
  return x;
}

__device__ __forceinline__ float relu_pow(float x, int alpha) {
  const float r = fmaxf(x, 0.0f);
  float y = r;
  for (int i = 1; i < alpha; ++i) y *= r;
  return y;
}

// <q, k> with q an fp32 row in shared memory and k a row of T; four partial sums for ILP.
template <typename T, int D>
__device__ __forceinline__ float dot_row(const float* q, const T* k) {
  float s[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int d = 0; d < D; d += 2) {
    const float2 kf = to_f2(k + d);
    const float2 qf = *reinterpret_cast<const float2*>(q + d);
    s[(d >> 1) & 3] = fmaf(qf.x, kf.x, fmaf(qf.y, kf.y, s[(d >> 1) & 3]));
  }
  return (s[0] + s[1]) + (s[2] + s[3]);
}

// Copies `tn` rows of D elements (16-byte aligned in global memory) into a shared tile with
// row stride LD; rows tn..kTile-1 are zero-filled so that masked lanes never read garbage
// (0 * NaN would poison the accumulator).
template <typename T, int D, int LD>
__device__ __forceinline__ void load_tile(const T* __restrict__ src, int64_t stride, int tn,
                                          T* dst) {
  constexpr int kVec = 16 / int(sizeof(T));
  constexpr int kChunks = D / kVec;
  for (int i = threadIdx.x; i < kTile * kChunks; i += kThreads) {
    const int t = i / kChunks, c = i % kChunks;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (t < tn) val = *reinterpret_cast<const uint4*>(src + t * stride + c * kVec);
    uint32_t* d32 = reinterpret_cast<uint32_t*>(dst + t * LD + c * kVec);
    d32[0] = val.x;
    d32[1] = val.y;
    d32[2] = val.z;
    d32[3] = val.w;
  }
}

struct TileKernelArgs {
  DenseAttentionProblem p;
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;
  float* partials;
  int64_t row_blocks;
  int64_t splits;
  int64_t keys_per_split;
};

// Final output of one row from its (m, l, acc); each lane writes its DV/32 columns.
template <typename T, int DV>
__device__ __forceinline__ void write_final_row(const DenseAttentionProblem& p, int64_t b,
                                                int64_t hkv, int64_t row, float m, float l,
                                                const float (&acc)[DV / 32], void* out_raw,
                                                float* lse, int lane) {
  constexpr int kEpl = DV / 32;
  const int64_t group = p.heads_q / p.heads_kv;
  const int64_t qpos = row / group, h = hkv * group + row % group;
  const int64_t flat = (b * p.heads_q + h) * p.len_q + qpos;
  const bool divide = p.kind == ScoreKind::kSoftmax || p.normalize;
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
  T* out = static_cast<T*>(out_raw) + flat * DV + lane * kEpl;
#pragma unroll
  for (int e = 0; e < kEpl; ++e) out[e] = from_f<T>(divide ? acc[e] * inv : acc[e]);
  if (lane == 0) lse[flat] = l > 0.0f ? m + logf(l) : -INFINITY;
}

template <typename T, int D, int DV, int RPW>
__global__ void __launch_bounds__(kThreads)
    dense_attention_tile_kernel(const TileKernelArgs a) {
  constexpr int kRows = kWarpsPerBlock * RPW;
  constexpr int kEpl = DV / 32;
  constexpr int kLd = D + row_pad<T>();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* q_s = reinterpret_cast<float*>(smem_raw);          // kRows x D, pre-scaled
  T* k_s = reinterpret_cast<T*>(q_s + kRows * D);           // kTile x kLd
  T* v_s = k_s + kTile * kLd;                               // kTile x DV

  const DenseAttentionProblem& p = a.p;
  const int64_t unit = blockIdx.x;
  const int64_t split = unit % a.splits;
  const int64_t row_group = unit / a.splits;
  const int64_t row_block = row_group % a.row_blocks;
  const int64_t bh = row_group / a.row_blocks;
  const int64_t b = bh / p.heads_kv, hkv = bh % p.heads_kv;
  const int64_t group = p.heads_q / p.heads_kv;
  const int64_t row0 = row_block * kRows;
  const int nrows = int(min64(kRows, p.len_q * group - row0));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  const T* q = static_cast<const T*>(a.q);
  for (int i = threadIdx.x; i < kRows * D; i += kThreads) {
    const int r = i / D, d = i % D;
    float val = 0.0f;
    if (r < nrows) {
      const int64_t row = row0 + r;
      const int64_t qpos = row / group, h = hkv * group + row % group;
      val = to_f(q[b * p.q_stride[0] + h * p.q_stride[1] + qpos * p.q_stride[2] + d]) * p.scale;
    }
    q_s[i] = val;
  }

  const bool softmax = p.kind == ScoreKind::kSoftmax;
  int64_t last_key[RPW];
  float m[RPW], l[RPW], acc[RPW][kEpl];
#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    const int r = warp * RPW + rr;
    last_key[rr] = r < nrows ? p.last_visible_key((row0 + r) / group) : -1;
    m[rr] = softmax ? -INFINITY : 0.0f;
    l[rr] = 0.0f;
#pragma unroll
    for (int e = 0; e < kEpl; ++e) acc[rr][e] = 0.0f;
  }

  const int64_t key_begin = split * a.keys_per_split;
  int64_t key_end = min64(p.len_k, key_begin + a.keys_per_split);
  // Rows are ordered by query position: the block's last row sees the most keys.
  key_end = min64(key_end, p.last_visible_key((row0 + nrows - 1) / group) + 1);
  const T* kbase = static_cast<const T*>(a.k) + b * p.k_stride[0] + p.key_head(hkv) * p.k_stride[1];
  const T* vbase =
      static_cast<const T*>(a.v) + b * p.v_stride[0] + p.value_head(hkv) * p.v_stride[1];

  for (int64_t t0 = key_begin; t0 < key_end; t0 += kTile) {
    const int tn = int(min64(kTile, key_end - t0));
    __syncthreads();  // the previous tile is consumed (and q_s is complete on entry)
    load_tile<T, D, kLd>(kbase + t0 * p.k_stride[2], p.k_stride[2], tn, k_s);
    load_tile<T, DV, DV>(vbase + t0 * p.v_stride[2], p.v_stride[2], tn, v_s);
    __syncthreads();
    const T* krow = k_s + lane * kLd;
#pragma unroll
    for (int rr = 0; rr < RPW; ++rr) {
      const int r = warp * RPW + rr;
      if (r >= nrows) continue;  // warp-uniform
      const bool valid = lane < tn && t0 + lane <= last_key[rr];
      const float s = valid ? dot_row<T, D>(q_s + r * D, krow) : -INFINITY;
      float prob;
      if (softmax) {
        const float tile_max = warp_max(s);
        if (tile_max == -INFINITY) continue;  // no visible key in this tile (warp-uniform)
        const float m_new = fmaxf(m[rr], tile_max);
        const float correction = __expf(m[rr] - m_new);
        prob = valid ? __expf(s - m_new) : 0.0f;
        l[rr] = l[rr] * correction + warp_sum(prob);
        m[rr] = m_new;
#pragma unroll
        for (int e = 0; e < kEpl; ++e) acc[rr][e] *= correction;
      } else {
        prob = valid ? relu_pow(s - p.bias, p.alpha) : 0.0f;
        l[rr] += warp_sum(prob);
      }
      for (int t = 0; t < tn; ++t) {
        const float pt = __shfl_sync(kFullMask, prob, t);
        const T* vrow = v_s + t * DV + lane * kEpl;
#pragma unroll
        for (int e = 0; e < kEpl; ++e) acc[rr][e] = fmaf(pt, to_f(vrow[e]), acc[rr][e]);
      }
    }
  }

#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    const int r = warp * RPW + rr;
    if (r >= nrows) continue;
    if (a.splits == 1) {
      write_final_row<T, DV>(p, b, hkv, row0 + r, m[rr], l[rr], acc[rr], a.out, a.lse, lane);
    } else {
      float* part = a.partials + (unit * kRows + r) * (DV + 2);
#pragma unroll
      for (int e = 0; e < kEpl; ++e) part[2 + lane * kEpl + e] = acc[rr][e];
      if (lane == 0) {
        part[0] = m[rr];
        part[1] = l[rr];
      }
    }
  }
}

struct CombineKernelArgs {
  DenseAttentionProblem p;
  const float* partials;
  void* out;
  float* lse;
  int64_t row_blocks;
  int64_t rows_per_block;
  int64_t splits;
};

// One warp per output row: merges the row's split partials, weighting each by exp(m_s - M).
// Splits that saw no key (l = 0) carry no weight.
template <typename T, int DV>
__global__ void __launch_bounds__(kThreads) dense_attention_combine_kernel(const CombineKernelArgs a) {
  constexpr int kEpl = DV / 32;
  const DenseAttentionProblem& p = a.p;
  const int lane = threadIdx.x % 32;
  const int64_t gw = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int64_t row_group = gw / a.rows_per_block, r = gw % a.rows_per_block;
  const int64_t row_block = row_group % a.row_blocks, bh = row_group / a.row_blocks;
  if (bh >= p.batch * p.heads_kv) return;
  const int64_t row = row_block * a.rows_per_block + r;
  if (row >= p.len_q * (p.heads_q / p.heads_kv)) return;

  float m = -INFINITY;
  for (int64_t s = 0; s < a.splits; ++s) {
    const float* part = a.partials + ((row_group * a.splits + s) * a.rows_per_block + r) * (DV + 2);
    if (part[1] > 0.0f) m = fmaxf(m, part[0]);
  }
  float l = 0.0f, acc[kEpl];
#pragma unroll
  for (int e = 0; e < kEpl; ++e) acc[e] = 0.0f;
  for (int64_t s = 0; s < a.splits; ++s) {
    const float* part = a.partials + ((row_group * a.splits + s) * a.rows_per_block + r) * (DV + 2);
    if (!(part[1] > 0.0f)) continue;
    const float w = __expf(part[0] - m);
    l = fmaf(w, part[1], l);
#pragma unroll
    for (int e = 0; e < kEpl; ++e) acc[e] = fmaf(w, part[2 + lane * kEpl + e], acc[e]);
  }
  write_final_row<T, DV>(p, bh / p.heads_kv, bh % p.heads_kv, row, m, l, acc, a.out, a.lse, lane);
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("hsr.attention (CUDA): ") + what +
                             " failed: " + cudaGetErrorString(err));
}

// Opts a kernel into more than 48 KiB of dynamic shared memory, once per device (the
// attribute is per device and per kernel; doing it once keeps CUDA-graph capture free of
// extra API calls). done_devices: the caller's record for this one kernel (every
// instantiation of the tile kernel has the same function type, so a static here would be
// shared between them and leave all but the first without the attribute).
template <typename Kernel>
void allow_large_shared_memory(Kernel* kernel, size_t bytes, std::atomic<uint64_t>& done_devices) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) check_launch("cudaGetDevice");
  const uint64_t bit = device < 64 ? (uint64_t(1) << device) : 0;
  if (bit != 0 && (done_devices.load() & bit)) return;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)) !=
      cudaSuccess)
    check_launch("cudaFuncSetAttribute");
  done_devices.fetch_or(bit);
}

template <typename T, int D, int DV, int RPW>
void launch_tile_and_combine(const DenseAttentionCudaArgs& args, const DenseAttentionCudaPlan& plan,
                             cudaStream_t stream) {
  const DenseAttentionProblem& p = args.problem;
  const TileKernelArgs ta{p,         args.q,          args.k,      args.v,
                          args.out,  args.lse,        args.workspace, plan.row_blocks,
                          plan.splits, plan.keys_per_split};
  constexpr int kRows = kWarpsPerBlock * RPW;
  constexpr size_t kSmem = size_t(kRows) * D * sizeof(float) +
                           size_t(kTile) * (D + row_pad<T>()) * sizeof(T) +
                           size_t(kTile) * DV * sizeof(T);
  auto* tile_kernel = dense_attention_tile_kernel<T, D, DV, RPW>;
  static std::atomic<uint64_t> attribute_set_on{0};  // per instantiation: per kernel
  if (kSmem > 48 * 1024) allow_large_shared_memory(tile_kernel, kSmem, attribute_set_on);
  tile_kernel<<<unsigned(plan.num_blocks(p)), kThreads, kSmem, stream>>>(ta);
  check_launch("dense_attention_tile_kernel launch");
  if (plan.splits > 1) {
    const CombineKernelArgs ca{p, args.workspace, args.out, args.lse, plan.row_blocks,
                               plan.rows_per_block, plan.splits};
    const int64_t warps = plan.num_row_groups(p) * plan.rows_per_block;
    const int64_t blocks = (warps + kWarpsPerBlock - 1) / kWarpsPerBlock;
    dense_attention_combine_kernel<T, DV><<<unsigned(blocks), kThreads, 0, stream>>>(ca);
    check_launch("dense_attention_combine_kernel launch");
  }
}

template <typename T, int D, int DV>
void launch_for_rows(const DenseAttentionCudaArgs& args, const DenseAttentionCudaPlan& plan,
                     cudaStream_t stream) {
  switch (plan.rows_per_warp) {
    case 1: return launch_tile_and_combine<T, D, DV, 1>(args, plan, stream);
    case 4: return launch_tile_and_combine<T, D, DV, 4>(args, plan, stream);
    case 16: return launch_tile_and_combine<T, D, DV, 16>(args, plan, stream);
    default:
      throw std::invalid_argument("hsr.attention (CUDA): unsupported rows_per_warp " +
                                  std::to_string(plan.rows_per_warp));
  }
}

template <typename T>
void launch_for_head_dim(const DenseAttentionCudaArgs& args, const DenseAttentionCudaPlan& plan,
                         cudaStream_t stream) {
  const int64_t d = args.problem.head_dim, dv = args.problem.value_dim;
  if (d == 64 && dv == 64) return launch_for_rows<T, 64, 64>(args, plan, stream);
  if (d == 128 && dv == 128) return launch_for_rows<T, 128, 128>(args, plan, stream);
  if (d == 64 && dv == 128) return launch_for_rows<T, 64, 128>(args, plan, stream);
  throw std::invalid_argument("hsr.attention (CUDA): head_dim " + std::to_string(d) +
                              " with value width " + std::to_string(dv) +
                              " is not supported (supported: 64/64, 128/128, 64/128)");
}

}  // namespace

bool dense_attention_cuda_supports_dims(int64_t head_dim, int64_t value_dim) {
  return (head_dim == 64 && value_dim == 64) || (head_dim == 128 && value_dim == 128) ||
         (head_dim == 64 && value_dim == 128);
}

// The single dispatch point over dtype, head_dim, value width and row-tile size.
void launch_dense_attention_cuda(const DenseAttentionCudaArgs& args,
                                 const DenseAttentionCudaPlan& plan, cudaStream_t stream) {
  if (plan.num_blocks(args.problem) == 0) return;
  switch (args.dtype) {
    case DType::kFloat32: return launch_for_head_dim<float>(args, plan, stream);
    case DType::kFloat16: return launch_for_head_dim<__half>(args, plan, stream);
    case DType::kBFloat16: return launch_for_head_dim<__nv_bfloat16>(args, plan, stream);
  }
  throw std::invalid_argument("hsr.attention (CUDA): unsupported dtype");
}

}  // namespace hsr::cuda
