// Elementwise, row-wise and reduction kernels of the `Device` trait (rank/src/device/mod.rs),
// plain fp32 SIMT. Compiled at start-up by NVRTC for the device's architecture; CI compiles
// this file for sm_80 and sm_90 and fails on any warning (scripts/check-kernels.sh).
//
// Conventions: row-major fp32; `n` counts elements (64-bit); element loops are grid-stride so
// any grid size is correct; row kernels take one block per row (grid-stride over rows), with a
// power-of-two block size of at most 1024 threads. Sums that the CPU device takes in f64 are
// taken in f64 here too. No atomics: every result is deterministic.

#define GELU_C 0.044715f
#define SQRT_2_OVER_PI 0.7978845608028654f

// i64, NEG_INF_*, gtid/gstride and block_sum_f64 come from common.cuh (prepended by nvrtc.rs).

// y[r, c] += bias[c]
extern "C" __global__ void bias_add(float* y, const float* bias, i64 rows, i64 cols) {
    i64 n = rows * cols;
    for (i64 i = gtid(); i < n; i += gstride()) y[i] += bias[i % cols];
}

// dbias[c] += sum_r dy[r, c]: one thread per column (coalesced across the warp), rows in order.
extern "C" __global__ void bias_grad(const float* dy, i64 rows, i64 cols, float* dbias) {
    for (i64 c = gtid(); c < cols; c += gstride()) {
        float acc = 0.0f;
        for (i64 r = 0; r < rows; ++r) acc += dy[r * cols + c];
        dbias[c] += acc;
    }
}

__device__ __forceinline__ float gelu_u(float x) { return SQRT_2_OVER_PI * (x + GELU_C * x * x * x); }

extern "C" __global__ void gelu_fwd(const float* x, float* y, i64 n) {
    for (i64 i = gtid(); i < n; i += gstride()) {
        float v = x[i];
        y[i] = 0.5f * v * (1.0f + tanhf(gelu_u(v)));
    }
}

extern "C" __global__ void gelu_bwd(const float* x, const float* dy, float* dx, i64 n) {
    for (i64 i = gtid(); i < n; i += gstride()) {
        float v = x[i];
        float th = tanhf(gelu_u(v));
        float g = 0.5f * (1.0f + th)
                  + 0.5f * v * (1.0f - th * th) * SQRT_2_OVER_PI * (1.0f + 3.0f * GELU_C * v * v);
        dx[i] = dy[i] * g;
    }
}

extern "C" __global__ void relu_fwd(const float* x, float* y, i64 n) {
    for (i64 i = gtid(); i < n; i += gstride()) y[i] = x[i] > 0.0f ? x[i] : 0.0f;
}

extern "C" __global__ void relu_bwd(const float* x, const float* dy, float* dx, i64 n) {
    for (i64 i = gtid(); i < n; i += gstride()) dx[i] = x[i] > 0.0f ? dy[i] : 0.0f;
}

// y += x
extern "C" __global__ void add_inplace(float* y, const float* x, i64 n) {
    for (i64 i = gtid(); i < n; i += gstride()) y[i] += x[i];
}

// y += alpha * x
extern "C" __global__ void axpy(float alpha, const float* x, float* y, i64 n) {
    for (i64 i = gtid(); i < n; i += gstride()) y[i] += alpha * x[i];
}

// x *= alpha
extern "C" __global__ void scale(float alpha, float* x, i64 n) {
    for (i64 i = gtid(); i < n; i += gstride()) x[i] *= alpha;
}

// partial[blockIdx.x] = sum of x[i]^2 over this block's grid-stride share, in f64. The host
// (or a second launch with one block) adds the gridDim.x partials in order: deterministic for
// a fixed grid. Dynamic shared memory: blockDim.x doubles.
extern "C" __global__ void sq_norm_partial(const float* x, i64 n, double* partial) {
    extern __shared__ double sh_sq[];
    double acc = 0.0;
    for (i64 i = gtid(); i < n; i += gstride()) {
        double v = (double)x[i];
        acc += v * v;
    }
    double total = block_sum_f64(acc, sh_sq);
    if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

// Row-wise LayerNorm, one block per row. Dynamic shared memory: blockDim.x doubles.
extern "C" __global__ void layernorm_fwd(const float* x, const float* gamma, const float* beta,
                                         i64 rows, i64 cols, float eps, float* y, float* mean,
                                         float* rstd) {
    extern __shared__ double sh_ln[];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* xr = x + r * cols;
        double s = 0.0;
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) s += (double)xr[c];
        double mu = block_sum_f64(s, sh_ln) / (double)cols;
        double v = 0.0;
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {
            double t = (double)xr[c] - mu;
            v += t * t;
        }
        double var = block_sum_f64(v, sh_ln) / (double)cols;
        float muf = (float)mu;
        float rs = (float)(1.0 / sqrt(var + (double)eps));
        if (threadIdx.x == 0) {
            mean[r] = muf;
            rstd[r] = rs;
        }
        float* yr = y + r * cols;
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x)
            yr[c] = (xr[c] - muf) * rs * gamma[c] + beta[c];
    }
}

// LayerNorm backward, input gradient: one block per row, overwrites dx.
// dx = rstd * (dy*gamma - mean(dy*gamma) - xhat * mean(dy*gamma*xhat)).
// Dynamic shared memory: blockDim.x doubles.
extern "C" __global__ void layernorm_bwd_dx(const float* x, const float* gamma, const float* mean,
                                            const float* rstd, const float* dy, i64 rows, i64 cols,
                                            float* dx) {
    extern __shared__ double sh_lnb[];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* xr = x + r * cols;
        const float* dyr = dy + r * cols;
        float mu = mean[r], rs = rstd[r];
        double sg = 0.0, sgx = 0.0;
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {
            float xh = (xr[c] - mu) * rs;
            float g = dyr[c] * gamma[c];
            sg += (double)g;
            sgx += (double)(g * xh);
        }
        float mg = (float)(block_sum_f64(sg, sh_lnb) / (double)cols);
        float mgx = (float)(block_sum_f64(sgx, sh_lnb) / (double)cols);
        float* dxr = dx + r * cols;
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {
            float xh = (xr[c] - mu) * rs;
            dxr[c] = rs * (dyr[c] * gamma[c] - mg - xh * mgx);
        }
    }
}

// LayerNorm backward, parameter gradients (accumulated): one thread per column, rows in order.
extern "C" __global__ void layernorm_bwd_params(const float* x, const float* mean,
                                                const float* rstd, const float* dy, i64 rows,
                                                i64 cols, float* dgamma, float* dbeta) {
    for (i64 c = gtid(); c < cols; c += gstride()) {
        float dg = 0.0f, db = 0.0f;
        for (i64 r = 0; r < rows; ++r) {
            float g = dy[r * cols + c];
            dg += g * (x[r * cols + c] - mean[r]) * rstd[r];
            db += g;
        }
        dgamma[c] += dg;
        dbeta[c] += db;
    }
}

// y = x / max(||x||, eps) per row; norms[r] = the clamped norm. One block per row.
// Dynamic shared memory: blockDim.x doubles.
extern "C" __global__ void l2_normalize_fwd(const float* x, i64 rows, i64 cols, float eps,
                                            float* y, float* norms) {
    extern __shared__ double sh_l2[];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* xr = x + r * cols;
        double s = 0.0;
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {
            double v = (double)xr[c];
            s += v * v;
        }
        float nrm = fmaxf((float)sqrt(block_sum_f64(s, sh_l2)), eps);
        if (threadIdx.x == 0) norms[r] = nrm;
        float inv = 1.0f / nrm;
        float* yr = y + r * cols;
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) yr[c] = xr[c] * inv;
    }
}

// dx = (dy - y * <y, dy>) / norm per row (overwrites dx). One block per row.
// Dynamic shared memory: blockDim.x doubles.
extern "C" __global__ void l2_normalize_bwd(const float* y, const float* norms, const float* dy,
                                            i64 rows, i64 cols, float* dx) {
    extern __shared__ double sh_l2b[];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* yr = y + r * cols;
        const float* dyr = dy + r * cols;
        double s = 0.0;
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) s += (double)(yr[c] * dyr[c]);
        float dot = (float)block_sum_f64(s, sh_l2b);
        float inv = 1.0f / norms[r];
        float* dxr = dx + r * cols;
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) dxr[c] = (dyr[c] - yr[c] * dot) * inv;
    }
}

// Softmax cross-entropy, one block per row: dlogits = grad_scale * (softmax - onehot(label)),
// row_loss[r] = lse - logits[label] (f64), row_hit[r] = 1 when the first arg-max is the label.
// Labels are checked by the host (< cols). Dynamic shared memory: blockDim.x doubles (the
// f32/i32 scratch of the arg-max reuses it).
extern "C" __global__ void softmax_xent(const float* logits, const unsigned* labels, i64 rows,
                                        i64 cols, float grad_scale, float* dlogits,
                                        double* row_loss, int* row_hit) {
    extern __shared__ double sh_sx[];
    float* fbuf = (float*)sh_sx;
    int* ibuf = (int*)(fbuf + blockDim.x);
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* lr = logits + r * cols;
        // Arg-max with the first index on ties: each thread scans its strided share in
        // increasing order, then the tree keeps the smaller index on equal values.
        float best = NEG_INF_F;
        int arg = (int)cols;
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {
            if (arg == (int)cols || lr[c] > best) {
                best = lr[c];
                arg = (int)c;
            }
        }
        fbuf[threadIdx.x] = best;
        ibuf[threadIdx.x] = arg;
        __syncthreads();
        for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
            if (threadIdx.x < s) {
                float ov = fbuf[threadIdx.x + s];
                int oi = ibuf[threadIdx.x + s];
                float mv = fbuf[threadIdx.x];
                int mi = ibuf[threadIdx.x];
                bool take = oi < (int)cols && (mi == (int)cols || ov > mv || (ov == mv && oi < mi));
                if (take) {
                    fbuf[threadIdx.x] = ov;
                    ibuf[threadIdx.x] = oi;
                }
            }
            __syncthreads();
        }
        int am = ibuf[0];
        __syncthreads();
        double mx = (double)lr[am];
        double z = 0.0;
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) z += exp((double)lr[c] - mx);
        double lse = mx + log(block_sum_f64(z, sh_sx));
        unsigned label = labels[r];
        if (threadIdx.x == 0) {
            row_loss[r] = lse - (double)lr[label];
            row_hit[r] = am == (int)label ? 1 : 0;
        }
        float* dr = dlogits + r * cols;
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {
            float p = (float)exp((double)lr[c] - lse);
            dr[c] = grad_scale * (p - (c == (i64)label ? 1.0f : 0.0f));
        }
        __syncthreads();
    }
}
