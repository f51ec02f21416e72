// A CPU emulation of the parts of CUDA C++ that the kernels in ../kernels use, so that the very
// kernel sources NVRTC compiles also run, unchanged, on machines without a GPU (rank/src/device/
// cuda/emu.rs builds them with the host's C++ compiler and checks them against the f64
// references). Every CUDA thread of a block is an OS thread; the blocks of a grid run one after
// another, so `__shared__` variables become statics (one copy, the running block's). A thread
// that returns leaves its block's barriers, as on the GPU. Warp-wide
// instructions (the mma.sync tensor-core products) gather the 32 lanes' fragments through a
// per-warp exchange and two warp barriers, and compute each lane's result from the fragment
// layouts of the PTX ISA ("Matrix Fragments for mma.m16n8k8" and "... mma.m16n8k16 with
// floating point type"), written here independently of the kernels' indexing.
//
// Not a model of timing, of memory ordering beyond the barriers, or of the tensor cores'
// internal accumulation order (sums are taken in fp32, in k order). The point is the indexing:
// every tile, fragment, mask and padding decision of the kernels runs here as it does on a GPU.

#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>
#include <utility>
#include <vector>

#define TESSERA_EMU 1
#define __global__
#define __device__ static inline
#define __forceinline__
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};
static inline float2 make_float2(float x, float y) { return {x, y}; }

thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

#if defined(__SANITIZE_THREAD__)
extern "C" void __tsan_acquire(void* addr);
extern "C" void __tsan_release(void* addr);
extern "C" void __tsan_read_range(void* addr, unsigned long size);
extern "C" void __tsan_write_range(void* addr, unsigned long size);
extern "C" void AnnotateIgnoreSyncBegin(const char* file, int line);
extern "C" void AnnotateIgnoreSyncEnd(const char* file, int line);
extern "C" void AnnotateIgnoreReadsBegin(const char* file, int line);
extern "C" void AnnotateIgnoreReadsEnd(const char* file, int line);
extern "C" void AnnotateIgnoreWritesBegin(const char* file, int line);
extern "C" void AnnotateIgnoreWritesEnd(const char* file, int line);
#endif

namespace emu {

// One launch at a time: emu.rs holds a Rust mutex around each, which ThreadSanitizer (built with
// `TESSERA_EMU_SANITIZE=thread`) does not see. This tells it so, through `token` (the same
// address for every module): each launch happens after the one before, whichever thread made
// it, so a kernel's reads of what an earlier launch wrote are not reported.
struct LaunchOrder {
    void* token;
    explicit LaunchOrder(void* t) : token(t) {
#if defined(__SANITIZE_THREAD__)
        __tsan_acquire(token);
#endif
    }
    ~LaunchOrder() {
#if defined(__SANITIZE_THREAD__)
        __tsan_release(token);
#endif
    }
};

// The emulation's own plumbing: under ThreadSanitizer, the accesses and synchronisation inside
// one of these scopes are neither checked nor taken as synchronisation between the threads.
// Used for the warp-wide exchanges (fragments, ldmatrix's row addresses) and for finding a
// block's shared memory. That is also the hardware's rule: mma.sync and ldmatrix do not order
// the lanes' other memory accesses (a barrier or __syncwarp does), so a kernel that relies on
// them to is reported. (It also keeps the sanitizer's cost per emulated warp instruction down.)
struct Plumbing {
#if defined(__SANITIZE_THREAD__)
    Plumbing() {
        AnnotateIgnoreSyncBegin(__FILE__, __LINE__);
        AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
        AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
    }
    ~Plumbing() {
        AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
        AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
        AnnotateIgnoreSyncEnd(__FILE__, __LINE__);
    }
#endif
};

struct Warp {
    explicit Warp(std::ptrdiff_t lanes) : bar(lanes) {}
    std::barrier<> bar;
    unsigned a[32][4];
    unsigned b[32][2];
    const void* row[32];
};

// A block's shared memory: the launch's dynamic shared memory and, for each `__shared__`
// declaration its threads meet (emu.rs rewrites each into a `block_shared` call), an array of
// its own, every one filled with 0xff bytes (NaN as f32, f64 and bf16) when the block starts:
// shared memory starts as garbage on a GPU, and a kernel that reads what its block did not write
// reads NaN here.
struct Block {
    Block(std::ptrdiff_t threads, unsigned shared) : bar(threads), dyn_shared(shared, 0xff) {
        for (std::ptrdiff_t w = 0; w < threads; w += 32)
            warps.emplace_back(std::make_unique<Warp>(std::min<std::ptrdiff_t>(32, threads - w)));
    }
    ~Block() {
        for (auto& st : statics) std::free(st.second);
    }
    std::barrier<> bar;
    std::vector<std::unique_ptr<Warp>> warps;
    std::vector<unsigned char> dyn_shared;
    std::mutex statics_m;
    std::vector<std::pair<const void*, void*>> statics;  // (declaration, its array)
};

// The emulation's own memcpy and memset of kernel memory, made known to ThreadSanitizer as the
// kernel's reads and writes (the compiler expands small ones inline, uninstrumented).
inline void note_read(const void* p, std::size_t n) {
#if defined(__SANITIZE_THREAD__)
    __tsan_read_range(const_cast<void*>(p), n);
#else
    (void)p, (void)n;
#endif
}
inline void note_write(void* p, std::size_t n) {
#if defined(__SANITIZE_THREAD__)
    __tsan_write_range(p, n);
#else
    (void)p, (void)n;
#endif
}

thread_local Block* cur_block = nullptr;
thread_local unsigned cur_tid = 0;

// The running block's array T of the `__shared__` declaration `key` (one static per declaration
// and kernel instantiation), created poisoned by the first of its threads to ask.
template <typename T>
T* block_shared(const void* key) {
    Plumbing plumbing;  // (the lookup's lock orders nothing of the kernel's)
    Block& b = *cur_block;
    std::lock_guard<std::mutex> g(b.statics_m);
    for (auto& [k, p] : b.statics)
        if (k == key) return static_cast<T*>(p);
    void* p = std::aligned_alloc(128, (sizeof(T) + 127) / 128 * 128);
    if (p == nullptr) std::abort();
    std::memset(p, 0xff, sizeof(T));
    b.statics.emplace_back(key, p);
    return static_cast<T*>(p);
}

inline unsigned lane() { return cur_tid % 32; }
inline Warp& warp() { return *cur_block->warps[cur_tid / 32]; }

template <typename T>
T* dyn_shared() {
    return reinterpret_cast<T*>(cur_block->dyn_shared.data());
}

template <typename To, typename From>
To bits(From f) {
    static_assert(sizeof(To) == sizeof(From));
    To t;
    std::memcpy(&t, &f, sizeof t);
    return t;
}

// cvt.rna.tf32.f32: round to 10 mantissa bits, ties away from zero; low 13 bits zero.
inline unsigned cvt_rna_tf32(float f) {
    unsigned u = bits<unsigned>(f);
    if ((u & 0x7f800000u) == 0x7f800000u) return u;  // inf, NaN
    return (u + 0x1000u) & ~0x1fffu;
}

// cvt.rn.bf16.f32: round to nearest even.
inline unsigned short cvt_rn_bf16(float f) {
    unsigned u = bits<unsigned>(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);  // NaN
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// The tensor cores read only the tf32 bits of a .tf32 operand.
inline float tf32_value(unsigned r) { return bits<float>(r & ~0x1fffu); }
inline float bf16_value(unsigned short h) { return bits<float>((unsigned)h << 16); }

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32, one lane's part. g = lane / 4,
// q = lane % 4. A (16 x 8): a0 (g, q), a1 (g + 8, q), a2 (g, q + 4), a3 (g + 8, q + 4).
// B (8 x 8): b0 (k = q, n = g), b1 (k = q + 4, n = g). C/D: c0 (g, 2q), c1 (g, 2q + 1),
// c2 (g + 8, 2q), c3 (g + 8, 2q + 1).
inline void mma_m16n8k8_tf32(float c[4], const unsigned a[4], const unsigned b[2]) {
    Plumbing plumbing;
    Warp& w = warp();
    const unsigned l = lane();
    std::memcpy(w.a[l], a, sizeof w.a[l]);
    std::memcpy(w.b[l], b, sizeof w.b[l]);
    w.bar.arrive_and_wait();
    auto A = [&](int r, int k) {
        const int g = r % 8, q = k % 4, reg = (r / 8) + 2 * (k / 4);
        return tf32_value(w.a[4 * g + q][reg]);
    };
    auto B = [&](int k, int n) { return tf32_value(w.b[4 * n + k % 4][k / 4]); };
    const int g = l / 4, q = l % 4;
    for (int e = 0; e < 4; ++e) {
        const int r = g + 8 * (e / 2), n = 2 * q + (e % 2);
        float acc = c[e];
        for (int k = 0; k < 8; ++k) acc += A(r, k) * B(k, n);
        c[e] = acc;
    }
    w.bar.arrive_and_wait();
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, one lane's part. Each register holds
// two bf16, the lower k in the low half. A (16 x 16): a0 (g, 2q..2q+1), a1 (g + 8, 2q..),
// a2 (g, 2q + 8..), a3 (g + 8, 2q + 8..). B (16 x 8): b0 (k = 2q..2q+1, n = g),
// b1 (k = 2q + 8.., n = g). C/D as for m16n8k8.
inline void mma_m16n8k16_bf16(float c[4], const unsigned a[4], const unsigned b[2]) {
    Plumbing plumbing;
    Warp& w = warp();
    const unsigned l = lane();
    std::memcpy(w.a[l], a, sizeof w.a[l]);
    std::memcpy(w.b[l], b, sizeof w.b[l]);
    w.bar.arrive_and_wait();
    auto half = [](unsigned r, int k) { return bf16_value((unsigned short)(k % 2 ? r >> 16 : r)); };
    auto A = [&](int r, int k) {
        const int g = r % 8, q = (k % 8) / 2, reg = (r / 8) + 2 * (k / 8);
        return half(w.a[4 * g + q][reg], k);
    };
    auto B = [&](int k, int n) { return half(w.b[4 * n + (k % 8) / 2][k / 8], k); };
    const int g = l / 4, q = l % 4;
    for (int e = 0; e < 4; ++e) {
        const int r = g + 8 * (e / 2), n = 2 * q + (e % 2);
        float acc = c[e];
        for (int k = 0; k < 16; ++k) acc += A(r, k) * B(k, n);
        c[e] = acc;
    }
    w.bar.arrive_and_wait();
}

// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16, one lane's part (PTX ISA, "Warp-level
// matrix load instruction: ldmatrix"): lane 8 m + r supplies the address of row r (8 b16, 16
// bytes) of matrix m; register m of lane 4 r + w receives word w of row r of matrix m (its
// elements 2 w, 2 w + 1, the lower in the low half), of the transposed matrix with .trans
// (elements (2 w, r) and (2 w + 1, r) of the matrix as stored).
inline void ldmatrix_x4(unsigned r[4], const void* row_addr, bool trans) {
    Warp& w = warp();
    const unsigned l = lane();
    const unsigned char* rows[4][8];
    {
        Plumbing plumbing;
        w.row[l] = row_addr;
        w.bar.arrive_and_wait();
        for (int m = 0; m < 4; ++m)
            for (int row = 0; row < 8; ++row)
                rows[m][row] = static_cast<const unsigned char*>(w.row[8 * m + row]);
        w.bar.arrive_and_wait();
    }
    // The shared-memory reads themselves, as this lane's (checked under ThreadSanitizer).
    auto elem = [&](int m, int row, int col) {
        unsigned short h;
        note_read(rows[m][row] + 2 * col, 2);
        std::memcpy(&h, rows[m][row] + 2 * col, 2);
        return (unsigned)h;
    };
    const int rr = l / 4, ww = l % 4;
    for (int m = 0; m < 4; ++m)
        r[m] = trans ? elem(m, 2 * ww, rr) | (elem(m, 2 * ww + 1, rr) << 16)
                     : elem(m, rr, 2 * ww) | (elem(m, rr, 2 * ww + 1) << 16);
}

// Runs f(args...) for every thread of every block; args[i] points at the i-th argument's value
// (as cuLaunchKernel's kernelParams).
// cp.async (sm_80): each thread's copies wait in its open group until cp_async_commit, and a
// committed group lands in shared memory only at cp_async_wait(n) (all but the n most recent
// groups), as on the GPU, where nothing guarantees it lands earlier. Nor later than the issue:
// the destination is undefined from then on, so the issue fills it with 0xff bytes (NaN). A
// kernel that reads a stage before waiting for it reads NaN here, and one that refills a buffer
// other threads still read (no barrier between) overwrites what they read; under
// ThreadSanitizer both writes (at the issue and at the wait) are checked against the other
// threads' accesses.
struct CpAsync {
    void* dst;
    const void* src;
    int bytes;
    unsigned src_bytes;
};
inline thread_local std::vector<CpAsync> cp_open;
inline thread_local std::vector<std::vector<CpAsync>> cp_groups;
// Set when a thread of a launch ends with copies not waited for (a kernel bug: they would land
// at no defined time); the launcher then fails.
inline std::atomic<bool> cp_leak{false};
inline void cp_async(void* dst, const void* src, int bytes, unsigned src_bytes) {
    note_write(dst, bytes);
    std::memset(dst, 0xff, bytes);
    cp_open.push_back({dst, src, bytes, src_bytes});
}
inline void cp_async_commit() {
    cp_groups.push_back(std::move(cp_open));
    cp_open.clear();
}
inline void cp_async_wait(std::size_t n) {
    while (cp_groups.size() > n) {
        for (const CpAsync& c : cp_groups.front()) {
            note_read(c.src, c.src_bytes);
            note_write(c.dst, c.bytes);
            if (c.src_bytes > 0) std::memcpy(c.dst, c.src, c.src_bytes);
            std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0, c.bytes - c.src_bytes);
        }
        cp_groups.erase(cp_groups.begin());
    }
}

template <typename... A, std::size_t... I>
void call(void (*f)(A...), void** args, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...);
}

// The order in which a launch runs its blocks: `order` 0, by linear index (x fastest); else a
// permutation of them drawn from `order` (Fisher-Yates on splitmix64), since a GPU runs a
// grid's blocks in no defined order and a kernel must not depend on one.
inline std::vector<unsigned long long> block_order(unsigned long long blocks,
                                                   unsigned long long order) {
    std::vector<unsigned long long> p(blocks);
    for (unsigned long long i = 0; i < blocks; ++i) p[i] = i;
    if (order == 0) return p;
    unsigned long long x = order;
    auto next = [&x]() {
        x += 0x9e3779b97f4a7c15ULL;
        unsigned long long z = x;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
        return z ^ (z >> 31);
    };
    for (unsigned long long i = blocks; i > 1; --i) std::swap(p[i - 1], p[next() % i]);
    return p;
}

// How many blocks of a grid run at once: one, except under ThreadSanitizer, where blocks in
// different slots have no order between them (as a GPU's blocks have none), so that a race
// between blocks (two writing one address, one reading what another writes, a non-atomic
// read-modify-write shared by blocks) is reported too.
#if defined(__SANITIZE_THREAD__)
constexpr unsigned long long SLOTS = 4;
#else
constexpr unsigned long long SLOTS = 1;
#endif

// One slot: `threads` OS threads that run the blocks first, first + stride, ... of the launch's
// order one after another. A block's barriers and shared memory are built when its turn comes,
// by the completion step of `next` (which runs once all threads have left the previous block,
// before any is released).
struct Slot {
    struct Advance {
        Slot* s;
        void operator()() noexcept {
            s->n += s->stride;
            s->cur.reset();
            if (s->n < s->blocks) s->cur = std::make_unique<Block>(s->threads, s->shared);
        }
    };
    Slot(unsigned threads, unsigned shared, unsigned long long first, unsigned long long stride,
         unsigned long long blocks)
        : threads(threads), shared(shared), n(first), stride(stride), blocks(blocks),
          cur(std::make_unique<Block>(threads, shared)), next(threads, Advance{this}) {}
    unsigned threads, shared;
    unsigned long long n, stride, blocks;
    std::unique_ptr<Block> cur;
    std::barrier<Advance> next;
};

template <typename... A>
void launch(void (*f)(A...), const unsigned grid[3], const unsigned block[3], unsigned shared,
            void** args, unsigned long long order) {
    const unsigned threads = block[0] * block[1] * block[2];
    const unsigned long long blocks = (unsigned long long)grid[0] * grid[1] * grid[2];
    if (threads == 0 || blocks == 0) return;
    const std::vector<unsigned long long> turn = block_order(blocks, order);
    // One OS thread per CUDA thread of each slot, reused for the slot's blocks.
    const unsigned long long slots = std::min(blocks, SLOTS);
    std::vector<std::unique_ptr<Slot>> ss;
    for (unsigned long long k = 0; k < slots; ++k)
        ss.push_back(std::make_unique<Slot>(threads, shared, k, slots, blocks));
    std::vector<std::thread> ts;
    ts.reserve(threads * slots);
    for (unsigned long long k = 0; k < slots; ++k)
        for (unsigned t = 0; t < threads; ++t)
            ts.emplace_back([&, t, k] {
                Slot& slot = *ss[k];
                cur_tid = t;
                threadIdx = {t % block[0], (t / block[0]) % block[1], t / (block[0] * block[1])};
                blockDim = {block[0], block[1], block[2]};
                gridDim = {grid[0], grid[1], grid[2]};
                // slot.n: the slot's block, which only the completion step of slot.next
                // moves on, while every thread of the slot waits there.
                for (;;) {
                    cur_block = slot.cur.get();
                    const unsigned long long i = turn[slot.n];
                    blockIdx = {(unsigned)(i % grid[0]), (unsigned)((i / grid[0]) % grid[1]),
                                (unsigned)(i / ((unsigned long long)grid[0] * grid[1]))};
                    call(f, args, std::index_sequence_for<A...>{});
                    if (!cp_open.empty() || !cp_groups.empty()) {
                        cp_leak = true;
                        cp_open.clear();
                        cp_groups.clear();
                    }
                    // An exited thread no longer counts at its block's barriers, as on the GPU
                    // (sm_70 and later): the others' later __syncthreads do not wait for it.
                    cur_block->bar.arrive_and_drop();
                    warp().bar.arrive_and_drop();
                    slot.next.arrive_and_wait();
                    if (slot.n >= blocks) break;
                }
            });
    for (auto& t : ts) t.join();
}

}  // namespace emu

inline void __syncthreads() { emu::cur_block->bar.arrive_and_wait(); }

inline float __int_as_float(int i) { return emu::bits<float>(i); }
inline float __uint_as_float(unsigned u) { return emu::bits<float>(u); }
inline unsigned __float_as_uint(float f) { return emu::bits<unsigned>(f); }
inline double __longlong_as_double(long long i) { return emu::bits<double>(i); }

// The _rn intrinsics: one IEEE operation, rounded to nearest even (the host's default mode; the
// emulation is compiled with -ffp-contract=off so that nothing is fused).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __double2float_rn(double a) { return (float)a; }

// Relaxed, as CUDA's atomics are: an atomic orders nothing else, so under ThreadSanitizer a
// kernel that passes data between threads through one (without a barrier) is reported.
inline float atomicAdd(float* p, float v) {
    return std::atomic_ref<float>(*p).fetch_add(v, std::memory_order_relaxed);
}
inline double atomicAdd(double* p, double v) {
    return std::atomic_ref<double>(*p).fetch_add(v, std::memory_order_relaxed);
}
