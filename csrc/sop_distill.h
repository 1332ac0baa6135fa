// The second-order pooling op (csrc/sop_distill.cpp) as lskd::distill_terms calls it: one sop_distill term.
#pragma once

#include "distill_terms.h"
#include "op_utils.h"

#include <tuple>
#include <vector>

namespace lskd {

struct SopTerm {
  int64_t groups = 1;
  std::vector<int64_t> window, stride, padding;
};

// Reads the params of a sop_distill term after its kind: groups, wh, ww, sh, sw, ph, pw.
SopTerm read_sop_term(TermReader& params);

// lskd::sop_forward / lskd::sop_backward of one term, through the dispatcher.
std::tuple<at::Tensor, at::Tensor> term_forward(const SopTerm& term, const at::Tensor& student,
                                                const at::Tensor& teacher, const OptTensor& m, const OptTensor& k);
at::Tensor term_backward(const SopTerm& term, const at::Tensor& grad_dist, const at::Tensor& student,
                         const OptTensor& m, const OptTensor& k, const at::Tensor& dist, const at::Tensor& pooled_grad);

}  // namespace lskd
