// The Local POD op (csrc/pod_distill.cpp) as lskd::distill_terms calls it: one pod_distill term.
#pragma once

#include "distill_terms.h"
#include "op_utils.h"

#include <tuple>
#include <vector>

namespace lskd {

struct PodTerm {
  std::vector<int64_t> scales;
  bool square = true;
};

// Reads the params of a pod_distill term after its kind: square, S, scale_1 .. scale_S.
PodTerm read_pod_term(TermReader& params);

// lskd::pod_forward / lskd::pod_backward of one term, through the dispatcher.
std::tuple<at::Tensor, at::Tensor> term_forward(const PodTerm& term, const at::Tensor& student,
                                                const at::Tensor& teacher, const OptTensor& m, const OptTensor& k);
at::Tensor term_backward(const PodTerm& term, const at::Tensor& grad_dist, const at::Tensor& student,
                         const OptTensor& m, const OptTensor& k, const at::Tensor& dist, const at::Tensor& emb);

}  // namespace lskd
