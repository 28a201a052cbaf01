// at::parallel_for whose worker threads run in the calling thread's thread-local state.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <cstdint>

namespace sketchcolor {

// OpenMP's worker threads start without the caller's thread-local state: under
// torch.inference_mode() the tensors the caller allocates are inference tensors, and an in-place
// ATen op on one from a worker thread (not in inference mode) fails ("Inplace update to inference
// tensor outside InferenceMode"). Each worker's share runs under the caller's state instead.
template <class F>
void parallel_for_in_caller_state(int64_t begin, int64_t end, int64_t grain_size, const F& f) {
  const at::ThreadLocalState caller_state;
  at::parallel_for(begin, end, grain_size, [&](int64_t range_begin, int64_t range_end) {
    const at::ThreadLocalStateGuard guard(caller_state);
    f(range_begin, range_end);
  });
}

}  // namespace sketchcolor
