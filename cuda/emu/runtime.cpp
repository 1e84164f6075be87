// The emulated device's runtime: device memory (an arena with a shadow byte per byte), the scheduler
// that runs a kernel's threads as fibers, barriers and warp collectives, and the checks that the
// instrumented kernel code (compiled with -fsanitize=thread, whose load/store hooks are defined here)
// reports through. This file itself is compiled without instrumentation.
//
// Checks (each finding stops the launch and makes it return an error with a report):
// - memcheck: a load or store of device or shared memory outside every live allocation (each device
//   buffer and each shared array has unaddressable redzones around it; freed memory stays
//   unaddressable), misaligned wmma/ldmatrix pointers, cp.async out of bounds.
// - initcheck: a load of a device or shared byte that no copy, memset or store has written.
// - racecheck: two threads of a block accessing the same shared byte, at least one writing, with no
//   __syncthreads() between them (and, for two lanes of one warp, no __syncwarp(): shuffles and votes
//   exchange registers but, as documented, order no memory).
// - synccheck: a barrier some threads of the block can never reach (a thread exited or waits at another
//   __syncthreads()), warp collectives whose named lanes never arrive or disagree on the mask.
// - launch checks: block and grid dimensions, dynamic shared memory over 48 KiB without the opt-in, and
//   over the architecture's opt-in limit (227 KiB on sm_90), static shared memory over 48 KiB.

#include <dlfcn.h>
#include <sys/mman.h>
#include <unistd.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#define MOLORA_EMU_RUNTIME 1
#include "emu.cuh"

extern "C" {
__thread const emu::Coords *molora_emu_coords = nullptr;
}

namespace emu {
namespace {

// ---- errors ---------------------------------------------------------------------------------------
constexpr int kErrInvalidValue = 1;
constexpr int kErrMemoryAllocation = 2;
constexpr int kErrInvalidConfiguration = 9;
constexpr int kErrIllegalAddress = 700;
constexpr int kErrLaunchFailure = 719;

thread_local std::string tl_report;
thread_local int tl_last_error = 0;
// A kernel failed a check (like a fault that corrupts a GPU context): later launches on this thread do
// not run until the error is read with cudaGetLastError, so one bug gives one report.
thread_local bool tl_fault = false;

// A failed launch: the report, and the error that cudaGetLastError returns next.
int set_error(int code, std::string msg) {
    tl_report = std::move(msg);
    if (tl_last_error == 0) tl_last_error = code;
    return code;
}

// A failed call that returns its error itself (memory, cudaFuncSetAttribute): the report only, so that
// no later launch reads a stale error.
int set_report(int code, std::string msg) {
    tl_report = std::move(msg);
    return code;
}

std::string vformat(const char *fmt, va_list ap) {
    char buf[2048];
    vsnprintf(buf, sizeof buf, fmt, ap);
    return buf;
}

std::string format(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    std::string s = vformat(fmt, ap);
    va_end(ap);
    return s;
}

// "file:line (function)" of a code address, through addr2line on the module that holds it.
std::string where(const void *pc) {
    if (!pc) return "";
    Dl_info info;
    if (!dladdr(pc, &info) || !info.dli_fname) return format(" at %p", pc);
    const uintptr_t off = reinterpret_cast<uintptr_t>(pc) - reinterpret_cast<uintptr_t>(info.dli_fbase) - 1;
    std::string cmd = format("addr2line -C -f -i -e '%s' 0x%lx 2>/dev/null", info.dli_fname, static_cast<unsigned long>(off));
    std::string out;
    if (FILE *p = popen(cmd.c_str(), "r")) {
        char line[1024];
        std::vector<std::string> lines;
        while (fgets(line, sizeof line, p)) {
            std::string l(line);
            while (!l.empty() && (l.back() == '\n' || l.back() == '\r')) l.pop_back();
            lines.push_back(l);
        }
        pclose(p);
        // Pairs of (function, file:line), innermost first: the innermost location in the kernel sources
        // (cuda/*.cu, cuda/*.cuh), and the emulator header's location when the access is in there.
        std::string emu_loc;
        for (size_t i = 0; i + 1 < lines.size(); i += 2) {
            std::string loc = lines[i + 1];
            const size_t at = loc.rfind("/cuda/");
            if (at == std::string::npos) continue;
            loc = loc.substr(at + 1);
            const size_t disc = loc.find(" (discriminator");
            if (disc != std::string::npos) loc = loc.substr(0, disc);
            if (loc.rfind("cuda/emu/", 0) == 0) {
                if (emu_loc.empty()) emu_loc = loc;
                continue;
            }
            out = " at " + loc + (emu_loc.empty() ? "" : " (in " + emu_loc + ")");
            break;
        }
    }
    if (out.empty()) out = format(" at %s+0x%lx", info.dli_fname, static_cast<unsigned long>(off));
    return out;
}

// ---- the arena: device memory and shared memory, with a shadow byte per byte ----------------------
enum : uint8_t { kNoAccess = 0, kUnwritten = 1, kWritten = 2 };
constexpr size_t kArenaBytes = size_t(64) << 30;
constexpr size_t kRedzone = 256;

struct Alloc {
    size_t bytes;
    bool live;
};

struct Arena {
    char *base = nullptr;
    uint8_t *shadow = nullptr;
    size_t next = 0;
    std::mutex mu;
    std::map<uintptr_t, Alloc> allocs;  // start address -> device buffer (freed ones stay, for reports)
    bool init() {
        if (base) return true;
        void *b = mmap(nullptr, kArenaBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        void *s = mmap(nullptr, kArenaBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (b == MAP_FAILED || s == MAP_FAILED) return false;
        base = static_cast<char *>(b);
        shadow = static_cast<uint8_t *>(s);
        next = kRedzone;
        return true;
    }
    // [lo, lo + bytes) of fresh arena, with redzones; null when exhausted.
    char *carve(size_t bytes, size_t align) {
        if (align < 256) align = 256;
        size_t start = (next + kRedzone + align - 1) / align * align;
        size_t end = start + bytes;
        if (end + kRedzone > kArenaBytes) return nullptr;
        next = end + kRedzone;
        return base + start;
    }
};
Arena g_arena;
std::once_flag g_arena_once;
bool g_arena_ok = false;

Arena &arena() {
    std::call_once(g_arena_once, [] { g_arena_ok = g_arena.init(); });
    return g_arena;
}

inline bool in_arena(uintptr_t a) {
    return g_arena.base && a - reinterpret_cast<uintptr_t>(g_arena.base) < kArenaBytes;
}
inline uint8_t *shadow_of(uintptr_t a) { return g_arena.shadow + (a - reinterpret_cast<uintptr_t>(g_arena.base)); }

void release_pages(char *p, size_t bytes) {
    const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
    uintptr_t lo = (reinterpret_cast<uintptr_t>(p) + page - 1) / page * page;
    uintptr_t hi = (reinterpret_cast<uintptr_t>(p) + bytes) / page * page;
    if (hi > lo) {
        madvise(reinterpret_cast<void *>(lo), hi - lo, MADV_DONTNEED);
        madvise(shadow_of(lo), hi - lo, MADV_DONTNEED);
    }
}

std::string describe_shared(uintptr_t a);

// The allocation nearest to an address (for reports).
std::string describe(uintptr_t a) {
    std::string sh = describe_shared(a);
    if (!sh.empty()) return sh;
    Arena &ar = g_arena;
    std::lock_guard<std::mutex> lock(ar.mu);
    auto it = ar.allocs.upper_bound(a);
    std::string s;
    auto name = [](uintptr_t start, const Alloc &al) {
        return format("%s%zu-byte device buffer at 0x%lx", al.live ? "" : "freed ", al.bytes, static_cast<unsigned long>(start));
    };
    if (it != ar.allocs.begin()) {
        auto prev = std::prev(it);
        const uintptr_t start = prev->first, end = start + prev->second.bytes;
        if (a >= start && a < end) return "inside the " + name(start, prev->second);
        if (a >= end && a - end < 4096)
            s = format("%lu bytes past the end of the ", static_cast<unsigned long>(a - end)) + name(start, prev->second);
    }
    if (s.empty() && it != ar.allocs.end() && it->first - a < 4096)
        s = format("%lu bytes before the ", static_cast<unsigned long>(it->first - a)) + name(it->first, it->second);
    if (s.empty()) s = "outside every allocation";
    return s;
}

// ---- fibers ----------------------------------------------------------------------------------------
#if defined(__x86_64__)
extern "C" void molora_emu_switch(void **save_sp, void *load_sp);
extern "C" void molora_emu_trampoline();
asm(R"(
    .text
    .p2align 4
    .globl molora_emu_switch
    .hidden molora_emu_switch
    .type molora_emu_switch,@function
molora_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $16, %rsp
    stmxcsr 8(%rsp)
    fnstcw 12(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr 8(%rsp)
    fldcw 12(%rsp)
    addq $16, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size molora_emu_switch,.-molora_emu_switch

    .p2align 4
    .globl molora_emu_trampoline
    .hidden molora_emu_trampoline
    .type molora_emu_trampoline,@function
molora_emu_trampoline:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size molora_emu_trampoline,.-molora_emu_trampoline
    .section .note.GNU-stack,"",@progbits
    .text
)");

// A fresh stack whose first switch enters entry(arg).
void *init_stack(char *stack, size_t size, void (*entry)(void *), void *arg) {
    uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + size) & ~uintptr_t(15);
    uint64_t *sp = reinterpret_cast<uint64_t *>(top - 88);
    uint32_t *csr = reinterpret_cast<uint32_t *>(sp);
    csr[2] = 0x1F80;  // mxcsr: default rounding, exceptions masked
    csr[3] = 0x037F;  // x87 control word
    sp[2] = 0;                                            // r15
    sp[3] = 0;                                            // r14
    sp[4] = reinterpret_cast<uint64_t>(entry);            // r13
    sp[5] = reinterpret_cast<uint64_t>(arg);              // r12
    sp[6] = 0;                                            // rbx
    sp[7] = 0;                                            // rbp
    sp[8] = reinterpret_cast<uint64_t>(&molora_emu_trampoline);  // return address
    return sp;
}
struct Context {
    void *sp = nullptr;
};
inline void switch_to(Context &from, Context &to) { molora_emu_switch(&from.sp, to.sp); }
void init_context(Context &c, char *stack, size_t size, void (*entry)(void *), void *arg) {
    c.sp = init_stack(stack, size, entry, arg);
}
#else
// Other architectures: glibc's ucontext (slower: every switch is a system call).
struct Context {
    ucontext_t uc;
};
inline void switch_to(Context &from, Context &to) { swapcontext(&from.uc, &to.uc); }
void uc_trampoline(unsigned hi, unsigned lo, unsigned ehi, unsigned elo) {
    void *arg = reinterpret_cast<void *>((static_cast<uintptr_t>(hi) << 32) | lo);
    auto entry = reinterpret_cast<void (*)(void *)>((static_cast<uintptr_t>(ehi) << 32) | elo);
    entry(arg);
}
void init_context(Context &c, char *stack, size_t size, void (*entry)(void *), void *arg) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack + 4096;
    c.uc.uc_stack.ss_size = size - 4096;
    c.uc.uc_link = nullptr;
    const uintptr_t a = reinterpret_cast<uintptr_t>(arg), e = reinterpret_cast<uintptr_t>(entry);
    makecontext(&c.uc, reinterpret_cast<void (*)()>(&uc_trampoline), 4, static_cast<unsigned>(a >> 32),
                static_cast<unsigned>(a), static_cast<unsigned>(e >> 32), static_cast<unsigned>(e));
}
#endif

constexpr size_t kStackBytes = 256 * 1024;

struct Stack {
    char *mem = nullptr;
    Stack() {
        void *p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p != MAP_FAILED) {
            mem = static_cast<char *>(p);
            mprotect(mem, 4096, PROT_NONE);  // guard page: a runaway stack faults instead of corrupting
        }
    }
    ~Stack() {
        if (mem) munmap(mem, kStackBytes);
    }
    Stack(const Stack &) = delete;
    Stack &operator=(const Stack &) = delete;
};

// ---- the scheduler ---------------------------------------------------------------------------------
enum class State { Ready, AtBarrier, AtWarp, Exited };

struct AsyncCopy {
    char *dst;
    const char *src;
    int bytes, src_bytes;
    const char *file;
    int line;
};

struct Thread {
    Coords coords{};
    Context ctx;
    State state = State::Ready;
    const char *wait_file = nullptr;
    int wait_line = 0;
    const char *wait_what = nullptr;
    std::vector<AsyncCopy> copies;   // issued, not completed
    std::vector<size_t> group_ends;  // committed groups: end index into copies
};

struct PendingOp {
    const char *what;
    const char *file;
    int line;
    unsigned mask;
    uint64_t key;
    unsigned arrived;
    void *data[32];
    Complete complete;
    bool orders;
};

struct RaceCell {
    uint32_t w_epoch;
    uint16_t w_tid;  // thread + 1, 0 = none
    uint16_t w_wep;
    uint32_t r_epoch;
    uint16_t r_tid;  // thread + 1, 0 = none, kMany = several
    uint16_t r_wep;
};
constexpr uint16_t kMany = 0xFFFF;

struct SharedArray {
    char *ptr;
    size_t bytes;
    const char *name;
    const char *file;
    int line;
};

struct KernelAttrs {
    int max_dynamic_smem = 48 * 1024;
};
std::mutex g_attr_mu;
std::map<const void *, KernelAttrs> g_attrs;
std::atomic<int> g_arch{90};

size_t optin_smem_limit(int cc) {
    switch (cc) {
        case 80: case 87: return 163 * 1024;
        case 86: case 89: case 120: return 99 * 1024;
        case 90: case 100: return 227 * 1024;
        default: return 0;
    }
}

constexpr size_t kSharedWindow = 512 * 1024;

// Per OS thread: the fibers and stacks, the shared-memory window, the current launch.
struct Worker {
    Context sched;
    std::vector<Thread> threads;
    std::vector<std::unique_ptr<Stack>> stacks;
    std::vector<unsigned> runq;
    size_t runq_head = 0;
    // block state
    unsigned nthreads = 0;
    unsigned at_barrier = 0;
    const char *barrier_file = nullptr;
    int barrier_line = 0;
    uint32_t epoch = 1;
    std::vector<uint32_t> warp_epoch;
    std::vector<std::vector<PendingOp>> warp_ops;
    // shared memory window
    char *window = nullptr;
    size_t window_used = 0;
    size_t static_smem = 0;
    std::vector<RaceCell> race;
    std::vector<SharedArray> arrays;
    char *dynamic = nullptr;
    // launch
    const char *kernel = nullptr;
    Body body = nullptr;
    void *params = nullptr;
    bool failed = false;
    Thread *cur = nullptr;
    int as_lane = -1;
    bool in_launch = false;
};
Worker &worker() {
    thread_local Worker w;
    return w;
}

std::string name_of(const Thread &t) {
    return format("thread (%u,%u,%u)", t.coords.thread.x, t.coords.thread.y, t.coords.thread.z);
}

[[noreturn]] void abort_thread() {
    Worker &w = worker();
    w.failed = true;
    switch_to(w.cur->ctx, w.sched);
    __builtin_unreachable();
}

void finding(int code, const char *check, const std::string &msg, bool stop) {
    Worker &w = worker();
    if (!w.in_launch) {
        set_error(code, format("molora emulator: %s: %s", check, msg.c_str()));
        return;
    }
    if (!w.failed) {
        std::string who = w.cur ? format(" by %s of block (%u,%u,%u)", name_of(*w.cur).c_str(), w.cur->coords.block.x,
                                         w.cur->coords.block.y, w.cur->coords.block.z)
                                : "";
        set_error(code, format("molora emulator: %s: kernel %s: %s%s", check, w.kernel, msg.c_str(), who.c_str()));
        tl_fault = true;
    }
    w.failed = true;
    if (stop && w.cur) abort_thread();
}

void thread_entry(void *arg) {
    Thread *t = static_cast<Thread *>(arg);
    Worker &w = worker();
    w.body(w.params);
    t->state = State::Exited;
    switch_to(t->ctx, w.sched);
    __builtin_unreachable();
}

void yield_current() {
    Worker &w = worker();
    switch_to(w.cur->ctx, w.sched);
    if (w.failed) abort_thread();
}

void make_ready(Worker &w, unsigned i) {
    w.threads[i].state = State::Ready;
    w.runq.push_back(i);
}

const char *short_file(const char *f) {
    if (!f) return "?";
    const char *s = std::strstr(f, "cuda/");
    return s ? s : f;
}

std::string describe_wait(const Thread &t) {
    switch (t.state) {
        case State::Exited: return "has exited";
        case State::AtBarrier: return format("waits at __syncthreads() at %s:%d", short_file(t.wait_file), t.wait_line);
        case State::AtWarp: return format("waits at %s at %s:%d", t.wait_what, short_file(t.wait_file), t.wait_line);
        case State::Ready: return "is ready";
    }
    return "";
}

// Nothing can run but not every thread has exited: say why.
std::string diagnose_deadlock(Worker &w) {
    for (size_t wi = 0; wi < w.warp_ops.size(); ++wi) {
        for (const PendingOp &op : w.warp_ops[wi]) {
            for (int l = 0; l < 32; ++l) {
                if (!(op.mask & (1u << l)) || (op.arrived & (1u << l))) continue;
                const unsigned tid = static_cast<unsigned>(wi) * 32 + l;
                std::string whom = tid < w.nthreads ? "lane " + std::to_string(l) + " (" + name_of(w.threads[tid]) + ") " +
                                                          describe_wait(w.threads[tid])
                                                    : format("lane %d does not exist (the block has %u threads)", l, w.nthreads);
                return format("%s at %s:%d of warp %zu (mask 0x%08x) can never complete: %s", op.what, short_file(op.file),
                              op.line, wi, op.mask, whom.c_str());
            }
        }
    }
    if (w.at_barrier > 0) {
        for (const Thread &t : w.threads) {
            if (t.state == State::Exited)
                return format("%u threads wait at __syncthreads() at %s:%d, but %s has exited (a barrier that some threads "
                              "of the block never reach hangs the GPU)",
                              w.at_barrier, short_file(w.barrier_file), w.barrier_line, name_of(t).c_str());
        }
    }
    return "the block's threads wait on each other";
}

void run_block(Worker &w) {
    w.runq.clear();
    w.runq_head = 0;
    for (unsigned i = 0; i < w.nthreads; ++i) w.runq.push_back(i);
    while (w.runq_head < w.runq.size() && !w.failed) {
        const unsigned i = w.runq[w.runq_head++];
        if (w.runq_head > 4096 && w.runq_head * 2 > w.runq.size()) {
            w.runq.erase(w.runq.begin(), w.runq.begin() + static_cast<long>(w.runq_head));
            w.runq_head = 0;
        }
        Thread &t = w.threads[i];
        if (t.state != State::Ready) continue;
        w.cur = &t;
        molora_emu_coords = &t.coords;
        switch_to(w.sched, t.ctx);
        w.cur = nullptr;
        molora_emu_coords = nullptr;
    }
    if (w.failed) return;
    for (const Thread &t : w.threads) {
        if (t.state != State::Exited) {
            w.cur = nullptr;
            finding(kErrLaunchFailure, "synccheck", diagnose_deadlock(w) + format(" (block (%u,%u,%u))", t.coords.block.x,
                                                                                     t.coords.block.y, t.coords.block.z),
                    false);
            return;
        }
    }
}

void reset_shared(Worker &w) {
    // Every byte the previous block used becomes unaddressable again, with no access history.
    if (w.window_used) {
        std::memset(shadow_of(reinterpret_cast<uintptr_t>(w.window)), kNoAccess, w.window_used);
        std::memset(w.race.data(), 0, w.window_used * sizeof(RaceCell));
    }
    w.window_used = 0;
    w.static_smem = 0;
    w.arrays.clear();
    w.dynamic = nullptr;
}

char *carve_shared(Worker &w, size_t bytes, size_t align) {
    if (align < 16) align = 16;
    size_t start = (w.window_used + 64 + align - 1) / align * align;  // a 64-byte redzone before each array
    if (start + bytes + 64 > kSharedWindow) return nullptr;
    w.window_used = start + bytes + 64;
    char *p = w.window + start;
    std::memset(shadow_of(reinterpret_cast<uintptr_t>(p)), kUnwritten, bytes);
    return p;
}

// ---- access checks (the instrumentation hooks) ----------------------------------------------------
// The current block's shared array at or near an address, or "" when the address is not in the window.
std::string describe_shared(uintptr_t a) {
    Worker &w = worker();
    if (!w.window || a - reinterpret_cast<uintptr_t>(w.window) >= kSharedWindow) return "";
    const SharedArray *best = nullptr;
    long best_dist = 0;
    for (const SharedArray &s : w.arrays) {
        const uintptr_t lo = reinterpret_cast<uintptr_t>(s.ptr), hi = lo + s.bytes;
        if (a >= lo && a < hi) {
            if (!s.line) return format("inside the block's %zu bytes of dynamic shared memory, at offset %lu", s.bytes, static_cast<unsigned long>(a - lo));
            return format("inside shared array '%s' (%zu bytes, declared at %s:%d)", s.name, s.bytes, short_file(s.file), s.line);
        }
        const long d = a >= hi ? static_cast<long>(a - hi) : -static_cast<long>(lo - a);
        if (!best || std::labs(d) < std::labs(best_dist)) {
            best = &s;
            best_dist = d;
        }
    }
    if (!best) return "shared memory, where the block has no array";
    if (!best->line)
        return format("%ld bytes %s the block's %zu bytes of dynamic shared memory", std::labs(best_dist), best_dist >= 0 ? "past the end of" : "before", best->bytes);
    if (best_dist >= 0)
        return format("%ld bytes past the end of shared array '%s' (%zu bytes, declared at %s:%d)", best_dist, best->name, best->bytes, short_file(best->file), best->line);
    return format("%ld bytes before shared array '%s' (%zu bytes, declared at %s:%d)", -best_dist, best->name, best->bytes, short_file(best->file), best->line);
}

void race_check(Worker &w, uintptr_t a, size_t n, bool write, const void *pc) {
    Thread *t = w.cur;
    if (!t) return;
    unsigned tid = t->coords.linear;
    if (w.as_lane >= 0) tid = t->coords.warp * 32 + static_cast<unsigned>(w.as_lane);
    const unsigned warp = tid / 32;
    const uint16_t wep = static_cast<uint16_t>(w.warp_epoch[warp]);
    const size_t off0 = a - reinterpret_cast<uintptr_t>(w.window);
    auto ordered = [&](uint16_t other1, uint32_t ep, uint16_t other_wep) {
        if (other1 == 0) return true;
        if (ep != w.epoch) return true;
        const unsigned other = other1 - 1u;
        if (other == tid) return true;
        return other / 32 == warp && other_wep != wep;
    };
    for (size_t i = 0; i < n; ++i) {
        RaceCell &c = w.race[off0 + i];
        const char *hazard = nullptr;
        unsigned other = 0;
        if (!ordered(c.w_tid, c.w_epoch, c.w_wep)) {
            hazard = write ? "write-after-write" : "read-after-write";
            other = c.w_tid - 1u;
        } else if (write && c.r_tid != 0 && c.r_epoch == w.epoch) {
            if (c.r_tid == kMany) {
                hazard = "write-after-read";
                other = ~0u;
            } else if (!ordered(c.r_tid, c.r_epoch, c.r_wep)) {
                hazard = "write-after-read";
                other = c.r_tid - 1u;
            }
        }
        if (hazard) {
            std::string o = other == ~0u ? std::string("an access by other threads of the block")
                                          : "an access by " + name_of(w.threads[other]);
            std::string me = w.as_lane >= 0 ? " (as lane " + std::to_string(w.as_lane) + " of its warp)" : "";
            std::string d = describe(a + i);
            finding(kErrLaunchFailure, "racecheck",
                    format("%s hazard on shared memory at 0x%lx (%s): a %zu-byte %s%s%s conflicts with %s earlier in the same "
                           "barrier interval (no __syncthreads()%s between them)",
                           hazard, static_cast<unsigned long>(a + i), d.c_str(), n, write ? "write" : "read", where(pc).c_str(),
                           me.c_str(), o.c_str(), other != ~0u && other / 32 == warp ? " or __syncwarp()" : ""),
                    true);
            return;
        }
        if (write) {
            c.w_tid = static_cast<uint16_t>(tid + 1);
            c.w_epoch = w.epoch;
            c.w_wep = wep;
            c.r_tid = 0;
        } else {
            if (c.r_tid == 0 || c.r_epoch != w.epoch || c.r_tid == tid + 1) {
                c.r_tid = static_cast<uint16_t>(tid + 1);
                c.r_epoch = w.epoch;
                c.r_wep = wep;
            } else if (c.r_tid != kMany) {
                // Two readers: a later write by a third thread conflicts with one of them; a write by one
                // of them conflicts with the other unless both are lanes of one warp ordered by __syncwarp.
                const unsigned r0 = c.r_tid - 1u;
                if (!(r0 / 32 == warp && c.r_wep == wep)) c.r_tid = kMany;
                else c.r_tid = static_cast<uint16_t>(tid + 1);
                c.r_wep = wep;
            }
        }
    }
}

void check_access(uintptr_t a, size_t n, bool write, const void *pc) {
    Worker &w = worker();
    uint8_t *sh = shadow_of(a);
    for (size_t i = 0; i < n; ++i) {
        if (sh[i] == kNoAccess) {
            std::string d = describe(a + i);
            finding(kErrIllegalAddress, "memcheck",
                    format("invalid %s of %zu bytes at 0x%lx (%s)%s", write ? "write" : "read", n,
                           static_cast<unsigned long>(a), d.c_str(), where(pc).c_str()),
                    true);
            return;
        }
    }
    if (!write) {
        for (size_t i = 0; i < n; ++i) {
            if (sh[i] == kUnwritten) {
                std::string d = describe(a + i);
                finding(kErrLaunchFailure, "initcheck",
                        format("read of %zu bytes at 0x%lx, byte %zu of which nothing has written (%s)%s", n,
                               static_cast<unsigned long>(a), i, d.c_str(), where(pc).c_str()),
                        true);
                return;
            }
        }
    } else {
        std::memset(sh, kWritten, n);
    }
    if (w.window && a - reinterpret_cast<uintptr_t>(w.window) < kSharedWindow && w.in_launch) race_check(w, a, n, write, pc);
}

inline void hook(const void *p, size_t n, bool write, const void *pc) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    if (!in_arena(a)) return;
    check_access(a, n, write, pc);
}


}  // namespace

void hook_access(const void *p, size_t n, bool write, const void *pc) { hook(p, n, write, pc); }

// ---- entry points of emu.cuh ------------------------------------------------------------------------
void run_kernel(const char *name, const void *func, dim3 grid, dim3 block, size_t dynamic_smem, Body body, void *params) {
    if (tl_fault) return;  // an earlier launch failed a check and nobody has read the error yet
    Worker &w = worker();
    w.as_lane = -1;
    if (w.in_launch) {
        set_error(kErrLaunchFailure, format("molora emulator: kernel %s launched from inside kernel %s (no dynamic parallelism)",
                                            name, w.kernel));
        return;
    }
    const uint64_t threads = uint64_t(block.x) * block.y * block.z;
    if (block.x == 0 || block.y == 0 || block.z == 0 || grid.x == 0 || grid.y == 0 || grid.z == 0 || threads > 1024 ||
        block.x > 1024 || block.y > 1024 || block.z > 64 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
        set_error(kErrInvalidConfiguration,
                  format("molora emulator: launch of %s with grid (%u,%u,%u) and block (%u,%u,%u): the GPU refuses it "
                         "(cudaErrorInvalidConfiguration: at most 1024 threads per block, block.z <= 64, grid.x < 2^31, "
                         "grid.y and grid.z <= 65535, none 0)",
                         name, grid.x, grid.y, grid.z, block.x, block.y, block.z));
        return;
    }
    int max_dyn;
    {
        std::lock_guard<std::mutex> lock(g_attr_mu);
        max_dyn = g_attrs[func].max_dynamic_smem;
    }
    if (dynamic_smem > static_cast<size_t>(max_dyn)) {
        set_error(kErrInvalidValue,
                  format("molora emulator: launch of %s with %zu bytes of dynamic shared memory, over the kernel's limit of "
                         "%d bytes (48 KiB unless raised with cudaFuncSetAttribute(MaxDynamicSharedMemorySize))",
                         name, dynamic_smem, max_dyn));
        return;
    }
    Arena &ar = arena();
    if (!g_arena_ok) {
        set_error(kErrMemoryAllocation, "molora emulator: could not reserve the arena");
        return;
    }
    if (!w.window) {
        std::lock_guard<std::mutex> lock(ar.mu);
        w.window = ar.carve(kSharedWindow, 4096);
        if (!w.window) {
            set_error(kErrMemoryAllocation, "molora emulator: the arena is exhausted");
            return;
        }
        w.race.assign(kSharedWindow, RaceCell{});
    }
    tl_report.clear();
    w.kernel = name;
    w.body = body;
    w.params = params;
    w.failed = false;
    w.in_launch = true;
    w.nthreads = static_cast<unsigned>(threads);
    while (w.stacks.size() < threads) w.stacks.push_back(std::make_unique<Stack>());
    w.threads.assign(threads, Thread{});
    const unsigned warps = (w.nthreads + 31) / 32;
    w.warp_epoch.assign(warps, 1);
    w.warp_ops.assign(warps, {});
    const size_t optin = optin_smem_limit(g_arch.load());
    for (unsigned bz = 0; bz < grid.z && !w.failed; ++bz) {
        for (unsigned by = 0; by < grid.y && !w.failed; ++by) {
            for (unsigned bx = 0; bx < grid.x && !w.failed; ++bx) {
                reset_shared(w);
                w.at_barrier = 0;
                w.epoch = 1;
                std::fill(w.warp_epoch.begin(), w.warp_epoch.end(), 1);
                for (auto &ops : w.warp_ops) ops.clear();
                if (dynamic_smem > 0) {
                    w.dynamic = carve_shared(w, dynamic_smem, 1024);
                    if (w.dynamic)
                        w.arrays.push_back(SharedArray{w.dynamic, dynamic_smem, "(dynamic shared memory)", "", 0});
                }
                for (unsigned i = 0; i < w.nthreads; ++i) {
                    Thread &t = w.threads[i];
                    t.state = State::Ready;
                    t.copies.clear();
                    t.group_ends.clear();
                    t.coords.thread = make_uint3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
                    t.coords.block = make_uint3(bx, by, bz);
                    t.coords.block_dim = block;
                    t.coords.grid_dim = grid;
                    t.coords.linear = i;
                    t.coords.lane = i % 32;
                    t.coords.warp = i / 32;
                    init_context(t.ctx, w.stacks[i]->mem, kStackBytes, &thread_entry, &t);
                }
                run_block(w);
                if (!w.failed && w.static_smem + dynamic_smem > optin) {
                    finding(kErrInvalidValue, "launch",
                            format("%zu bytes of static and %zu of dynamic shared memory, over the %zu bytes a block may "
                                   "have on sm_%d",
                                   w.static_smem, dynamic_smem, optin, g_arch.load()),
                            false);
                }
            }
        }
    }
    reset_shared(w);
    w.in_launch = false;
    w.cur = nullptr;
    molora_emu_coords = nullptr;
    if (!w.failed) tl_report.clear();
}

void *shared_array(size_t bytes, size_t align, const char *name, const char *file, int line) {
    Worker &w = worker();
    for (const SharedArray &s : w.arrays) {
        if (s.line == line && s.file == file && s.name == name) return s.ptr;
    }
    w.static_smem += bytes;
    if (w.static_smem > 48 * 1024) {
        finding(kErrInvalidValue, "launch",
                format("static shared memory of %zu bytes (with '%s' at %s:%d), over the 48 KiB a kernel may declare "
                       "statically",
                       w.static_smem, name, short_file(file), line),
                true);
    }
    char *p = carve_shared(w, bytes, align);
    if (!p) finding(kErrInvalidValue, "launch", format("shared memory of the block exceeds the emulator's window"), true);
    w.arrays.push_back(SharedArray{p, bytes, name, file, line});
    return p;
}

void *dynamic_shared(const char *, const char *, int) {
    Worker &w = worker();
    if (!w.dynamic) {
        // No dynamic shared memory was launched: a pointer to nothing addressable.
        return w.window + kSharedWindow - 64;
    }
    return w.dynamic;
}

void syncthreads(const char *file, int line) {
    Worker &w = worker();
    Thread *t = w.cur;
    if (!t) return;
    if (w.at_barrier > 0 && (w.barrier_line != line || std::strcmp(w.barrier_file, file) != 0)) {
        finding(kErrLaunchFailure, "synccheck",
                format("divergent barrier: __syncthreads() at %s:%d reached while %u threads of the block wait at "
                       "__syncthreads() at %s:%d",
                       short_file(file), line, w.at_barrier, short_file(w.barrier_file), w.barrier_line),
                true);
    }
    if (w.at_barrier == 0) {
        w.barrier_file = file;
        w.barrier_line = line;
    }
    ++w.at_barrier;
    if (w.at_barrier == w.nthreads) {
        w.at_barrier = 0;
        ++w.epoch;
        for (unsigned i = 0; i < w.nthreads; ++i)
            if (w.threads[i].state == State::AtBarrier) make_ready(w, i);
        return;
    }
    t->state = State::AtBarrier;
    t->wait_file = file;
    t->wait_line = line;
    yield_current();
}

void warp_collective(const char *what, const char *file, int line, unsigned mask, uint64_t key, void *mine, Complete complete,
                     bool orders_memory) {
    Worker &w = worker();
    Thread *t = w.cur;
    if (!t) return;
    const unsigned lane = t->coords.lane, warp = t->coords.warp;
    const unsigned bit = 1u << lane;
    if (!(mask & bit))
        finding(kErrLaunchFailure, "synccheck",
                format("%s at %s:%d called by lane %u with mask 0x%08x, which does not name the lane itself", what,
                       short_file(file), line, lane, mask),
                true);
    const unsigned warp_threads = std::min(32u, w.nthreads - warp * 32);
    const unsigned exists = warp_threads == 32 ? 0xffffffffu : ((1u << warp_threads) - 1u);
    if (mask & ~exists)
        finding(kErrLaunchFailure, "synccheck",
                format("%s at %s:%d with mask 0x%08x names lanes that do not exist (warp %u has %u threads)", what,
                       short_file(file), line, mask, warp, warp_threads),
                true);
    std::vector<PendingOp> &ops = w.warp_ops[warp];
    PendingOp *op = nullptr;
    for (PendingOp &o : ops) {
        if (o.mask & bit) {
            op = &o;
            break;
        }
    }
    if (op) {
        if (op->what != what && std::strcmp(op->what, what) != 0)
            finding(kErrLaunchFailure, "synccheck",
                    format("lane %u calls %s at %s:%d while lanes 0x%08x of its warp wait in %s at %s:%d with mask 0x%08x",
                           lane, what, short_file(file), line, op->arrived, op->what, short_file(op->file), op->line, op->mask),
                    true);
        if (op->mask != mask)
            finding(kErrLaunchFailure, "synccheck",
                    format("lanes disagree on the mask of %s at %s:%d: lane %u passes 0x%08x, others 0x%08x", what,
                           short_file(file), line, lane, mask, op->mask),
                    true);
        if (op->line != line || std::strcmp(op->file, file) != 0)
            finding(kErrLaunchFailure, "synccheck",
                    format("lane %u calls %s at %s:%d while lanes 0x%08x wait in %s at %s:%d (divergent warp)", lane, what,
                           short_file(file), line, op->arrived, op->what, short_file(op->file), op->line),
                    true);
        if (op->key != key)
            finding(kErrLaunchFailure, "synccheck",
                    format("lanes of warp %u pass different arguments (pointer, stride or width) to %s at %s:%d", warp, what,
                           short_file(file), line),
                    true);
    } else {
        ops.push_back(PendingOp{what, file, line, mask, key, 0, {}, complete, orders_memory});
        op = &ops.back();
    }
    op->data[lane] = mine;
    op->arrived |= bit;
    if (op->arrived == op->mask) {
        PendingOp done = *op;
        ops.erase(ops.begin() + (op - ops.data()));
        done.complete(done.data, done.mask);
        // __syncwarp orders the memory accesses of the lanes it names (the CUDA programming guide); the
        // shuffles, votes and matrix operations do not, so a lane's write to shared memory after a
        // shuffle still races with another lane's read before it. (The warp's whole epoch advances,
        // also for lanes outside a partial mask.)
        if (done.orders) ++w.warp_epoch[warp];
        for (int l = 0; l < 32; ++l) {
            if ((done.mask & (1u << l)) && static_cast<unsigned>(l) != lane) make_ready(w, warp * 32 + l);
        }
        return;
    }
    t->state = State::AtWarp;
    t->wait_file = file;
    t->wait_line = line;
    t->wait_what = what;
    yield_current();
}

void fail(const char *check, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    std::string msg = vformat(fmt, ap);
    va_end(ap);
    Worker &w = worker();
    finding(std::strcmp(check, "memcheck") == 0 ? kErrIllegalAddress : kErrLaunchFailure, check, msg, true);
    // Outside a kernel thread there is nothing to stop: the report stands and the caller goes on.
    if (!w.cur) std::abort();
    __builtin_unreachable();
}

void begin_as_lane(unsigned lane) { worker().as_lane = static_cast<int>(lane); }
void end_as_lane() { worker().as_lane = -1; }

void cp_async(void *smem, const void *gmem, int bytes, int src_bytes, const char *file, int line) {
    Worker &w = worker();
    if (!w.cur) return;
    const uintptr_t s = reinterpret_cast<uintptr_t>(smem);
    if (!(w.window && s - reinterpret_cast<uintptr_t>(w.window) < kSharedWindow))
        finding(kErrIllegalAddress, "memcheck",
                format("cp.async at %s:%d to %p, which is not shared memory", short_file(file), line, smem), true);
    if (s % static_cast<uintptr_t>(bytes) != 0 || (src_bytes > 0 && reinterpret_cast<uintptr_t>(gmem) % bytes != 0))
        finding(kErrIllegalAddress, "memcheck",
                format("cp.async at %s:%d of %d bytes with misaligned addresses %p <- %p", short_file(file), line, bytes, smem,
                       gmem),
                true);
    w.cur->copies.push_back(AsyncCopy{static_cast<char *>(smem), static_cast<const char *>(gmem), bytes, src_bytes, file, line});
}

void cp_async_commit() {
    Worker &w = worker();
    if (!w.cur) return;
    w.cur->group_ends.push_back(w.cur->copies.size());
}

void cp_async_wait(int pending) {
    Worker &w = worker();
    Thread *t = w.cur;
    if (!t) return;
    // Complete every committed group but the newest `pending` ones, oldest first.
    const size_t groups = t->group_ends.size();
    if (groups <= static_cast<size_t>(pending)) return;
    const size_t done_groups = groups - static_cast<size_t>(pending);
    const size_t end = t->group_ends[done_groups - 1];
    for (size_t i = 0; i < end; ++i) {
        const AsyncCopy &c = t->copies[i];
        char buf[16] = {0};
        if (c.src_bytes > 0) {
            hook(c.src, static_cast<size_t>(c.src_bytes), false, nullptr);
            std::memcpy(buf, c.src, static_cast<size_t>(c.src_bytes));
        }
        hook(c.dst, static_cast<size_t>(c.bytes), true, nullptr);
        std::memcpy(c.dst, buf, static_cast<size_t>(c.bytes));
    }
    t->copies.erase(t->copies.begin(), t->copies.begin() + static_cast<long>(end));
    t->group_ends.erase(t->group_ends.begin(), t->group_ends.begin() + static_cast<long>(done_groups));
    for (size_t &g : t->group_ends) g -= end;
}

#define EMU_RMW(NAME, T, EXPR)                                            \
    T NAME(T *p, T v) {                                                   \
        hook(p, sizeof(T), false, __builtin_return_address(0)); \
        const T old = *p;                                                 \
        *p = (EXPR);                                                      \
        std::memset(shadow_of(reinterpret_cast<uintptr_t>(p)), kWritten, in_arena(reinterpret_cast<uintptr_t>(p)) ? sizeof(T) : 0); \
        return old;                                                       \
    }
EMU_RMW(atomic_add_i32, int, static_cast<int>(static_cast<unsigned>(old) + static_cast<unsigned>(v)))
EMU_RMW(atomic_add_u32, unsigned, old + v)
EMU_RMW(atomic_add_u64, unsigned long long, old + v)
EMU_RMW(atomic_add_f32, float, old + v)
EMU_RMW(atomic_add_f64, double, old + v)
EMU_RMW(atomic_max_i32, int, old > v ? old : v)
EMU_RMW(atomic_min_i32, int, old < v ? old : v)
EMU_RMW(atomic_exch_i32, int, v)
EMU_RMW(atomic_exch_u32, unsigned, v)
EMU_RMW(atomic_exch_f32, float, v)
#undef EMU_RMW
int atomic_cas_i32(int *p, int compare, int v) {
    hook(p, 4, false, __builtin_return_address(0));
    const int old = *p;
    if (old == compare) *p = v;
    return old;
}
unsigned atomic_cas_u32(unsigned *p, unsigned compare, unsigned v) {
    hook(p, 4, false, __builtin_return_address(0));
    const unsigned old = *p;
    if (old == compare) *p = v;
    return old;
}

}  // namespace emu

// ---- the C API (molora_emu.h, and the renamed CUDA runtime calls of emu.cuh) ------------------------
using namespace emu;

namespace {
// The live allocation holding [p, p + n), or an error report.
bool find_live(const void *p, size_t n, const char *what, uintptr_t *start_out) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    std::lock_guard<std::mutex> lock(g_arena.mu);
    auto it = g_arena.allocs.upper_bound(a);
    if (it != g_arena.allocs.begin()) {
        auto prev = std::prev(it);
        const Alloc &al = prev->second;
        if (al.live && a >= prev->first && a + n <= prev->first + al.bytes && a + n >= a) {
            if (start_out) *start_out = prev->first;
            return true;
        }
        if (a >= prev->first && a < prev->first + std::max<size_t>(al.bytes, 1)) {
            set_report(kErrInvalidValue,
                      format("molora emulator: %s of %zu bytes at %p overruns the %s%zu-byte device buffer at 0x%lx", what, n, p,
                             al.live ? "" : "freed ", al.bytes, static_cast<unsigned long>(prev->first)));
            return false;
        }
    }
    set_report(kErrInvalidValue, format("molora emulator: %s of %zu bytes at %p: not device memory of the emulated device", what, n, p));
    return false;
}
}  // namespace

extern "C" {

int molora_emu_malloc(void **ptr, size_t bytes) {
    if (!ptr) return set_report(kErrInvalidValue, "molora emulator: molora_emu_malloc with a null result pointer");
    Arena &ar = arena();
    if (!g_arena_ok) return set_report(kErrMemoryAllocation, "molora emulator: could not reserve the arena");
    std::lock_guard<std::mutex> lock(ar.mu);
    char *p = ar.carve(bytes, 256);
    if (!p) return set_report(kErrMemoryAllocation, format("molora emulator: the arena cannot hold %zu more bytes", bytes));
    std::memset(shadow_of(reinterpret_cast<uintptr_t>(p)), kUnwritten, bytes);
    ar.allocs[reinterpret_cast<uintptr_t>(p)] = Alloc{bytes, true};
    *ptr = p;
    return 0;
}

int molora_emu_free(void *ptr) {
    if (!ptr) return 0;
    Arena &ar = arena();
    std::lock_guard<std::mutex> lock(ar.mu);
    auto it = ar.allocs.find(reinterpret_cast<uintptr_t>(ptr));
    if (it == ar.allocs.end() || !it->second.live)
        return set_report(kErrInvalidValue, format("molora emulator: free of %p, which is not a live device buffer", ptr));
    it->second.live = false;
    std::memset(shadow_of(it->first), kNoAccess, it->second.bytes);
    release_pages(static_cast<char *>(ptr), it->second.bytes);
    return 0;
}

int molora_emu_memcpy_htod(void *dst, const void *src, size_t bytes) {
    if (bytes == 0) return 0;
    if (!find_live(dst, bytes, "copy to the device", nullptr)) return kErrInvalidValue;
    std::memcpy(dst, src, bytes);
    std::memset(shadow_of(reinterpret_cast<uintptr_t>(dst)), kWritten, bytes);
    return 0;
}

int molora_emu_memcpy_dtoh(void *dst, const void *src, size_t bytes) {
    if (bytes == 0) return 0;
    if (!find_live(src, bytes, "copy from the device", nullptr)) return kErrInvalidValue;
    std::memcpy(dst, src, bytes);
    return 0;
}

int molora_emu_memcpy_dtod(void *dst, const void *src, size_t bytes) {
    if (bytes == 0) return 0;
    if (!find_live(src, bytes, "device-to-device copy from", nullptr)) return kErrInvalidValue;
    if (!find_live(dst, bytes, "device-to-device copy to", nullptr)) return kErrInvalidValue;
    std::memmove(dst, src, bytes);
    // The destination's bytes are as written as the source's.
    std::memmove(shadow_of(reinterpret_cast<uintptr_t>(dst)), shadow_of(reinterpret_cast<uintptr_t>(src)), bytes);
    return 0;
}

int molora_emu_memset(void *dst, int value, size_t bytes) {
    if (bytes == 0) return 0;
    if (!find_live(dst, bytes, "memset", nullptr)) return kErrInvalidValue;
    std::memset(dst, value, bytes);
    std::memset(shadow_of(reinterpret_cast<uintptr_t>(dst)), kWritten, bytes);
    return 0;
}

size_t molora_emu_last_report(char *buf, size_t cap) {
    const std::string &r = tl_report;
    if (buf && cap > 0) {
        const size_t n = std::min(cap - 1, r.size());
        std::memcpy(buf, r.data(), n);
        buf[n] = 0;
    }
    return r.size();
}

int molora_emu_set_arch(int cc) {
    if (optin_smem_limit(cc) == 0) return set_report(kErrInvalidValue, format("molora emulator: unknown architecture sm_%d", cc));
    g_arch.store(cc);
    return 0;
}

cudaError_t molora_emu_cudaFuncSetAttribute(const void *func, cudaFuncAttribute attr, int value) {
    if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
        const size_t limit = optin_smem_limit(g_arch.load());
        if (value < 0 || static_cast<size_t>(value) > limit) {
            set_report(kErrInvalidValue,
                      format("molora emulator: cudaFuncSetAttribute(MaxDynamicSharedMemorySize, %d): over the %zu bytes "
                             "sm_%d allows",
                             value, limit, g_arch.load()));
            return static_cast<cudaError_t>(kErrInvalidValue);
        }
        std::lock_guard<std::mutex> lock(g_attr_mu);
        g_attrs[func].max_dynamic_smem = value;
    }
    return cudaSuccess;
}

cudaError_t molora_emu_cudaDeviceGetAttribute(int *value, cudaDeviceAttr attr, int device) {
    // The emulated architecture's limits; the one device is number 0.
    if (value == nullptr || device != 0 || attr != cudaDevAttrMaxSharedMemoryPerBlockOptin)
        return static_cast<cudaError_t>(kErrInvalidValue);
    *value = static_cast<int>(optin_smem_limit(g_arch.load()));
    return cudaSuccess;
}

cudaError_t molora_emu_cudaGetLastError(void) {
    const int e = tl_last_error;
    tl_last_error = 0;
    tl_fault = false;
    return static_cast<cudaError_t>(e);
}

cudaError_t molora_emu_cudaPeekAtLastError(void) { return static_cast<cudaError_t>(tl_last_error); }

cudaError_t molora_emu_cudaMemsetAsync(void *dst, int value, size_t bytes, cudaStream_t) {
    if (tl_fault) return static_cast<cudaError_t>(tl_last_error);
    // The error is returned, not recorded for cudaGetLastError (the launchers return it themselves).
    return static_cast<cudaError_t>(molora_emu_memset(dst, value, bytes));
}

cudaError_t molora_emu_cudaMemcpyAsync(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind, cudaStream_t) {
    if (tl_fault) return static_cast<cudaError_t>(tl_last_error);
    switch (kind) {
        case cudaMemcpyHostToDevice: return static_cast<cudaError_t>(molora_emu_memcpy_htod(dst, src, bytes));
        case cudaMemcpyDeviceToHost: return static_cast<cudaError_t>(molora_emu_memcpy_dtoh(dst, src, bytes));
        case cudaMemcpyDeviceToDevice: return static_cast<cudaError_t>(molora_emu_memcpy_dtod(dst, src, bytes));
        default: return static_cast<cudaError_t>(set_report(kErrInvalidValue, "molora emulator: cudaMemcpyAsync kind not emulated"));
    }
}

// ---- the instrumentation hooks that -fsanitize=thread makes the kernels call ------------------------
void __tsan_init(void) {}
void __tsan_func_entry(void *) {}
void __tsan_func_exit(void) {}
#define EMU_HOOKS(N)                                                                                         \
    void __tsan_read##N(void *p) { emu::hook_access(p, N, false, __builtin_return_address(0)); }            \
    void __tsan_write##N(void *p) { emu::hook_access(p, N, true, __builtin_return_address(0)); }            \
    void __tsan_unaligned_read##N(void *p) { emu::hook_access(p, N, false, __builtin_return_address(0)); }  \
    void __tsan_unaligned_write##N(void *p) { emu::hook_access(p, N, true, __builtin_return_address(0)); }  \
    void __tsan_volatile_read##N(void *p) { emu::hook_access(p, N, false, __builtin_return_address(0)); }   \
    void __tsan_volatile_write##N(void *p) { emu::hook_access(p, N, true, __builtin_return_address(0)); }
EMU_HOOKS(1)
EMU_HOOKS(2)
EMU_HOOKS(4)
EMU_HOOKS(8)
EMU_HOOKS(16)
#undef EMU_HOOKS
void __tsan_read_range(void *p, unsigned long n) { emu::hook_access(p, n, false, __builtin_return_address(0)); }
void __tsan_write_range(void *p, unsigned long n) { emu::hook_access(p, n, true, __builtin_return_address(0)); }
void __tsan_vptr_update(void **, void *) {}
// Block copies and fills of instrumented code: the instrumentation turns them into calls of memcpy,
// memset and memmove (or __tsan_mem*), which build.rs renames in the kernels' objects to these checked
// versions, so that a 16-byte vector load or a struct copy is checked like any other access.
void *molora_emu_checked_memcpy(void *dst, const void *src, size_t n) {
    emu::hook_access(src, n, false, __builtin_return_address(0));
    emu::hook_access(dst, n, true, __builtin_return_address(0));
    return std::memcpy(dst, src, n);
}
void *molora_emu_checked_memmove(void *dst, const void *src, size_t n) {
    emu::hook_access(src, n, false, __builtin_return_address(0));
    emu::hook_access(dst, n, true, __builtin_return_address(0));
    return std::memmove(dst, src, n);
}
void *molora_emu_checked_memset(void *dst, int v, size_t n) {
    emu::hook_access(dst, n, true, __builtin_return_address(0));
    return std::memset(dst, v, n);
}
void *__tsan_memcpy(void *dst, const void *src, size_t n) { return molora_emu_checked_memcpy(dst, src, n); }
void *__tsan_memmove(void *dst, const void *src, size_t n) { return molora_emu_checked_memmove(dst, src, n); }
void *__tsan_memset(void *dst, int v, size_t n) { return molora_emu_checked_memset(dst, v, n); }
void __tsan_vptr_read(void **) {}

}  // extern "C"

// Atomics the instrumented code may use itself (e.g. the guard of a function-local static).
extern "C" {
#define EMU_TSAN_ATOMICS(N, T)                                                                                  \
    T __tsan_atomic##N##_load(const volatile T *a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); }       \
    void __tsan_atomic##N##_store(volatile T *a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); }        \
    T __tsan_atomic##N##_exchange(volatile T *a, T v, int) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); } \
    T __tsan_atomic##N##_fetch_add(volatile T *a, T v, int) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); } \
    T __tsan_atomic##N##_fetch_sub(volatile T *a, T v, int) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); } \
    T __tsan_atomic##N##_fetch_and(volatile T *a, T v, int) { return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); } \
    T __tsan_atomic##N##_fetch_or(volatile T *a, T v, int) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); }   \
    int __tsan_atomic##N##_compare_exchange_strong(volatile T *a, T *c, T v, int, int) {                         \
        return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                  \
    }                                                                                                           \
    int __tsan_atomic##N##_compare_exchange_weak(volatile T *a, T *c, T v, int, int) {                           \
        return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                   \
    }
EMU_TSAN_ATOMICS(8, unsigned char)
EMU_TSAN_ATOMICS(16, unsigned short)
EMU_TSAN_ATOMICS(32, unsigned int)
EMU_TSAN_ATOMICS(64, unsigned long long)
#undef EMU_TSAN_ATOMICS
void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) {}
}
