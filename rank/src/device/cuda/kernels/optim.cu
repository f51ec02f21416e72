// The optimizer's element passes (rank/src/optim/passes.rs) over the flat parameter buffer.
// Compiled at start-up by NVRTC for the device's architecture; CI compiles this file for sm_80
// and sm_90 and fails on any warning (scripts/check-kernels.sh).
//
// One launch runs a batch of jobs, one per tensor: blockIdx.y is the job, blockIdx.x a slice
// of its span (grid-stride), and a job's table row is (offset, len, flags). Reductions leave
// one f64 partial per block, which the host adds in block order: the result is deterministic.
//
// The element arithmetic is the CPU engine's (rank/src/optim/engine.rs), one rounded IEEE
// operation at a time through the _rn intrinsics (NVRTC would otherwise contract a·b + c into
// a fused multiply-add): from the same constants the GPU writes bitwise the CPU's w, v, m, u.

// i64, gtid/gstride and block_sum_f64 come from common.cuh (prepended by nvrtc.rs).

#define JOB_FIELDS 3
#define WANT_WW 1
#define WANT_GG 2
#define WANT_GW 4
#define NESTEROV 1
#define WANT_NORM 2

__device__ __forceinline__ i64 job_offset(const i64* jobs) { return jobs[blockIdx.y * JOB_FIELDS]; }
__device__ __forceinline__ i64 job_len(const i64* jobs) { return jobs[blockIdx.y * JOB_FIELDS + 1]; }
__device__ __forceinline__ i64 job_flags(const i64* jobs) { return jobs[blockIdx.y * JOB_FIELDS + 2]; }
// Index of this block's partial (or of its first one when a block leaves several).
__device__ __forceinline__ i64 block_slot() { return (i64)blockIdx.y * gridDim.x + blockIdx.x; }

// ||w||^2, ||g||^2, <g, w> of each job's span, as its flags ask: partial[3 * slot + {0, 1, 2}].
// Dynamic shared memory: blockDim.x doubles.
extern "C" __global__ void optim_reduce(const float* w, const float* g, const i64* jobs,
                                        double* partial) {
    extern __shared__ double sh_red[];
    const i64 off = job_offset(jobs), n = job_len(jobs), flags = job_flags(jobs);
    const bool read_w = (flags & (WANT_WW | WANT_GW)) != 0;
    const float* wj = w + off;
    const float* gj = g + off;
    double ww = 0.0, gg = 0.0, gw = 0.0;
    for (i64 i = gtid(); i < n; i += gstride()) {
        double gi = (double)gj[i];
        double wi = read_w ? (double)wj[i] : 0.0;
        ww = __dadd_rn(ww, __dmul_rn(wi, wi));
        gg = __dadd_rn(gg, __dmul_rn(gi, gi));
        gw = __dadd_rn(gw, __dmul_rn(gi, wi));
    }
    ww = block_sum_f64(ww, sh_red);
    gg = block_sum_f64(gg, sh_red);
    gw = block_sum_f64(gw, sh_red);
    if (threadIdx.x == 0) {
        double* p = partial + 3 * block_slot();
        p[0] = (flags & WANT_WW) ? ww : 0.0;
        p[1] = (flags & WANT_GG) ? gg : 0.0;
        p[2] = (flags & WANT_GW) ? gw : 0.0;
    }
}

// The fused momentum update of each job; k holds 5 doubles per job (s, wd, m, a, b):
//   d = s*g + wd*w;  v' = m*v + a*d;  step = v' (Nesterov: a*d + m*v');  w' = w - b*step,
// w' and v' rounded to f32 once. With WANT_NORM, partial[slot] = sum of w'^2 over the block.
// Dynamic shared memory: blockDim.x doubles.
extern "C" __global__ void optim_momentum(float* w, const float* g, float* v, const i64* jobs,
                                          const double* k, double* partial) {
    extern __shared__ double sh_mom[];
    const i64 off = job_offset(jobs), n = job_len(jobs), flags = job_flags(jobs);
    const double* kj = k + 5 * (i64)blockIdx.y;
    const double s = kj[0], wd = kj[1], m = kj[2], a = kj[3], b = kj[4];
    const bool nesterov = (flags & NESTEROV) != 0;
    float* wj = w + off;
    const float* gj = g + off;
    float* vj = v + off;
    double acc = 0.0;
    for (i64 i = gtid(); i < n; i += gstride()) {
        double wi = (double)wj[i];
        double d = __dadd_rn(__dmul_rn(s, (double)gj[i]), __dmul_rn(wd, wi));
        double vn = __dadd_rn(__dmul_rn(m, (double)vj[i]), __dmul_rn(a, d));
        double step = nesterov ? __dadd_rn(__dmul_rn(a, d), __dmul_rn(m, vn)) : vn;
        float wn = __double2float_rn(__dsub_rn(wi, __dmul_rn(b, step)));
        wj[i] = wn;
        vj[i] = __double2float_rn(vn);
        double wf = (double)wn;
        acc = __dadd_rn(acc, __dmul_rn(wf, wf));
    }
    if (flags & WANT_NORM) {
        acc = block_sum_f64(acc, sh_mom);
        if (threadIdx.x == 0) partial[block_slot()] = acc;
    }
}

// LAMB's moments and direction of each job in f32; c holds 9 floats per job
// (s, b1, 1 - b1, b2, 1 - b2, c1, c2, eps, wd):
//   g' = s*g;  m = b1*m + (1-b1)*g';  v = b2*v + ((1-b2)*g')*g';  u = (m*c1)/(sqrt(v*c2) + eps) + wd*w
// partial[2 * slot + {0, 1}] = sums of u^2 and w^2 over the block. `u` is indexed like w.
// Dynamic shared memory: blockDim.x doubles.
extern "C" __global__ void optim_lamb_moments(const float* w, const float* g, float* m, float* v,
                                              float* u, const i64* jobs, const float* c,
                                              double* partial) {
    extern __shared__ double sh_lamb[];
    const i64 off = job_offset(jobs), n = job_len(jobs);
    const float* cj = c + 9 * (i64)blockIdx.y;
    const float s = cj[0], b1 = cj[1], a1 = cj[2], b2 = cj[3], a2 = cj[4];
    const float c1 = cj[5], c2 = cj[6], eps = cj[7], wd = cj[8];
    double uu = 0.0, ww = 0.0;
    for (i64 i = gtid(); i < n; i += gstride()) {
        i64 e = off + i;
        float wi = w[e];
        float gi = __fmul_rn(s, g[e]);
        float mi = __fadd_rn(__fmul_rn(b1, m[e]), __fmul_rn(a1, gi));
        float vi = __fadd_rn(__fmul_rn(b2, v[e]), __fmul_rn(__fmul_rn(a2, gi), gi));
        m[e] = mi;
        v[e] = vi;
        float den = __fadd_rn(__fsqrt_rn(__fmul_rn(vi, c2)), eps);
        float ui = __fadd_rn(__fdiv_rn(__fmul_rn(mi, c1), den), __fmul_rn(wd, wi));
        u[e] = ui;
        uu = __dadd_rn(uu, __dmul_rn((double)ui, (double)ui));
        ww = __dadd_rn(ww, __dmul_rn((double)wi, (double)wi));
    }
    uu = block_sum_f64(uu, sh_lamb);
    ww = block_sum_f64(ww, sh_lamb);
    if (threadIdx.x == 0) {
        partial[2 * block_slot()] = uu;
        partial[2 * block_slot() + 1] = ww;
    }
}

// w = w - rate*u in f64, rounded to f32; one rate per job.
extern "C" __global__ void optim_lamb_apply(float* w, const float* u, const i64* jobs,
                                            const double* rate) {
    const i64 off = job_offset(jobs), n = job_len(jobs);
    const double r = rate[blockIdx.y];
    for (i64 i = gtid(); i < n; i += gstride()) {
        i64 e = off + i;
        w[e] = __double2float_rn(__dsub_rn((double)w[e], __dmul_rn(r, (double)u[e])));
    }
}
