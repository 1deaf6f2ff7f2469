// Device queries shared by the launchers.
#include <cuda_runtime.h>

#include <mutex>
#include <string>
#include <vector>

#include "common.cuh"

namespace specdiff {
namespace cuda {

int sm_count(int device) {
  static std::mutex mu;
  static std::vector<int> cache;
  std::lock_guard<std::mutex> lock(mu);
  if (device < 0) device = 0;
  if (static_cast<size_t>(device) >= cache.size()) cache.resize(static_cast<size_t>(device) + 1, 0);
  int& n = cache[static_cast<size_t>(device)];
  if (n == 0) {
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) {
      cudaGetLastError();
      n = 108;
    }
  }
  return n;
}

const char* error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

namespace {
thread_local std::string g_error_where;
}  // namespace

void note_error_where(const char* file, int line, const char* call) {
  if (g_error_where.empty())  // keep the innermost failure; callers up the stack repeat it
    g_error_where = std::string(file) + ":" + std::to_string(line) + ": " + call;
}

std::string take_error_where() {
  std::string w;
  w.swap(g_error_where);
  return w;
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: clear the sticky error
    return 0;
  }
  return n;
}

}  // namespace cuda
}  // namespace specdiff
