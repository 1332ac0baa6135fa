// The params of lskd::distill_terms (csrc/distill_terms.cpp), read term by term: a term is its
// kind (0 = pod_distill, 1 = sop_distill), then the values that its op file reads
// (read_pod_term in csrc/pod_distill.cpp, read_sop_term in csrc/sop_distill.cpp), so that an
// op's parameters are defined in that op's file only.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>

namespace lskd {

class TermReader {
 public:
  explicit TermReader(at::IntArrayRef params) : params_(params) {}

  bool done() const { return pos_ >= params_.size(); }
  // The index of the term being read (for error messages).
  size_t term() const { return term_; }
  size_t size() const { return params_.size(); }

  // The next `count` values of the current term; `what` names them when the params end first.
  at::IntArrayRef take(size_t count, const char* what) {
    TORCH_CHECK(pos_ + count <= params_.size(), "lskd: distill_terms: params end inside the ", what, " of term ", term_,
                " (", params_.size(), " values)");
    const at::IntArrayRef out = params_.slice(pos_, count);
    pos_ += count;
    return out;
  }
  int64_t next_kind() { return take(1, "kind")[0]; }
  void end_term() { ++term_; }

 private:
  at::IntArrayRef params_;
  size_t pos_ = 0;
  size_t term_ = 0;
};

}  // namespace lskd
