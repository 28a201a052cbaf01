// The CUDA emulator's runtime (see emulator.h for what it models): fibers, the block scheduler,
// barriers and warp collectives, cp.async, ldmatrix, mma.sync, wgmma, and the runtime calls.
#include "emulator/emulator.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <vector>

namespace sketchcolor {
namespace emu {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpgroupSize = 128;
constexpr size_t kFiberStackBytes = 256 * 1024;
constexpr size_t kDefaultSmemLimit = 48 * 1024;   // dynamic shared memory without the opt-in attribute

// What a thread waits at, for collectives and deadlock reports.
enum class Op { kNone, kBarrier, kShfl, kLdmatrix, kMma, kWgmma, kWgmmaCommit, kWgmmaWait };
const char* op_name(Op op) {
  switch (op) {
    case Op::kNone: return "running";
    case Op::kBarrier: return "__syncthreads";
    case Op::kShfl: return "shfl";
    case Op::kLdmatrix: return "ldmatrix";
    case Op::kMma: return "mma.sync";
    case Op::kWgmma: return "wgmma.mma_async";
    case Op::kWgmmaCommit: return "wgmma.commit_group";
    case Op::kWgmmaWait: return "wgmma.wait_group";
  }
  return "?";
}

// One lane's operands of a collective instruction.
struct Arrival {
  Op op = Op::kNone;
  const void* in = nullptr;
  void* out = nullptr;
  uint64_t arg0 = 0, arg1 = 0;   // shfl: lane mask; ldmatrix: address, trans; wgmma: descriptors
  int arg2 = 0;                  // wgmma: n | trans_a << 16 | trans_b << 17; wait: pending
};

struct Copy {
  uint32_t dst;
  const unsigned char* src;
  int bytes;
};

// An asynchronous warpgroup product waiting for wgmma.wait_group.
struct PendingWgmma {
  uint64_t desc_a, desc_b;
  int n;
  bool trans_a, trans_b;
  Operand type;
  float* d[kWarpgroupSize];
  // The accumulators (n / 2 per thread, thread-major) as this product must find them: their values
  // at issue, updated as earlier products on the same accumulators complete.
  std::vector<float> expected;
};

struct Thread {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  dim3 idx;
  int linear = 0;
  bool done = false;
  bool blocked = false;
  bool proxy_fenced = false;   // fence.proxy.async since the block's view last caught up
  Op waiting = Op::kNone;
  std::vector<Copy> open_copies;                   // cp.async since the last commit
  std::vector<std::vector<Copy>> committed;        // committed groups, oldest first
};

// A set of threads that meet at a collective: a warp, a warpgroup or the block.
struct Group {
  int size = 0;
  int arrived = 0;
  int first = 0;              // linear index of the group's first thread; members are consecutive
  std::vector<Arrival> slot;
};

struct WarpgroupState {
  std::vector<PendingWgmma> open;                  // issued since the last commit
  std::vector<std::vector<PendingWgmma>> committed;
};

// A device_malloc buffer: `bytes` at its start address, in a mapping of its own whose first and last
// pages are inaccessible; one of its edges touches a guard page (GuardedEdge).
struct Buffer {
  size_t bytes;
  unsigned char* mapping;
  size_t mapping_bytes;
};

struct State {
  DeviceModel device;
  Schedule schedule;
  std::map<const unsigned char*, Buffer> globals;   // device_malloc's buffers by start address
  GuardedEdge guarded_edge = GuardedEdge::kEnd;
  std::map<const void*, int> max_dynamic_smem;   // cudaFuncAttributeMaxDynamicSharedMemorySize
  cudaError_t last_error = cudaSuccess;
  std::string error;
  Stats stats;

  // The running block.
  dim3 grid, block, block_idx;
  std::vector<std::unique_ptr<Thread>> threads;
  std::vector<unsigned char> smem;
  // Shared memory as the async proxy (wgmma) sees it: smem as it was when every live thread of the
  // block had last executed fence.proxy.async.
  std::vector<unsigned char> async_smem;
  int proxy_fenced = 0;   // live threads fenced since async_smem caught up
  size_t smem_bytes = 0;
  std::vector<Group> warps, warpgroups;
  Group barrier;
  std::vector<WarpgroupState> wgmma_state;
  Thread* current = nullptr;
  ucontext_t scheduler;
  const std::function<void()>* body = nullptr;
  bool failed = false;
};

State& state() {
  static State s;
  return s;
}

// Guards State::globals: device_malloc and device_free run on whichever thread allocates or frees
// a tensor (emulator_binding.cpp's allocator), not only on the one running kernels.
std::mutex& globals_mutex() {
  static std::mutex m;
  return m;
}

Thread& me() { return *state().current; }

// Gives control back to the scheduler; returns when this thread runs again.
void yield() {
  State& s = state();
  Thread* t = s.current;
  ++s.stats.switches;
  swapcontext(&t->ctx, &s.scheduler);
}

void fail(const std::string& message) {
  State& s = state();
  if (!s.failed) {
    std::ostringstream out;
    out << message << " (block " << s.block_idx.x << "," << s.block_idx.y << "," << s.block_idx.z << ", thread "
        << (s.current ? s.current->linear : -1) << ")";
    s.error = out.str();
  }
  s.failed = true;
}

// Ends the current fiber for good after an error: the scheduler abandons the block.
[[noreturn]] void abandon() {
  State& s = state();
  s.current->done = true;
  swapcontext(&s.current->ctx, &s.scheduler);
  std::abort();   // never resumed
}

void land(const Copy& c) {
  State& s = state();
  unsigned char* dst = s.smem.data() + c.dst;
  if (c.bytes > 0) std::memcpy(dst, c.src, size_t(c.bytes));
  std::memset(dst + c.bytes, 0, size_t(16 - c.bytes));
}

// Meets the other members of `g` at collective `op`: the last to arrive runs `perform` on every
// member's arrival, then all continue.
template <typename Perform>
void collective(Group& g, int index, const Arrival& arrival, Perform&& perform) {
  State& s = state();
  g.slot[index] = arrival;
  me().waiting = arrival.op;
  if (++g.arrived < g.size) {
    me().blocked = true;
    yield();
    if (s.failed) abandon();
    return;
  }
  for (int i = 0; i < g.size; ++i) {
    if (g.slot[i].op != arrival.op) {
      fail(std::string("divergent collective: one lane at ") + op_name(arrival.op) + ", another at " +
           op_name(g.slot[i].op));
      abandon();
    }
  }
  perform(g.slot);
  g.arrived = 0;
  for (int m = g.first; m < g.first + g.size; ++m) {
    s.threads[m]->blocked = false;
    s.threads[m]->waiting = Op::kNone;
  }
}

void check_smem_range(uint32_t addr, uint32_t bytes, const char* what) {
  State& s = state();
  if (uint64_t(addr) + bytes > s.smem_bytes) {
    fail(std::string(what) + ": shared address " + std::to_string(addr) + " + " + std::to_string(bytes) +
         " bytes is past the block's " + std::to_string(s.smem_bytes) + " bytes of dynamic shared memory");
    abandon();
  }
}

// The device buffer starting at or before ptr (the only one ptr can be in or just past), or null;
// the caller holds globals_mutex().
const std::pair<const unsigned char* const, Buffer>* buffer_before(const unsigned char* ptr) {
  const auto& globals = state().globals;
  const auto after = globals.upper_bound(ptr);   // the first buffer starting past ptr
  return after == globals.begin() ? nullptr : &*std::prev(after);
}

bool in_device_buffer(const unsigned char* ptr, size_t bytes) {
  const std::lock_guard<std::mutex> lock(globals_mutex());
  if (state().globals.empty()) return true;
  const auto* entry = buffer_before(ptr);
  return entry != nullptr && ptr + bytes <= entry->first + entry->second.bytes;
}

void check_global_range(const unsigned char* ptr, size_t bytes, const char* what) {
  if (in_device_buffer(ptr, bytes)) return;
  std::ostringstream out;
  out << what << ": global address " << static_cast<const void*>(ptr) << " + " << bytes
      << " bytes is in no device buffer";
  fail(out.str());
  abandon();
}

float to_float(uint16_t bits, Operand type) {
  if (type == Operand::kBFloat16) {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  __half h;
  std::memcpy(&h, &bits, 2);
  return __half2float(h);
}

uint16_t smem_u16(uint32_t addr) {
  uint16_t v;
  std::memcpy(&v, state().smem.data() + addr, 2);
  return v;
}

// Lets every thread waiting at the block's barrier continue.
void release_barrier() {
  State& s = state();
  s.barrier.arrived = 0;
  for (auto& t : s.threads) {
    if (t->waiting == Op::kBarrier) {
      t->blocked = false;
      t->waiting = Op::kNone;
    }
  }
}

void trampoline() {
  State& s = state();
  (*s.body)();
  Thread& t = *s.current;
  for (auto& group : t.committed)
    for (const Copy& c : group) land(c);
  for (const Copy& c : t.open_copies) land(c);
  t.committed.clear();
  t.open_copies.clear();
  t.done = true;
  // A thread that exits counts as arrived at the block's barrier.
  --s.barrier.size;
  if (s.barrier.size > 0 && s.barrier.arrived == s.barrier.size) release_barrier();
  swapcontext(&t.ctx, &s.scheduler);
}

std::string deadlock_report() {
  State& s = state();
  std::map<std::string, int> counts;
  for (auto& t : s.threads) counts[t->done ? "exited" : op_name(t->waiting)]++;
  std::ostringstream out;
  out << "deadlock: no thread of block " << s.block_idx.x << "," << s.block_idx.y << "," << s.block_idx.z
      << " can continue (";
  bool first = true;
  for (const auto& [what, n] : counts) {
    out << (first ? "" : ", ") << n << " " << what;
    first = false;
  }
  out << ")";
  return out.str();
}

// Runs one block to completion; false after an error (state().error says which).
// A fault while a kernel runs (a plain global load or store into a buffer's guard page, or outside
// every buffer) becomes that launch's error, naming the access; a fault anywhere else goes to the
// handler installed before the launch.
struct sigaction previous_segv;

void on_segv(int, siginfo_t* info, void* context) {
  State& s = state();
  if (s.current == nullptr) {
    sigaction(SIGSEGV, &previous_segv, nullptr);   // the faulting instruction runs again under it
    return;
  }
  const auto* addr = static_cast<const unsigned char*>(info->si_addr);
  std::ostringstream out;
#if defined(__x86_64__)
  // Bit 1 of the x86-64 page-fault error code: the access was a write.
  const bool store = (static_cast<ucontext_t*>(context)->uc_mcontext.gregs[REG_ERR] & 2) != 0;
  out << "global " << (store ? "store" : "load") << " at " << static_cast<const void*>(addr);
#else
  (void)context;
  out << "global access at " << static_cast<const void*>(addr);
#endif
  bool described = false;
  {
    // try_lock: the faulting fiber cannot hold the lock, but a signal handler must never wait.
    const std::unique_lock<std::mutex> lock(globals_mutex(), std::try_to_lock);
    if (lock.owns_lock()) {
      const auto* before = buffer_before(addr);
      const auto after = state().globals.upper_bound(addr);
      if (before != nullptr && addr >= before->first + before->second.bytes &&
          addr < before->second.mapping + before->second.mapping_bytes) {
        out << ": " << (addr - before->first - before->second.bytes) << " bytes past the end of a "
            << before->second.bytes << "-byte buffer";
        described = true;
      } else if (after != state().globals.end() && addr >= after->second.mapping) {
        out << ": " << (after->first - addr) << " bytes before the start of a " << after->second.bytes
            << "-byte buffer";
        described = true;
      }
    }
  }
  if (!described) out << ": in no device buffer";
  fail(out.str());
  abandon();   // leaves the handler for the scheduler, which ends the launch
}

// Routes SIGSEGV to on_segv for the lifetime of a launch.
struct FaultsReported {
  FaultsReported() {
    struct sigaction action {};
    action.sa_sigaction = on_segv;
    action.sa_flags = SA_SIGINFO;
    sigemptyset(&action.sa_mask);
    sigaction(SIGSEGV, &action, &previous_segv);
  }
  ~FaultsReported() { sigaction(SIGSEGV, &previous_segv, nullptr); }
};

bool run_block() {
  State& s = state();
  const int n = int(s.block.x * s.block.y * s.block.z);
  std::fill(s.smem.begin(), s.smem.end(), 0xFF);
  s.async_smem = s.smem;
  s.proxy_fenced = 0;
  for (int i = 0; i < n; ++i) {
    Thread& t = *s.threads[i];
    t.done = t.blocked = t.proxy_fenced = false;
    t.waiting = Op::kNone;
    t.open_copies.clear();
    t.committed.clear();
    t.idx = dim3(i % s.block.x, (i / s.block.x) % s.block.y, i / (s.block.x * s.block.y));
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = t.stack.get();
    t.ctx.uc_stack.ss_size = kFiberStackBytes;
    t.ctx.uc_link = nullptr;
    makecontext(&t.ctx, trampoline, 0);
  }
  s.barrier.size = n;
  s.barrier.arrived = 0;
  for (auto& g : s.warps) g.arrived = 0;
  for (auto& g : s.warpgroups) g.arrived = 0;
  for (auto& w : s.wgmma_state) {
    w.open.clear();
    w.committed.clear();
  }
  ++s.stats.blocks;
  std::vector<int> order(static_cast<size_t>(n));
  for (int k = 0; k < n; ++k) order[size_t(k)] = s.schedule.reverse_threads ? n - 1 - k : k;
  std::mt19937 rng(s.schedule.shuffle_seed ^ (s.block_idx.x + 65536u * (s.block_idx.y + 65536u * s.block_idx.z)));
  for (;;) {
    bool ran = false, all_done = true;
    if (s.schedule.shuffle_seed != 0) std::shuffle(order.begin(), order.end(), rng);
    for (const int i : order) {
      Thread& t = *s.threads[i];
      if (t.done) continue;
      all_done = false;
      if (t.blocked) continue;
      s.current = &t;
      swapcontext(&s.scheduler, &t.ctx);
      s.current = nullptr;
      ran = true;
      if (s.failed) return false;
    }
    if (all_done) return true;
    if (!ran) {
      s.error = deadlock_report();
      s.failed = true;
      return false;
    }
  }
}

}  // namespace

void set_device(const DeviceModel& device) { state().device = device; }
const DeviceModel& device() { return state().device; }
void set_schedule(const Schedule& schedule) { state().schedule = schedule; }
void set_guarded_edge(GuardedEdge edge) {
  const std::lock_guard<std::mutex> lock(globals_mutex());
  state().guarded_edge = edge;
}

void* device_malloc(size_t bytes) {
  if (bytes == 0) return nullptr;
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  const size_t data_bytes = (bytes + 15) / 16 * 16;
  const size_t inner_bytes = (data_bytes + page - 1) / page * page;
  const size_t mapping_bytes = inner_bytes + 2 * page;
  void* mapping = mmap(nullptr, mapping_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mapping == MAP_FAILED) return nullptr;
  auto* base = static_cast<unsigned char*>(mapping);
  mprotect(base, page, PROT_NONE);
  mprotect(base + mapping_bytes - page, page, PROT_NONE);
  unsigned char* inner = base + page;
  // The slack beside the buffer is NaN too: a small overrun on the unguarded edge reads NaN, not 0.
  // The buffer starts 16-byte aligned, so the pattern stays in phase with its elements.
  static constexpr unsigned char kPattern[4] = {0xff, 0xff, 0xff, 0x7f};
  for (size_t i = 0; i < inner_bytes; ++i) inner[i] = kPattern[i % 4];
  const std::lock_guard<std::mutex> lock(globals_mutex());
  State& s = state();
  unsigned char* data = s.guarded_edge == GuardedEdge::kStart ? inner : inner + inner_bytes - data_bytes;
  s.globals[data] = Buffer{bytes, base, mapping_bytes};
  s.stats.device_bytes += int64_t(bytes);
  s.stats.device_bytes_peak = std::max(s.stats.device_bytes_peak, s.stats.device_bytes);
  return data;
}

void device_free(void* ptr) {
  if (ptr == nullptr) return;
  Buffer buffer{};
  {
    const std::lock_guard<std::mutex> lock(globals_mutex());
    const auto it = state().globals.find(static_cast<const unsigned char*>(ptr));
    if (it == state().globals.end()) return;
    buffer = it->second;
    state().globals.erase(it);
    state().stats.device_bytes -= int64_t(buffer.bytes);
  }
  munmap(buffer.mapping, buffer.mapping_bytes);
}

std::string take_error() {
  std::string e = std::move(state().error);
  state().error.clear();
  return e;
}
Stats stats() {
  const std::lock_guard<std::mutex> lock(globals_mutex());
  return state().stats;
}
void reset_stats() {
  const std::lock_guard<std::mutex> lock(globals_mutex());
  Stats& stats = state().stats;
  const int64_t live = stats.device_bytes;
  stats = Stats{};
  stats.device_bytes = stats.device_bytes_peak = live;
}

const dim3& thread_idx() { return me().idx; }
const dim3& block_idx() { return state().block_idx; }
const dim3& block_dim() { return state().block; }
const dim3& grid_dim() { return state().grid; }
unsigned char* dynamic_smem() { return state().smem.data(); }

uint32_t smem_offset(const void* ptr) {
  State& s = state();
  const auto* p = static_cast<const unsigned char*>(ptr);
  if (p < s.smem.data() || p > s.smem.data() + s.smem.size()) {
    fail("__cvta_generic_to_shared of a pointer outside the block's shared memory");
    abandon();
  }
  return uint32_t(p - s.smem.data());
}

void kernel_error(const std::string& message) {
  fail(message);
  abandon();
}

void syncthreads() {
  State& s = state();
  Thread& t = me();
  t.waiting = Op::kBarrier;
  if (++s.barrier.arrived < s.barrier.size) {
    t.blocked = true;
    yield();
    if (s.failed) abandon();
    return;
  }
  release_barrier();
}

uint64_t shfl_xor(uint64_t bits, int lane_mask) {
  State& s = state();
  const int lane = me().linear % kWarpSize;
  Group& warp = s.warps[me().linear / kWarpSize];
  uint64_t result = 0;
  Arrival a;
  a.op = Op::kShfl;
  a.in = &bits;
  a.out = &result;
  a.arg0 = uint64_t(lane_mask);
  collective(warp, lane, a, [](std::vector<Arrival>& slots) {
    for (int l = 0; l < kWarpSize; ++l) {
      if (slots[l].arg0 != slots[0].arg0) {
        fail("__shfl_xor_sync with different lane masks across the warp");
        abandon();
      }
    }
    const int mask = int(slots[0].arg0);
    for (int l = 0; l < kWarpSize; ++l)
      *static_cast<uint64_t*>(slots[l].out) = *static_cast<const uint64_t*>(slots[l ^ mask].in);
  });
  return result;
}

void cp_async(uint32_t dst, const void* src, int src_bytes) {
  State& s = state();
  if (src_bytes < 0 || src_bytes > 16) kernel_error("cp.async: src-size outside [0, 16]");
  if (dst % 16 != 0) kernel_error("cp.async: shared destination not 16-byte aligned");
  check_smem_range(dst, 16, "cp.async");
  const auto* p = static_cast<const unsigned char*>(src);
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) kernel_error("cp.async: global source not 16-byte aligned");
  if (src_bytes > 0) check_global_range(p, size_t(src_bytes), "cp.async");
  const Copy c{dst, p, src_bytes};
  if (s.schedule.copies == CopyLanding::kAtIssue) {
    land(c);
  } else {
    me().open_copies.push_back(c);
  }
}

void cp_async_commit() {
  Thread& t = me();
  t.committed.push_back(std::move(t.open_copies));
  t.open_copies.clear();
}

void cp_async_wait(int pending) {
  Thread& t = me();
  while (int(t.committed.size()) > pending) {
    for (const Copy& c : t.committed.front()) land(c);
    t.committed.erase(t.committed.begin());
  }
}

void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr, bool trans) {
  State& s = state();
  const int lane = me().linear % kWarpSize;
  Arrival a;
  a.op = Op::kLdmatrix;
  a.out = &r;
  a.arg0 = addr;
  a.arg1 = trans ? 1 : 0;
  collective(s.warps[me().linear / kWarpSize], lane, a, [](std::vector<Arrival>& slots) {
    // Matrix i, row j (eight 16-bit elements) starts at lane 8 i + j's address.
    uint16_t m[4][8][8];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 8; ++j) {
        const uint32_t row = uint32_t(slots[8 * i + j].arg0);
        if (row % 16 != 0) {
          fail("ldmatrix: row address not 16-byte aligned");
          abandon();
        }
        check_smem_range(row, 16, "ldmatrix");
        for (int c = 0; c < 8; ++c) m[i][j][c] = smem_u16(row + 2 * c);
      }
    for (int l = 0; l < kWarpSize; ++l) {
      if (slots[l].arg1 != slots[0].arg1) {
        fail("ldmatrix: .trans differs across the warp");
        abandon();
      }
      auto& out = *static_cast<uint32_t(*)[4]>(slots[l].out);
      const int g = l / 4, t = l % 4;
      for (int i = 0; i < 4; ++i) {
        const uint16_t lo = slots[0].arg1 ? m[i][2 * t][g] : m[i][g][2 * t];
        const uint16_t hi = slots[0].arg1 ? m[i][2 * t + 1][g] : m[i][g][2 * t + 1];
        out[i] = uint32_t(lo) | (uint32_t(hi) << 16);
      }
    }
  });
}

namespace {
struct MmaOperands {
  const uint32_t* a;
  uint32_t b0, b1;
};
}  // namespace

void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, Operand type) {
  State& s = state();
  const int lane = me().linear % kWarpSize;
  const MmaOperands in{a, b0, b1};
  Arrival arrival;
  arrival.op = Op::kMma;
  arrival.in = &in;
  arrival.out = &d;
  arrival.arg0 = uint64_t(type);
  collective(s.warps[me().linear / kWarpSize], lane, arrival, [](std::vector<Arrival>& slots) {
    const Operand type = Operand(slots[0].arg0);
    ++state().stats.mma_sync;
    double A[16][16], B[16][8];
    auto half = [&](uint32_t word, int h) { return double(to_float(uint16_t(word >> (16 * h)), type)); };
    for (int l = 0; l < kWarpSize; ++l) {
      if (Operand(slots[l].arg0) != type) {
        fail("mma.sync: operand types differ across the warp");
        abandon();
      }
      const auto& op = *static_cast<const MmaOperands*>(slots[l].in);
      const int g = l / 4, t = l % 4;
      for (int h = 0; h < 2; ++h) {
        A[g][2 * t + h] = half(op.a[0], h);
        A[g + 8][2 * t + h] = half(op.a[1], h);
        A[g][2 * t + 8 + h] = half(op.a[2], h);
        A[g + 8][2 * t + 8 + h] = half(op.a[3], h);
        B[2 * t + h][g] = half(op.b0, h);
        B[2 * t + 8 + h][g] = half(op.b1, h);
      }
    }
    // Every lane's outputs are computed before any is written.
    float result[kWarpSize][4];
    for (int l = 0; l < kWarpSize; ++l) {
      const auto& c = *static_cast<float(*)[4]>(slots[l].out);
      const int g = l / 4, t = l % 4;
      for (int e = 0; e < 4; ++e) {
        const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
        double acc = c[e];
        for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
        result[l][e] = float(acc);
      }
    }
    for (int l = 0; l < kWarpSize; ++l)
      std::memcpy(*static_cast<float(*)[4]>(slots[l].out), result[l], sizeof(result[l]));
  });
}

namespace {

// Element (mn, k) of a wgmma operand tile in shared memory, from its descriptor (no swizzle:
// 8 x 8 core matrices of 16-bit elements; LBO steps between cores along K, SBO along M or N).
// K-major: a core's 8 rows are 8 consecutive mn, each 16 bytes of 8 consecutive k.
// MN-major (transposed): a core's 8 rows are 8 consecutive k, each 8 consecutive mn.
struct Descriptor {
  uint32_t start, lbo, sbo;
  uint32_t address(int mn, int k, bool mn_major) const {
    const uint32_t core = uint32_t(mn / 8) * sbo + uint32_t(k / 8) * lbo;
    const uint32_t within = mn_major ? uint32_t(k % 8) * 16 + uint32_t(mn % 8) * 2 : uint32_t(mn % 8) * 16 + uint32_t(k % 8) * 2;
    return start + core + within;
  }
};

Descriptor decode(uint64_t desc, const char* which) {
  if ((desc >> 62) != 0 || ((desc >> 49) & 7) != 0) {
    fail(std::string("wgmma: descriptor of ") + which + " asks for a swizzle mode or base offset (unsupported)");
    abandon();
  }
  return Descriptor{uint32_t(desc & 0x3FFF) << 4, uint32_t((desc >> 16) & 0x3FFF) << 4,
                    uint32_t((desc >> 32) & 0x3FFF) << 4};
}

// The thread must not write accumulators while a product on them is in flight: their values when
// it completes must be those it was issued with (or the previous product's results).
void check_accumulators_untouched(const PendingWgmma& op) {
  const int regs = op.n / 2;
  for (int i = 0; i < kWarpgroupSize; ++i)
    if (std::memcmp(&op.expected[size_t(i) * regs], op.d[i], sizeof(float) * regs) != 0) {
      fail("wgmma: thread " + std::to_string(i) + " of the warpgroup wrote its accumulators while a product on them "
           "was in flight (before wgmma.wait_group)");
      abandon();
    }
}

// A 16-bit wgmma operand element as the async proxy reads it. Shared memory that generic-proxy
// writes (st.shared, cp.async) changed after the block's last fence.proxy.async is an error: the
// fence is missing, or a copy still in flight overwrites what the tensor cores read.
uint16_t async_smem_u16(uint32_t addr, const char* what) {
  State& s = state();
  check_smem_range(addr, 2, what);
  uint16_t seen;
  std::memcpy(&seen, s.async_smem.data() + addr, 2);
  if (seen != smem_u16(addr)) {
    fail(std::string(what) + ": shared address " + std::to_string(addr) +
         " changed since the block's last fence.proxy.async (an unfenced generic-proxy write, or a "
         "copy racing with the product)");
    abandon();
  }
  return seen;
}

void perform_wgmma(const PendingWgmma& op) {
  const Descriptor da = decode(op.desc_a, "A"), db = decode(op.desc_b, "B");
  std::vector<double> A(64 * 16), B(size_t(op.n) * 16);
  for (int m = 0; m < 64; ++m)
    for (int k = 0; k < 16; ++k)
      A[m * 16 + k] = to_float(async_smem_u16(da.address(m, k, op.trans_a), "wgmma A"), op.type);
  for (int n = 0; n < op.n; ++n)
    for (int k = 0; k < 16; ++k)
      B[size_t(n) * 16 + k] = to_float(async_smem_u16(db.address(n, k, op.trans_b), "wgmma B"), op.type);
  // Thread (warp w, lane l) of the warpgroup holds, for n8 block j, D[16 w + l / 4 (+ 8)][8 j + 2 (l % 4) + {0, 1}].
  for (int thread = 0; thread < kWarpgroupSize; ++thread) {
    const int w = thread / kWarpSize, l = thread % kWarpSize;
    float* d = op.d[thread];
    for (int j = 0; j < op.n / 8; ++j)
      for (int e = 0; e < 4; ++e) {
        const int row = 16 * w + l / 4 + (e >= 2 ? 8 : 0), col = 8 * j + 2 * (l % 4) + (e & 1);
        double acc = d[4 * j + e];
        for (int k = 0; k < 16; ++k) acc += A[row * 16 + k] * B[size_t(col) * 16 + k];
        d[4 * j + e] = float(acc);
      }
  }
}

Group& my_warpgroup(int* index) {
  State& s = state();
  *index = me().linear % kWarpgroupSize;
  if (s.warpgroups.empty() || me().linear / kWarpgroupSize >= int(s.warpgroups.size())) {
    fail("wgmma in a block whose thread count is not a multiple of 128");
    abandon();
  }
  return s.warpgroups[me().linear / kWarpgroupSize];
}

}  // namespace

void wgmma(float* d, int n, uint64_t desc_a, uint64_t desc_b, bool trans_a, bool trans_b, Operand type) {
  int index = 0;
  Group& g = my_warpgroup(&index);
  const int group_id = me().linear / kWarpgroupSize;
  Arrival a;
  a.op = Op::kWgmma;
  a.out = d;
  a.arg0 = desc_a;
  a.arg1 = desc_b;
  a.arg2 = n | (trans_a ? 1 << 16 : 0) | (trans_b ? 1 << 17 : 0) | (int(type) << 18);
  collective(g, index, a, [group_id](std::vector<Arrival>& slots) {
    for (int i = 1; i < kWarpgroupSize; ++i) {
      if (slots[i].arg0 != slots[0].arg0 || slots[i].arg1 != slots[0].arg1 || slots[i].arg2 != slots[0].arg2) {
        fail("wgmma: descriptors or shape differ across the warpgroup");
        abandon();
      }
    }
    PendingWgmma op;
    op.desc_a = slots[0].arg0;
    op.desc_b = slots[0].arg1;
    op.n = slots[0].arg2 & 0xFFFF;
    op.trans_a = (slots[0].arg2 >> 16) & 1;
    op.trans_b = (slots[0].arg2 >> 17) & 1;
    op.type = Operand((slots[0].arg2 >> 18) & 1);
    for (int i = 0; i < kWarpgroupSize; ++i) op.d[i] = static_cast<float*>(slots[i].out);
    const int regs = op.n / 2;
    op.expected.resize(size_t(kWarpgroupSize) * regs);
    for (int i = 0; i < kWarpgroupSize; ++i) std::memcpy(&op.expected[size_t(i) * regs], op.d[i], sizeof(float) * regs);
    ++state().stats.wgmma;
    state().wgmma_state[group_id].open.push_back(op);
  });
}

void fence_proxy_async() {
  State& s = state();
  Thread& t = me();
  if (!t.proxy_fenced) {
    t.proxy_fenced = true;
    ++s.proxy_fenced;
  }
  int live = 0;
  for (const auto& other : s.threads) live += other->done ? 0 : 1;
  if (s.proxy_fenced < live) return;
  // Every live thread has fenced its generic writes: the async proxy sees shared memory as it is.
  s.async_smem = s.smem;
  s.proxy_fenced = 0;
  for (const auto& other : s.threads) other->proxy_fenced = false;
}

void wgmma_commit() {
  int index = 0;
  Group& g = my_warpgroup(&index);
  const int group_id = me().linear / kWarpgroupSize;
  Arrival a;
  a.op = Op::kWgmmaCommit;
  collective(g, index, a, [group_id](std::vector<Arrival>&) {
    WarpgroupState& w = state().wgmma_state[group_id];
    w.committed.push_back(std::move(w.open));
    w.open.clear();
  });
}

void wgmma_wait(int pending) {
  int index = 0;
  Group& g = my_warpgroup(&index);
  const int group_id = me().linear / kWarpgroupSize;
  Arrival a;
  a.op = Op::kWgmmaWait;
  a.arg2 = pending;
  collective(g, index, a, [group_id, pending](std::vector<Arrival>&) {
    WarpgroupState& w = state().wgmma_state[group_id];
    if (!w.open.empty()) {
      fail("wgmma.wait_group with products issued but not committed");
      abandon();
    }
    while (int(w.committed.size()) > pending) {
      for (const PendingWgmma& op : w.committed.front()) {
        check_accumulators_untouched(op);
        perform_wgmma(op);
        // Later products on these accumulators now expect this one's results.
        const int regs = op.n / 2;
        for (auto& group : w.committed)
          for (PendingWgmma& later : group)
            if (&later != &op && later.d[0] == op.d[0] && later.n == op.n)
              for (int i = 0; i < kWarpgroupSize; ++i)
                std::memcpy(&later.expected[size_t(i) * regs], op.d[i], sizeof(float) * regs);
      }
      w.committed.erase(w.committed.begin());
    }
  });
}

cudaError_t launch(const void* kernel, dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body) {
  State& s = state();
  const int64_t threads = int64_t(block.x) * block.y * block.z;
  cudaError_t err = cudaSuccess;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0 || threads > 1024 || grid.y > 65535 ||
      grid.z > 65535) {
    err = cudaErrorInvalidConfiguration;
  } else if (smem_bytes > kDefaultSmemLimit) {
    const auto it = s.max_dynamic_smem.find(kernel);
    if (it == s.max_dynamic_smem.end() || size_t(it->second) < smem_bytes) err = cudaErrorInvalidValue;
  }
  if (err != cudaSuccess) {
    s.last_error = err;
    return err;
  }
  s.stats.dynamic_smem_peak = std::max(s.stats.dynamic_smem_peak, int64_t(smem_bytes));
  if (!s.schedule.run_blocks) return cudaSuccess;
  s.grid = grid;
  s.block = block;
  s.smem_bytes = smem_bytes;
  s.smem.assign(smem_bytes, 0xFF);
  while (int64_t(s.threads.size()) < threads) {
    auto t = std::make_unique<Thread>();
    t->stack.reset(new char[kFiberStackBytes]);
    t->linear = int(s.threads.size());
    s.threads.push_back(std::move(t));
  }
  s.threads.resize(size_t(threads));
  auto make_groups = [&](std::vector<Group>& groups, int size) {
    groups.assign(size_t(threads / size), Group{});
    for (size_t gi = 0; gi < groups.size(); ++gi) {
      groups[gi].size = size;
      groups[gi].first = int(gi) * size;
      groups[gi].slot.resize(size_t(size));
    }
  };
  make_groups(s.warps, kWarpSize);
  make_groups(s.warpgroups, kWarpgroupSize);
  s.wgmma_state.assign(s.warpgroups.size(), WarpgroupState{});
  s.body = &body;
  s.failed = false;
  const FaultsReported faults_reported;
  const int64_t blocks = int64_t(grid.x) * grid.y * grid.z;
  for (int64_t i = 0; i < blocks; ++i) {
    const int64_t b = s.schedule.reverse_blocks ? blocks - 1 - i : i;
    s.block_idx = dim3(unsigned(b % grid.x), unsigned(b / grid.x % grid.y), unsigned(b / (int64_t(grid.x) * grid.y)));
    if (!run_block()) {
      s.body = nullptr;
      s.last_error = cudaErrorLaunchFailure;
      return cudaErrorLaunchFailure;
    }
  }
  s.body = nullptr;
  return cudaSuccess;
}

cudaError_t get_last_error() {
  const cudaError_t err = state().last_error;
  state().last_error = cudaSuccess;
  return err;
}

cudaError_t get_device(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t device_get_attribute(int* value, cudaDeviceAttr attr, int device) {
  const DeviceModel& d = state().device;
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrComputeCapabilityMajor: *value = d.major; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = d.minor; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = d.multiprocessors; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = d.smem_per_block_optin; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = d.smem_per_multiprocessor; return cudaSuccess;
    case cudaDevAttrReservedSharedMemoryPerBlock: *value = d.reserved_smem_per_block; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value) {
  State& s = state();
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value < 0 || value > s.device.smem_per_block_optin) return cudaErrorInvalidValue;
  s.max_dynamic_smem[kernel] = value;
  return cudaSuccess;
}

}  // namespace emu
}  // namespace sketchcolor
