// The emulated device: fibers, barriers, warp collectives, clusters, cp.async groups, the checks
// and their reports (see cuda_host.h). Single-threaded: one fiber runs at a time.
#include "cuda_host.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <link.h>
#include <sys/mman.h>

#include <cstdio>
#include <map>
#include <memory>
#include <vector>

#if !defined(__x86_64__)
#error "the emulated device's fibers switch x86-64 register state"
#endif

// The AddressSanitizer variant (tests/emu/build.py --asan): every stack switch is announced to ASan
// (__sanitizer_start_switch_fiber before, __sanitizer_finish_switch_fiber after), so that it knows
// which stack runs: its unpoisoning of the current stack before a throw or a noreturn call
// (__trap), and its stack reports, use the fiber's bounds, not the OS thread's.
#if defined(__SANITIZE_ADDRESS__)
#define SCOTT_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SCOTT_EMU_ASAN 1
#endif
#endif
#ifdef SCOTT_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// switch stacks: saves callee-saved registers and the SSE/x87 control words on the current stack,
// stores its pointer in *from, continues on `to`
extern "C" void scott_emu_switch(void** from, void* to);
extern "C" void scott_emu_start();
asm(R"(
  .text
  .globl scott_emu_switch
  .type scott_emu_switch, @function
scott_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size scott_emu_switch, .-scott_emu_switch
  .globl scott_emu_start
  .type scott_emu_start, @function
scott_emu_start:
  movq %r12, %rdi
  andq $-16, %rsp
  callq *%r13
  ud2
  .size scott_emu_start, .-scott_emu_start
)");

uint3 scott_emu_block_dim{1, 1, 1}, scott_emu_grid_dim{1, 1, 1};

namespace emu {

Thread* g_thread = nullptr;
const Launch* g_launch = nullptr;
alignas(128) static unsigned char g_smem_window[kMaxSmem];
unsigned char* g_dyn_smem = g_smem_window;

namespace {

constexpr size_t kStack = 128 * 1024;

// Parked: released from a block barrier in a clustered launch, waiting for its block's next turn
// (the blocks of a cluster advance one barrier phase at a time, in turn, so that each block's
// accesses to a peer's shared memory meet the peer's accesses of the same phase)
enum class State { Ready, BlockBar, WarpBar, ClusterBar, Done, Parked };

struct Copy {
  uint32_t dst;
  const void* src;
  int bytes;
};

struct Fiber {
  void* sp = nullptr;
  void* fake_stack = nullptr;  // ASan's fake stack of the fiber while it is switched out
  Thread t{};
  State st = State::Ready;
  std::vector<Copy> open;
  std::vector<std::vector<Copy>> groups;  // committed, oldest first
};

struct WarpState {
  int arrived = 0, expected = 0;
  unsigned gen = 0;
  void* slots[2][32] = {};
};

// Per byte of shared memory: who wrote it last and who read it since, each access with its
// block's rank in the cluster, that block's barrier generation, the warp's collective generation
// and the cluster barrier generation at the time. Two accesses of different threads to a byte, at
// least one a write, race unless something orders them: for threads of one block a __syncthreads
// (or a cluster barrier) between them, or a warp collective when both are in one warp; for threads
// of different blocks of a cluster (distributed shared memory, map_shared_rank) only a cluster
// barrier. Reads are kept in two slots: the owning block's and the other blocks'.
struct Shadow {
  int16_t writer = -1;               // thread (linear id); -1: never written, -3: reported unwritten,
                                     // -4: read by another block before any write (see settle_peer_reads)
  int16_t reader = -1;               // a thread of the owning block that read it since; -2: several
  int16_t xreader = -1;              // a thread of another block that read it since; -2: several
  int8_t wrank = 0, xrank = 0;       // the writer's and xreader's block rank; xrank -2: several blocks
  uint32_t wgen = 0, rgen = 0, xgen = 0;     // the accessing block's barrier generation
  uint32_t wwarp = 0, rwarp = 0, xwarp = 0;  // the accessing warp's collective generation
  uint32_t wcgen = 0, rcgen = 0, xcgen = 0;  // the cluster barrier generation
  uint32_t serial = 0;               // static section: the block group it describes (older: stale)
};

struct BlockState {
  Block b{};
  int live = 0, arrived = 0;
  std::vector<WarpState> warps;
  unsigned char* saved = nullptr;    // the block's dynamic shared memory while another block of its
                                     // cluster runs (g_windows; what map_shared_rank points into)
  std::vector<Shadow> saved_shadow;  // and its shadow and cp.async counts (clusters only)
  std::vector<unsigned char> saved_inflight;
  uint32_t gen = 1;                  // barrier generation
  const char* site = "";             // where the threads waiting now called __syncthreads
  bool peer_accessed = false;        // another block of the cluster accessed its shared memory
  bool exit_reported = false;        // an access after its exit was reported
};

struct Stats {
  std::map<std::string, long> launches;
  std::map<std::string, long> counts;  // failed checks by kind
  std::vector<std::string> messages;
};

Stats g_stats;
cudaError_t g_error = cudaSuccess;
std::string g_error_text;
int g_arch = 90, g_sms = 4;
std::map<const void*, size_t> g_max_smem;
void (*g_body)(void*) = nullptr;
void* g_body_ctx = nullptr;
void* g_sched_sp = nullptr;
std::vector<Fiber> g_fibers;
std::vector<BlockState> g_blocks;
int g_cluster_live = 0, g_cluster_arrived = 0;
uint32_t g_cluster_gen = 1;  // cluster barrier generation
bool g_peer_read_unwritten = false;  // some Shadow::writer is -4
Fiber* g_cur = nullptr;
int g_resident = -1;
unsigned char g_inflight[kMaxSmem];
Shadow g_shadow[kMaxSmem];           // the resident block's dynamic window
// the dynamic shared memory of the blocks of a cluster that are not resident, one window each
// at a fixed place, so that an address map_shared_rank gives names its block and offset
constexpr size_t kMaxCluster = 8;
alignas(128) unsigned char g_windows[kMaxCluster][kMaxSmem];
std::vector<Shadow> g_static_shadow;  // the static __shared__ section
bool g_check_plain = true;

// Global memory: the ranges of the tensors an op passed (emu_track); empty: not checked. Memory the
// emulation itself puts kernels' locals and parameters in (fiber stacks, the launching frame, the
// thread records, the module's own image) is allowed.
struct Range {
  uintptr_t lo, hi;
};
std::vector<Range> g_tracked;
std::vector<Range> g_allowed;  // cp.async copies in flight per byte of the window
char* g_stacks = nullptr;
size_t g_stack_count = 0;
const void* g_sched_stack = nullptr;  // the scheduler's stack (ASan's bounds of it)
size_t g_sched_stack_size = 0;

Fiber& cur() { return *g_cur; }
BlockState& cur_block() { return g_blocks[g_cur->t.block->rank]; }

std::string where() {
  char buf[256];
  if (g_cur == nullptr || g_launch == nullptr) return "(host)";
  std::snprintf(buf, sizeof(buf), "%s block (%u,%u,%u) thread (%u,%u,%u)", g_launch->kernel, g_cur->t.block->idx.x,
                g_cur->t.block->idx.y, g_cur->t.block->idx.z, g_cur->t.idx.x, g_cur->t.idx.y, g_cur->t.idx.z);
  return buf;
}

#ifdef SCOTT_EMU_ASAN
// An ASan report during a launch ends with the kernel, block and thread it came from (its stack
// trace need not say: the kernels' device functions are inlined, and a fiber's stack begins at the
// launch's body). Called while ASan reports: no allocation here.
void name_the_thread(const char*) {
  if (g_launch == nullptr) return;
  if (g_cur == nullptr) {
    std::fprintf(stderr, "emulated device: AddressSanitizer's report came from a launch of %s (the scheduler)\n",
                 g_launch->kernel);
    return;
  }
  std::fprintf(stderr,
               "emulated device: AddressSanitizer's report came from kernel %s block (%u,%u,%u) thread (%u,%u,%u)\n",
               g_launch->kernel, g_cur->t.block->idx.x, g_cur->t.block->idx.y, g_cur->t.block->idx.z, g_cur->t.idx.x,
               g_cur->t.idx.y, g_cur->t.idx.z);
}
const bool g_asan_callback = (__asan_set_error_report_callback(name_the_thread), true);
#endif

// from the running fiber to the scheduler; a fiber that is done (`last`) is never resumed
void yield_to_scheduler(bool last = false) {
#ifdef SCOTT_EMU_ASAN
  __sanitizer_start_switch_fiber(last ? nullptr : &g_cur->fake_stack, g_sched_stack, g_sched_stack_size);
#endif
  scott_emu_switch(&g_cur->sp, g_sched_sp);
#ifdef SCOTT_EMU_ASAN
  __sanitizer_finish_switch_fiber(g_cur->fake_stack, &g_sched_stack, &g_sched_stack_size);
#endif
}

// from the scheduler to fiber i (its stack: g_stacks + i * kStack)
void switch_to_fiber(size_t i) {
#ifdef SCOTT_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, g_stacks + i * kStack, kStack);
#endif
  scott_emu_switch(&g_sched_sp, g_fibers[i].sp);
#ifdef SCOTT_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

int g_nthreads = 0;

void release(State s, int block, int warp, State to = State::Ready) {
  size_t lo = 0, hi = g_fibers.size();
  if (block >= 0) {
    lo = static_cast<size_t>(block) * g_nthreads;
    hi = lo + g_nthreads;
    if (warp >= 0) {
      lo += static_cast<size_t>(warp) * 32;
      hi = std::min(hi, lo + 32);
    }
  }
  for (size_t i = lo; i < hi; ++i)
    if (g_fibers[i].st == s) g_fibers[i].st = to;
}

// the state of threads a block barrier releases: in a clustered launch they wait for their block's
// next turn (see State::Parked)
State released() { return g_blocks.size() > 1 ? State::Parked : State::Ready; }

void reset_static_shared();
void shared_access(const void* addr, size_t n, bool write, const char* what);
void block_exit(BlockState& b);

void land(const Copy& c) {
  unsigned char* dst = g_dyn_smem + c.dst;
  if (c.bytes > 0) std::memcpy(dst, c.src, static_cast<size_t>(c.bytes));
  if (c.bytes < 16) std::memset(dst + c.bytes, 0, static_cast<size_t>(16 - c.bytes));
  for (int i = 0; i < 16; ++i) --g_inflight[c.dst + i];
  if (g_check_plain) shared_access(dst, 16, true, "cp.async");
}

void finish_fiber() {
  Fiber& f = cur();
  for (auto& grp : f.groups)
    for (const Copy& c : grp) land(c);
  for (const Copy& c : f.open) land(c);
  f.groups.clear();
  f.open.clear();
  f.st = State::Done;
  BlockState& b = cur_block();
  --b.live;
  --g_cluster_live;
  WarpState& w = b.warps[f.t.warp];
  --w.expected;
  if (b.arrived > 0 && b.arrived == b.live) {
    report("barrier", nullptr, "__syncthreads not reached by every thread of the block (this thread exited)");
    b.arrived = 0;
    ++b.gen;
    release(State::BlockBar, f.t.block->rank, -1, released());
  }
  if (b.live == 0 && g_blocks.size() > 1) block_exit(b);
  if (w.arrived > 0) {
    report("barrier", nullptr, "warp collective not reached by every lane (this lane exited)");
    w.arrived = 0;
    ++w.gen;
    release(State::WarpBar, f.t.block->rank, f.t.warp);
  }
  if (g_cluster_arrived > 0 && g_cluster_arrived == g_cluster_live) {
    report("barrier", nullptr, "cluster barrier not reached by every thread of the cluster (this thread exited)");
    g_cluster_arrived = 0;
    release(State::ClusterBar, -1, -1);
  }
}

void fiber_main(Fiber* f) {
  (void)f;
#ifdef SCOTT_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_sched_stack, &g_sched_stack_size);
#endif
  try {
    g_body(g_body_ctx);
  } catch (const std::exception& e) {
    report("exception", nullptr, e.what());
  } catch (...) {
    report("exception", nullptr, "unknown exception");
  }
  finish_fiber();
  yield_to_scheduler(true);
  std::abort();  // a finished fiber is never resumed
}

// ASan: a fiber never returns from its first frame (nor from its barrier's frames, if a deadlock
// abandons it), so its frames' redzones stay poisoned on its stack: the next fibers on those stacks
// start on clean memory, as does whatever the address space holds there after an unmap. (Zeroing a
// large shadow range gives its pages back to the OS: cheap.)
void unpoison_stacks() {
#ifdef SCOTT_EMU_ASAN
  if (g_stacks != nullptr) ASAN_UNPOISON_MEMORY_REGION(g_stacks, g_stack_count * kStack);
#endif
}

void ensure_stacks(size_t n) {
  if (n > g_stack_count) {
    if (g_stacks != nullptr) {
      unpoison_stacks();
      munmap(g_stacks, g_stack_count * kStack);
    }
    void* p = mmap(nullptr, n * kStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("emulated device: cannot map fiber stacks");
    g_stacks = static_cast<char*>(p);
    g_stack_count = n;
  }
  unpoison_stacks();
}

void swap_in(int rank) {
  if (g_resident == rank) return;
  const size_t n = g_launch->dyn_smem;
  if (g_resident >= 0) {
    BlockState& out = g_blocks[g_resident];
    std::memcpy(out.saved, g_dyn_smem, n);
    std::copy(g_shadow, g_shadow + n, out.saved_shadow.begin());
    std::memcpy(out.saved_inflight.data(), g_inflight, n);
  }
  BlockState& in = g_blocks[rank];
  std::memcpy(g_dyn_smem, in.saved, n);
  std::copy(in.saved_shadow.begin(), in.saved_shadow.end(), g_shadow);
  std::memcpy(g_inflight, in.saved_inflight.data(), n);
  g_resident = rank;
}

const void* g_launch_frame = nullptr;
void allow_launch_memory(const void* frame);

void run_group(const Launch& L, uint3 first) {
  const int nthreads = static_cast<int>(L.block.x * L.block.y * L.block.z);
  const int nblocks = static_cast<int>(L.cluster);
  g_nthreads = nthreads;
  g_blocks.assign(static_cast<size_t>(nblocks), BlockState{});
  g_fibers.assign(static_cast<size_t>(nblocks * nthreads), Fiber{});
  ensure_stacks(g_fibers.size());
  const int nwarps = (nthreads + 31) / 32;
  for (int b = 0; b < nblocks; ++b) {
    BlockState& bs = g_blocks[b];
    bs.b.idx = {first.x + static_cast<unsigned>(b), first.y, first.z};
    bs.b.rank = b;
    bs.live = nthreads;
    bs.warps.assign(static_cast<size_t>(nwarps), WarpState{});
    for (int w = 0; w < nwarps; ++w) bs.warps[w].expected = std::min(32, nthreads - 32 * w);
    bs.saved = g_windows[b];
    if (nblocks > 1) {  // (a lone block stays resident: its window is set up in place below)
      std::memset(bs.saved, 0xff, L.dyn_smem);  // never-written shared memory reads as NaN / -1
      bs.saved_shadow.assign(L.dyn_smem, Shadow{});
      bs.saved_inflight.assign(L.dyn_smem, 0);
    }
  }
  reset_static_shared();
  allow_launch_memory(g_launch_frame);
  g_cluster_live = nblocks * nthreads;
  g_cluster_arrived = 0;
  g_resident = -1;
  if (nblocks == 1) {
    std::memset(g_dyn_smem, 0xff, L.dyn_smem);
    std::fill(g_shadow, g_shadow + L.dyn_smem, Shadow{});
    std::memset(g_inflight, 0, L.dyn_smem);
    g_resident = 0;
  }
  for (int b = 0; b < nblocks; ++b)
    for (int i = 0; i < nthreads; ++i) {
      Fiber& f = g_fibers[static_cast<size_t>(b * nthreads + i)];
      f.t.idx = {static_cast<unsigned>(i) % L.block.x, static_cast<unsigned>(i) / L.block.x % L.block.y,
                 static_cast<unsigned>(i) / (L.block.x * L.block.y)};
      f.t.linear = i;
      f.t.lane = i % 32;
      f.t.warp = i / 32;
      f.t.block = &g_blocks[b].b;
      char* top = g_stacks + (static_cast<size_t>(b * nthreads + i) + 1) * kStack;
      uint64_t* sp = reinterpret_cast<uint64_t*>(top) - 8;
      sp[0] = 0x1f80ull | (0x37full << 32);  // mxcsr, x87 control word
      sp[1] = sp[2] = 0;                     // r15, r14
      sp[3] = reinterpret_cast<uint64_t>(&fiber_main);  // r13: entry
      sp[4] = reinterpret_cast<uint64_t>(&f);           // r12: its argument
      sp[5] = sp[6] = 0;                                // rbx, rbp
      sp[7] = reinterpret_cast<uint64_t>(&scott_emu_start);
      f.sp = sp;
    }
  for (;;) {
    bool ran = false, alive = false;
    for (int b = 0; b < nblocks; ++b) {
      if (nblocks > 1) release(State::Parked, b, -1);  // the block's next barrier phase
      bool more = true;
      while (more) {
        more = false;
        for (int i = 0; i < nthreads; ++i) {
          Fiber& f = g_fibers[static_cast<size_t>(b * nthreads + i)];
          if (f.st != State::Ready) continue;
          swap_in(b);
          g_cur = &f;
          g_thread = &f.t;
          switch_to_fiber(static_cast<size_t>(b * nthreads + i));
          g_cur = nullptr;
          ran = more = true;
        }
      }
    }
    for (const Fiber& f : g_fibers) alive |= f.st != State::Done;
    if (!alive) break;
    if (!ran) {  // every live thread waits: a barrier some thread never reaches
      int waiting[6] = {};
      for (const Fiber& f : g_fibers) ++waiting[static_cast<int>(f.st)];
      char buf[200];
      std::snprintf(buf, sizeof(buf),
                    "%s block (%u,%u,%u): deadlock, threads waiting at __syncthreads %d, warp collectives %d, "
                    "cluster barrier %d, exited %d",
                    L.kernel, first.x, first.y, first.z, waiting[1], waiting[2], waiting[3], waiting[4]);
      g_cur = nullptr;
      report("barrier", nullptr, buf);
      break;  // the fibers are abandoned; their stacks are reused
    }
  }
  if (g_resident >= 0 && nblocks > 1) g_resident = -1;
  g_cur = nullptr;
  g_thread = nullptr;
}

std::string demangled(const void* fn, const char* fallback) {
  Dl_info info;
  if (fn != nullptr && dladdr(fn, &info) != 0 && info.dli_sname != nullptr) {
    int status = 0;
    char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    if (status == 0 && d != nullptr) {
      std::string s(d);
      std::free(d);
      return s;
    }
    return info.dli_sname;
  }
  return fallback;
}

// The static __shared__ arrays: this module's TLS block on the one thread that runs the fibers.
char* g_static_lo = nullptr;
char* g_static_hi = nullptr;
thread_local char g_tls_anchor;
uint32_t g_serial = 1;  // makes the block exist on this thread before it is asked for

int tls_size(dl_phdr_info* info, size_t, void* data) {
  auto* self = static_cast<std::pair<Dl_info*, size_t>*>(data);
  if (reinterpret_cast<void*>(info->dlpi_addr) != self->first->dli_fbase) return 0;
  for (int i = 0; i < info->dlpi_phnum; ++i)
    if (info->dlpi_phdr[i].p_type == PT_TLS) self->second = info->dlpi_phdr[i].p_memsz;
  return 0;
}

void reset_static_shared() {
  if (g_static_lo == nullptr) {
    g_tls_anchor = 1;
    Dl_info self;
    if (dladdr(reinterpret_cast<void*>(&reset_static_shared), &self) == 0) return;
    void* handle = dlopen(self.dli_fname, RTLD_NOW | RTLD_NOLOAD);
    void* block = nullptr;
    if (handle == nullptr || dlinfo(handle, RTLD_DI_TLS_DATA, &block) != 0 || block == nullptr) return;
    std::pair<Dl_info*, size_t> found{&self, 0};
    dl_iterate_phdr(tls_size, &found);
    g_static_lo = static_cast<char*>(block);
    g_static_hi = g_static_lo + found.second;
  }
  // entries of earlier blocks read as never written (see shared_access): nothing to clear here
  ++g_serial;
  if (g_static_shadow.size() != static_cast<size_t>(g_static_hi - g_static_lo))
    g_static_shadow.assign(static_cast<size_t>(g_static_hi - g_static_lo), Shadow{});
}

int add_image_ranges(dl_phdr_info* info, size_t, void* data) {
  auto* self = static_cast<Dl_info*>(data);
  if (reinterpret_cast<void*>(info->dlpi_addr) != self->dli_fbase &&
      !(info->dlpi_name != nullptr && self->dli_fname != nullptr && std::strcmp(info->dlpi_name, self->dli_fname) == 0))
    return 0;
  for (int i = 0; i < info->dlpi_phnum; ++i)
    if (info->dlpi_phdr[i].p_type == PT_LOAD) {
      const uintptr_t lo = info->dlpi_addr + info->dlpi_phdr[i].p_vaddr;
      g_allowed.push_back({lo, lo + info->dlpi_phdr[i].p_memsz});
    }
  return 0;
}

void allow_launch_memory(const void* frame) {
  g_allowed.clear();
  if (g_tracked.empty()) return;
  g_allowed.push_back({reinterpret_cast<uintptr_t>(g_stacks), reinterpret_cast<uintptr_t>(g_stacks) + g_stack_count * kStack});
  const uintptr_t f = reinterpret_cast<uintptr_t>(frame);
  g_allowed.push_back({f - 4096, f + (1u << 20)});  // the launching frames: the kernel's arguments
  g_allowed.push_back({reinterpret_cast<uintptr_t>(g_fibers.data()),
                       reinterpret_cast<uintptr_t>(g_fibers.data() + g_fibers.size())});
  g_allowed.push_back({reinterpret_cast<uintptr_t>(g_blocks.data()),
                       reinterpret_cast<uintptr_t>(g_blocks.data() + g_blocks.size())});
  for (const BlockState& b : g_blocks)  // the warps' exchange slots (ldmatrix, mma.sync)
    g_allowed.push_back({reinterpret_cast<uintptr_t>(b.warps.data()),
                         reinterpret_cast<uintptr_t>(b.warps.data() + b.warps.size())});
  Dl_info self;
  if (dladdr(reinterpret_cast<void*>(&allow_launch_memory), &self) != 0) dl_iterate_phdr(add_image_ranges, &self);
}

bool in_ranges(const std::vector<Range>& rs, uintptr_t lo, uintptr_t hi) {
  for (const Range& r : rs)
    if (lo >= r.lo && hi <= r.hi) return true;
  return false;
}

void check_global(const void* addr, size_t n, bool write, const char* what) {
  const uintptr_t lo = reinterpret_cast<uintptr_t>(addr), hi = lo + n;
  if (in_ranges(g_tracked, lo, hi) || in_ranges(g_allowed, lo, hi)) return;
  if (std::getenv("SCOTT_EMU_DEBUG_RANGES") != nullptr) {
    std::fprintf(stderr, "bad %#lx\n", (unsigned long)lo);
    for (const Range& r : g_tracked) std::fprintf(stderr, "tracked %#lx..%#lx\n", (unsigned long)r.lo, (unsigned long)r.hi);
    for (const Range& r : g_allowed) std::fprintf(stderr, "allowed %#lx..%#lx\n", (unsigned long)r.lo, (unsigned long)r.hi);
  }
  report("out-of-bounds", addr, std::string(what) + ": " + std::to_string(n) + "-byte global " +
                                    (write ? "store" : "load") + " outside every tensor the op passed");
}

// "block (x,y,z)" of cluster rank `rank` (-2: several blocks)
std::string block_name(int rank) {
  if (rank < 0 || static_cast<size_t>(rank) >= g_blocks.size()) return "other blocks";
  const uint3 i = g_blocks[rank].b.idx;
  return "block (" + std::to_string(i.x) + "," + std::to_string(i.y) + "," + std::to_string(i.z) + ")";
}

// The accessing thread, for the race checks.
struct Accessor {
  int rank;           // its block's rank in the cluster
  int16_t thread;     // linear id
  uint32_t gen, warp_gen, cluster_gen;
};

Accessor accessor() {
  const Fiber& f = cur();
  const BlockState& b = g_blocks[f.t.block->rank];
  return {f.t.block->rank, static_cast<int16_t>(f.t.linear), b.gen, b.warps[f.t.warp].gen, g_cluster_gen};
}

// Whether an earlier access (by `thread` of block `rank`, at those generations) happens before
// `me`'s: for one block, the same thread, a barrier of the block between them, or a warp
// collective between two threads of one warp; for two blocks (rank -2: several) a cluster barrier.
bool ordered(const Accessor& me, int rank, int16_t thread, uint32_t gen, uint32_t warp_gen, uint32_t cluster_gen) {
  if (rank != me.rank) return cluster_gen != me.cluster_gen;
  if (thread == me.thread || gen != me.gen) return true;
  return thread >= 0 && thread / 32 == me.thread / 32 && warp_gen != me.warp_gen;
}

std::string thread_name(const Accessor& me, int rank, int16_t thread) {
  std::string t = thread == -2 ? "other threads" : "thread " + std::to_string(thread);
  if (rank == me.rank) return t;
  return rank == -2 ? "threads of other blocks" : block_name(rank) + " " + t;
}

const char* no_barrier(const Accessor& me, int rank) {
  return rank == me.rank ? " with no barrier between" : " with no cluster barrier between";
}

// One byte of shared memory owned by the block of cluster rank `owner`. (said: whether this access
// has reported a failure at an earlier byte already; one report per access)
void check_byte(Shadow& sh, int owner, const unsigned char* addr, bool write, const char* what, bool& said) {
  const Accessor me = accessor();
  auto say = [&](const char* kind, const std::string& msg) {
    if (!said) report(kind, addr, std::string(what) + ": " + msg);
    said = true;
  };
  if (sh.writer >= 0 && !ordered(me, sh.wrank, sh.writer, sh.wgen, sh.wwarp, sh.wcgen)) {
    say("race", std::string(write ? "write" : "read") + " after " + thread_name(me, sh.wrank, sh.writer) + "'s write" +
                    no_barrier(me, sh.wrank));
    sh.wgen = sh.wcgen = 0;  // one report per byte and generation
  }
  if (write) {
    if (sh.reader != -1 && !ordered(me, owner, sh.reader, sh.rgen, sh.rwarp, sh.rcgen))
      say("race", "write after " + thread_name(me, owner, sh.reader) + (sh.reader == -2 ? "' reads" : "'s read") +
                      no_barrier(me, owner));
    if (sh.xreader != -1 && !ordered(me, sh.xrank, sh.xreader, sh.xgen, sh.xwarp, sh.xcgen))
      say("race", "write after " + thread_name(me, sh.xrank, sh.xreader) + (sh.xreader == -2 ? "' reads" : "'s read") +
                      no_barrier(me, sh.xrank));
    sh.writer = me.thread;
    sh.wrank = static_cast<int8_t>(me.rank);
    sh.wgen = me.gen;
    sh.wwarp = me.warp_gen;
    sh.wcgen = me.cluster_gen;
    sh.reader = sh.xreader = -1;
    return;
  }
  if (sh.writer == -1 && me.rank != owner) {
    // another block's byte nobody has written yet: if its block writes it before the next cluster
    // barrier, that is a race (reported by the write); otherwise it is unwritten (settle_peer_reads)
    sh.writer = -4;
    g_peer_read_unwritten = true;
  } else if (sh.writer == -1 || (sh.writer == -4 && me.rank == owner)) {
    say("uninitialized", "read of shared memory no thread has written");
    sh.writer = -3;  // reported once
  }
  if (me.rank == owner) {
    if (sh.reader == -1 || sh.rgen != me.gen) {
      sh.reader = me.thread;
      sh.rgen = me.gen;
      sh.rwarp = me.warp_gen;
      sh.rcgen = me.cluster_gen;
    } else if (sh.reader != me.thread) {
      sh.reader = -2;
    }
  } else if (sh.xreader == -1 || sh.xcgen != me.cluster_gen || (sh.xrank == me.rank && sh.xgen != me.gen)) {
    // (the latest read of a block stands for its earlier ones: they are ordered before it, and no
    // later than it against the other blocks)
    sh.xreader = me.thread;
    sh.xrank = static_cast<int8_t>(me.rank);
    sh.xgen = me.gen;
    sh.xwarp = me.warp_gen;
    sh.xcgen = me.cluster_gen;
  } else if (sh.xrank != me.rank) {
    sh.xrank = -2;
    sh.xreader = -2;
  } else if (sh.xreader != me.thread) {
    sh.xreader = -2;
  }
}

// Bytes of block b's shared memory (shadow: its shadow, window: where its bytes are now) that
// another block read before any thread wrote them, and that nothing wrote up to the cluster
// barrier or block exit that ends the phase now: reads of unwritten shared memory.
void settle_peer_reads(BlockState& b, Shadow* shadow, const unsigned char* window) {
  bool reported = false;
  for (size_t off = 0; off < g_launch->dyn_smem; ++off) {
    Shadow& sh = shadow[off];
    if (sh.writer != -4) continue;
    if (!reported)  // one report per block and phase
      report("uninitialized", window + off,
             "read by " + block_name(sh.xrank) +
                 (sh.xreader == -2 ? std::string(" threads") : " thread " + std::to_string(sh.xreader)) + " of " +
                 block_name(b.b.rank) + "'s shared memory, which no thread wrote before the cluster barrier or exit");
    reported = true;
    sh.writer = -3;
  }
}

void settle_all_peer_reads() {
  if (!g_peer_read_unwritten) return;
  g_peer_read_unwritten = false;
  for (BlockState& b : g_blocks) {
    if (!b.peer_accessed) continue;
    if (b.b.rank == g_resident)
      settle_peer_reads(b, g_shadow, g_dyn_smem);
    else
      settle_peer_reads(b, b.saved_shadow.data(), b.saved);
  }
}

// A block of a clustered launch exits (its last thread): the other blocks' accesses to its shared
// memory must be ordered before that by a cluster barrier (after it the memory is gone).
void block_exit(BlockState& b) {
  if (!b.peer_accessed) return;
  settle_peer_reads(b, g_shadow, g_dyn_smem);
  const Accessor me = accessor();
  const size_t n = g_launch->dyn_smem;
  for (size_t off = 0; off < n; ++off) {
    const Shadow& sh = g_shadow[off];
    int rank = -1;
    int16_t thread = -1;
    const char* access = "";
    if (sh.writer >= 0 && sh.wrank != me.rank && sh.wcgen == me.cluster_gen) {
      rank = sh.wrank, thread = sh.writer, access = "write to";
    } else if (sh.xreader != -1 && sh.xcgen == me.cluster_gen) {
      rank = sh.xrank, thread = sh.xreader, access = "read of";
    }
    if (rank == -1) continue;
    report("race", g_dyn_smem + off, "block exit: after " + thread_name(me, rank, thread) + "'s " + access +
                                         " this block's shared memory with no cluster barrier between");
    return;  // one report per block
  }
}

void shared_access(const void* addr, size_t n, bool write, const char* what) {
  if (g_cur == nullptr || g_launch == nullptr) return;
  const unsigned char* p = static_cast<const unsigned char*>(addr);
  if (p >= g_dyn_smem && p < g_dyn_smem + kMaxSmem) {
    const size_t off = static_cast<size_t>(p - g_dyn_smem);
    if (off + n > g_launch->dyn_smem) {
      report("out-of-bounds", addr, std::string(what) + ": " + std::to_string(n) + " bytes past the block's " +
                                        std::to_string(g_launch->dyn_smem) + " bytes of dynamic shared memory");
      return;
    }
    if (n > 1 && off % n != 0 && n <= 16) report("misaligned", addr, std::string(what) + ": misaligned access");
    for (size_t i = 0; i < n; ++i) {
      if (!write && g_inflight[off + i] != 0 && std::strcmp(what, "cp.async") != 0) {
        report("race", addr, std::string(what) + ": read of a cp.async destination before its wait_group");
        break;
      }
    }
    const int rank = cur().t.block->rank;
    bool said = false;
    for (size_t i = 0; i < n; ++i) check_byte(g_shadow[off + i], rank, p + i, write, what, said);
    return;
  }
  if (p >= g_windows[0] && p < g_windows[0] + sizeof(g_windows)) {  // another block's, by map_shared_rank
    const size_t at = static_cast<size_t>(p - g_windows[0]);
    const size_t rank = at / kMaxSmem, off = at % kMaxSmem;
    const std::string peer = block_name(static_cast<int>(rank));
    if (rank >= g_blocks.size() || static_cast<int>(rank) == cur().t.block->rank) {
      report("out-of-bounds", addr, std::string(what) + ": distributed shared memory of no other block of the cluster");
      return;
    }
    BlockState& b = g_blocks[rank];
    if (off + n > g_launch->dyn_smem) {
      report("out-of-bounds", addr, std::string(what) + ": " + std::to_string(n) + " bytes past " + peer + "'s " +
                                        std::to_string(g_launch->dyn_smem) + " bytes of dynamic shared memory");
      return;
    }
    if (n > 1 && off % n != 0 && n <= 16) report("misaligned", addr, std::string(what) + ": misaligned access");
    if (b.live == 0) {
      if (!b.exit_reported)
        report("race", addr, std::string(what) + ": access to the shared memory of " + peer +
                                 ", which has exited (no cluster barrier kept it)");
      b.exit_reported = true;
      return;
    }
    for (size_t i = 0; i < n; ++i) {
      if (!write && b.saved_inflight[off + i] != 0) {
        report("race", addr, std::string(what) + ": read of a cp.async destination of " + peer +
                                 " before its wait_group");
        break;
      }
    }
    b.peer_accessed = true;
    bool said = false;
    for (size_t i = 0; i < n; ++i)
      check_byte(b.saved_shadow[off + i], static_cast<int>(rank), p + i, write, what, said);
    return;
  }
  const char* lo = g_static_lo;
  const char* hi = g_static_hi;
  if (lo != nullptr && reinterpret_cast<const char*>(p) >= lo && reinterpret_cast<const char*>(p) < hi) {
    if (g_blocks.size() > 1) {  // one TLS instance: the blocks of a cluster would share it
      report("unsupported", addr,
             std::string(what) + ": static __shared__ memory in a clustered launch is not emulated");
      return;
    }
    const size_t off = static_cast<size_t>(reinterpret_cast<const char*>(p) - lo);
    bool said = false;
    for (size_t i = 0; i < n && off + i < g_static_shadow.size(); ++i) {
      Shadow& sh = g_static_shadow[off + i];
      if (sh.serial != g_serial) {
        sh = Shadow{};
        sh.serial = g_serial;
      }
      check_byte(sh, 0, p + i, write, what, said);
    }
    return;
  }
  if (!g_tracked.empty()) check_global(addr, n, write, what);
}

}  // namespace

// every load and store of the kernels' translation units (compiled with -fsanitize=thread, whose
// instrumentation calls these; no sanitizer runtime is linked)
extern "C" {
#define SCOTT_EMU_HOOKS(N)                                                                          \
  void __tsan_read##N(void* a) { if (g_check_plain) shared_access(a, N, false, "load"); }          \
  void __tsan_write##N(void* a) { if (g_check_plain) shared_access(a, N, true, "store"); }         \
  void __tsan_unaligned_read##N(void* a) { if (g_check_plain) shared_access(a, N, false, "load"); } \
  void __tsan_unaligned_write##N(void* a) { if (g_check_plain) shared_access(a, N, true, "store"); } \
  void __tsan_volatile_read##N(void* a) { if (g_check_plain) shared_access(a, N, false, "load"); } \
  void __tsan_volatile_write##N(void* a) { if (g_check_plain) shared_access(a, N, true, "store"); }
SCOTT_EMU_HOOKS(1)
SCOTT_EMU_HOOKS(2)
SCOTT_EMU_HOOKS(4)
SCOTT_EMU_HOOKS(8)
SCOTT_EMU_HOOKS(16)
#undef SCOTT_EMU_HOOKS
void __tsan_read_range(void* a, unsigned long n) { if (g_check_plain) shared_access(a, n, false, "load"); }
void __tsan_write_range(void* a, unsigned long n) { if (g_check_plain) shared_access(a, n, true, "store"); }
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_init() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
// host-side atomics in the launch code (e.g. a per-device cache): plain atomic operations, unchecked
#define SCOTT_EMU_ATOMICS(BITS, T)                                                                  \
  T __tsan_atomic##BITS##_load(const volatile T* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); } \
  void __tsan_atomic##BITS##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##BITS##_exchange(volatile T* a, T v, int) {                                       \
    return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                             \
  }                                                                                                 \
  T __tsan_atomic##BITS##_fetch_add(volatile T* a, T v, int) {                                      \
    return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);                                              \
  }                                                                                                 \
  int __tsan_atomic##BITS##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {           \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);          \
  }
SCOTT_EMU_ATOMICS(8, char)
SCOTT_EMU_ATOMICS(16, short)
SCOTT_EMU_ATOMICS(32, int)
SCOTT_EMU_ATOMICS(64, long)
#undef SCOTT_EMU_ATOMICS
void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) {}
}

// the kernel's name without namespaces, template arguments or parameters
std::string kernel_base_name(const std::string& full) {
  std::string s = full;
  // drop a leading return type ("void ")
  if (s.rfind("void ", 0) == 0) s = s.substr(5);
  int depth = 0;
  size_t end = s.size();
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '<' || s[i] == '(') {
      if (depth == 0) { end = i; break; }
    }
  }
  s = s.substr(0, end);
  const size_t colon = s.rfind("::");
  return colon == std::string::npos ? s : s.substr(colon + 2);
}

std::string kernel_name(const void* fn, const char* fallback) { return demangled(fn, fallback); }

void run_kernel(const char* kernel, dim3 grid, dim3 block, size_t dyn_smem, unsigned cluster, void (*body)(void*),
                void* ctx) {
  if (g_launch != nullptr) throw std::runtime_error("emulated device: a kernel launched from a kernel");
  const std::string name = kernel_base_name(kernel);
  const unsigned threads = block.x * block.y * block.z;
  std::string bad;
  if (threads == 0 || threads > 1024) bad = "block of " + std::to_string(threads) + " threads";
  else if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) bad = "grid out of range";
  else if (dyn_smem > kMaxSmem) bad = "dynamic shared memory over the device's limit";
  else if (cluster == 0 || grid.x % cluster != 0 || cluster > 8) bad = "cluster size";
  if (!bad.empty()) {
    report("launch", nullptr, name + ": invalid launch: " + bad);
    return;
  }
  ++g_stats.launches[name];
  Launch L{name.c_str(), grid, block, dyn_smem, cluster};
  g_launch_frame = &L;
  g_launch = &L;
  g_body = body;
  g_body_ctx = ctx;
  scott_emu_grid_dim = {grid.x, grid.y, grid.z};
  scott_emu_block_dim = {block.x, block.y, block.z};
  try {
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; x += cluster) run_group(L, {x, y, z});
  } catch (...) {
    g_launch = nullptr;
    throw;
  }
  g_launch = nullptr;
  g_body = nullptr;
}

void sync_block(const char* site) {
  BlockState& b = cur_block();
  if (b.arrived == 0) {
    b.site = site;
  } else if (std::strcmp(b.site, site) != 0) {
    report("barrier", nullptr, std::string("__syncthreads at ") + site + " while other threads of the block wait at " +
                                   b.site);
  }
  if (++b.arrived == b.live) {
    b.arrived = 0;
    ++b.gen;
    release(State::BlockBar, cur().t.block->rank, -1, released());
    if (g_blocks.size() > 1) {  // this thread, too, runs on in the block's next turn
      cur().st = State::Parked;
      yield_to_scheduler();
    }
    return;
  }
  cur().st = State::BlockBar;
  yield_to_scheduler();
}

void* const* warp_exchange(void* mine) {
  Fiber& f = cur();
  WarpState& w = cur_block().warps[f.t.warp];
  const unsigned ph = w.gen & 1u;
  w.slots[ph][f.t.lane] = mine;
  if (++w.arrived == w.expected) {
    w.arrived = 0;
    ++w.gen;
    release(State::WarpBar, f.t.block->rank, f.t.warp);
  } else {
    f.st = State::WarpBar;
    yield_to_scheduler();
  }
  return w.slots[ph];
}

void sync_warp() { (void)warp_exchange(nullptr); }

void sync_cluster() {
  if (++g_cluster_arrived == g_cluster_live) {
    g_cluster_arrived = 0;
    settle_all_peer_reads();
    ++g_cluster_gen;
    for (BlockState& b : g_blocks) ++b.gen;
    release(State::ClusterBar, -1, -1);
    return;
  }
  cur().st = State::ClusterBar;
  yield_to_scheduler();
}

unsigned cluster_rank() { return static_cast<unsigned>(cur().t.block->rank); }

void* map_cluster_shared(void* p, unsigned rank) {
  const size_t off = smem_offset(p, 0, "mapa");
  if (rank >= g_blocks.size()) {
    report("out-of-bounds", p, "map_shared_rank: no block of rank " + std::to_string(rank) + " in the cluster");
    return p;
  }
  if (static_cast<int>(rank) == cur().t.block->rank) return p;
  return g_blocks[rank].saved + off;  // (checked by shared_access like the block's own window)
}

void trap(const char* why) {
  report("trap", nullptr, why);
  finish_fiber();
  yield_to_scheduler(true);
  std::abort();
}

void report(const char* kind, const void* addr, const std::string& what) {
  ++g_stats.counts[kind];
  char buf[128] = "";
  const unsigned char* a = static_cast<const unsigned char*>(addr);
  if (addr != nullptr) {
    if (g_launch != nullptr && a >= g_dyn_smem && a < g_dyn_smem + kMaxSmem)
      std::snprintf(buf, sizeof(buf), " at shared offset %zu", static_cast<size_t>(a - g_dyn_smem));
    else if (g_launch != nullptr && a >= g_windows[0] && a < g_windows[0] + sizeof(g_windows))
      std::snprintf(buf, sizeof(buf), " at shared offset %zu of %s", static_cast<size_t>(a - g_windows[0]) % kMaxSmem,
                    block_name(static_cast<int>(static_cast<size_t>(a - g_windows[0]) / kMaxSmem)).c_str());
    else
      std::snprintf(buf, sizeof(buf), " at address %p", addr);
  }
  const std::string msg = std::string(kind) + ": " + where() + ": " + what + buf;
  if (g_stats.messages.size() < 50) g_stats.messages.push_back(msg);
  if (g_error == cudaSuccess) {
    g_error = cudaErrorLaunchFailure;
    g_error_text = msg;
  }
}

size_t smem_offset(const void* p, size_t bytes, const char* op) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  const size_t limit = g_launch != nullptr ? g_launch->dyn_smem : 0;
  if (c < g_dyn_smem || c + bytes > g_dyn_smem + limit || (bytes == 0 && c > g_dyn_smem + limit)) {
    report("out-of-bounds", p, std::string(op) + ": outside the block's " + std::to_string(limit) +
                                   " bytes of dynamic shared memory");
    return 0;
  }
  return static_cast<size_t>(c - g_dyn_smem);
}

void smem_check_read(size_t off, size_t bytes, const char* op) {
  const size_t limit = g_launch != nullptr ? g_launch->dyn_smem : 0;
  if (off + bytes > limit) {
    report("out-of-bounds", g_dyn_smem + off, std::string(op) + ": read past the block's dynamic shared memory");
    return;
  }
  for (size_t i = 0; i < bytes; ++i)
    if (g_inflight[off + i] != 0) {
      report("race", g_dyn_smem + off + i, std::string(op) + ": read of a cp.async destination before its wait_group");
      return;
    }
}

void cp_async(uint32_t dst, const void* src, int src_bytes) {
  const size_t limit = g_launch->dyn_smem;
  if (dst % 16 != 0) report("misaligned", g_dyn_smem + dst, "cp.async destination not 16-byte aligned");
  if (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % 16 != 0)
    report("misaligned", src, "cp.async source not 16-byte aligned");
  if (dst + 16 > limit) {
    report("out-of-bounds", g_dyn_smem + dst, "cp.async destination outside the block's dynamic shared memory");
    return;
  }
  for (int i = 0; i < 16; ++i) {
    if (g_inflight[dst + i] != 0) {
      report("race", g_dyn_smem + dst + i, "cp.async to a destination with a copy still in flight");
      break;
    }
  }
  if (src_bytes > 0 && !g_tracked.empty()) check_global(src, static_cast<size_t>(src_bytes), false, "cp.async");
  for (int i = 0; i < 16; ++i) ++g_inflight[dst + i];
  cur().open.push_back({dst, src, src_bytes});
}

void cp_async_commit() {
  Fiber& f = cur();
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}

void cp_async_wait(int pending) {
  Fiber& f = cur();
  while (static_cast<int>(f.groups.size()) > pending) {
    for (const Copy& c : f.groups.front()) land(c);
    f.groups.erase(f.groups.begin());
  }
}

int device_arch() { return g_arch; }
int device_sms() { return g_sms; }

bool set_max_dyn_smem(const void* kernel, int bytes) {
  const int limit = g_arch >= 90 ? 232448 : 166912;
  if (bytes < 0 || bytes > limit) return false;
  g_max_smem[kernel] = static_cast<size_t>(bytes);
  return true;
}
size_t max_dyn_smem(const void* kernel) {
  auto it = g_max_smem.find(kernel);
  return it == g_max_smem.end() ? 48 * 1024 : it->second;
}

cudaError_t take_error() {
  const cudaError_t e = g_error;
  g_error = cudaSuccess;
  return e;
}
cudaError_t peek_error() { return g_error; }
const char* error_text(cudaError_t e) {
  if (e == cudaSuccess) return "no error";
  if (!g_error_text.empty()) return g_error_text.c_str();
  return "emulated launch failure";
}

// ---- for the module's emulator functions (emu_bindings.cpp) ----
void check_plain_accesses(bool on) { g_check_plain = on; }
void track(const std::vector<std::pair<uintptr_t, size_t>>& ranges) {
  g_tracked.clear();
  for (const auto& r : ranges) g_tracked.push_back({r.first, r.first + r.second});
}
void configure(int arch, int sms) {
  if (arch != 80 && arch != 90) throw std::invalid_argument("emulated device: arch 80 or 90");
  g_arch = arch;
  g_sms = sms < 1 ? 1 : sms;
  g_max_smem.clear();
}
void reset_stats() {
  g_stats = Stats{};
  g_error = cudaSuccess;
  g_error_text.clear();
}
const std::map<std::string, long>& launch_counts() { return g_stats.launches; }
const std::map<std::string, long>& check_counts() { return g_stats.counts; }
const std::vector<std::string>& check_messages() { return g_stats.messages; }

}  // namespace emu
