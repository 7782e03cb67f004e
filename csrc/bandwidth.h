// Memory read bandwidth probe: what a decode step that streams every weight can hope for.
#pragma once

#include <cstddef>

namespace edgelora {

// Bytes per second read by `threads` threads (0: hardware concurrency) summing a buffer of
// `size_bytes`, best of `repeats` passes (the first touch of the pages is not timed).
double read_bandwidth(std::size_t size_bytes, unsigned threads, int repeats);

}  // namespace edgelora
