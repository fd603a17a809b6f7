// When a walk over an HSRTree stops computing the box bound. Torch-free.
#pragma once

namespace hsr::index {

// Whether a walk still computes the box bound. The ball bound (the centroid's 4d bytes) comes
// first; the box (8d more bytes) is read only for a node the ball leaves open, and pays when it
// settles the node instead (rules it out or takes it whole), which saves bounding its children
// or sketching its keys, about ten times the box's bytes. In high dimension it rarely does (the
// clustered D=128 keys of bench_decode_cpu: 1 in 80 nodes; bench_index's clustered points at
// 1%: none), so a walk stops reading it once fewer than one in kPayRatio of the last kWindow
// boxes settled a node; the bounds stay valid either way (the box only tightens them).
class BoxGate {
 public:
  bool on() const { return on_; }
  void record(bool settled) {
    ++tries_;
    settled_ += settled;
    if (tries_ < kWindow) return;
    on_ = settled_ * kPayRatio >= tries_;
    tries_ = settled_ = 0;
  }

 private:
  static constexpr int kWindow = 32, kPayRatio = 16;
  bool on_ = true;
  int tries_ = 0, settled_ = 0;
};

}  // namespace hsr::index
