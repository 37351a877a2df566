// cooperative_groups' cluster API on the emulated device (blocks of a cluster run as one group of
// fibers, one barrier phase of a block at a time; map_shared_rank gives another block's shared
// memory in its window of runtime.cpp, whose accesses are checked like the block's own: bounds,
// never written, and races, which only a cluster barrier orders across blocks).
#pragma once
#include "../cuda_host.h"
namespace cooperative_groups {
struct cluster_group {
  unsigned block_rank() const { return ::emu::cluster_rank(); }
  void sync() const { ::emu::sync_cluster(); }
  template <typename T>
  T* map_shared_rank(T* p, unsigned rank) const {
    return static_cast<T*>(::emu::map_cluster_shared(const_cast<void*>(static_cast<const void*>(p)), rank));
  }
};
inline cluster_group this_cluster() { return {}; }
}  // namespace cooperative_groups
