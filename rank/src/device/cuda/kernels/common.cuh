// Definitions every kernel source shares. nvrtc.rs puts this text in front of each .cu file
// before NVRTC compiles it (NVRTC is given no include path), so line numbers in NVRTC's
// messages count from the top of this file.

typedef long long i64;

// NVRTC has no <math.h> macros: infinities by bit pattern.
#define NEG_INF_F __int_as_float(0xff800000)
#define NEG_INF_D __longlong_as_double(0xfff0000000000000LL)

// Grid-stride loops over the x dimension.
__device__ __forceinline__ i64 gtid() { return (i64)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ i64 gstride() { return (i64)gridDim.x * blockDim.x; }

// Block-wide sum in f64 through shared memory (blockDim.x a power of two, <= 1024).
// Every thread gets the total. `buf` holds blockDim.x doubles.
__device__ double block_sum_f64(double v, double* buf) {
    buf[threadIdx.x] = v;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
        __syncthreads();
    }
    double total = buf[0];
    __syncthreads();
    return total;
}

