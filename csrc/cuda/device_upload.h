// The one host-to-device upload of the CUDA bindings: a kernel's descriptor array and its int64
// offsets travel as raw bytes of one small pinned tensor, in one asynchronous copy on the current stream.
#pragma once
#include <ATen/ATen.h>

#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace pyrebasin {

// Returns device pointers to copies of `descs` and `offsets`; `keep` owns the device bytes and must
// outlive the launch (the pinned staging tensor may go: its copy is ordered on the stream).
template <typename Desc>
std::pair<const Desc*, const int64_t*> upload_descriptors(const std::vector<Desc>& descs,
                                                          const std::vector<int64_t>& offsets,
                                                          c10::Device device, at::Tensor& keep) {
  static_assert(alignof(Desc) <= 16 && std::is_trivially_copyable_v<Desc>, "plain-C descriptors only");
  const int64_t desc_bytes = static_cast<int64_t>(descs.size() * sizeof(Desc));
  const int64_t offsets_at = (desc_bytes + 15) / 16 * 16;  // int64 offsets stay aligned
  const int64_t total = offsets_at + static_cast<int64_t>(offsets.size() * sizeof(int64_t));
  auto host = at::empty({total}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  auto* bytes = static_cast<char*>(host.data_ptr());
  std::memcpy(bytes, descs.data(), desc_bytes);
  std::memcpy(bytes + offsets_at, offsets.data(), offsets.size() * sizeof(int64_t));
  keep = host.to(device, /*non_blocking=*/true);
  const auto* dev = static_cast<const char*>(keep.const_data_ptr());
  return {reinterpret_cast<const Desc*>(dev), reinterpret_cast<const int64_t*>(dev + offsets_at)};
}

}  // namespace pyrebasin
