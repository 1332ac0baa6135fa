// Typed dispatcher handles of the lskd operators (schemas: csrc/ops.cpp), for the
// C++ code that calls one lskd op from another (csrc/autograd.cpp, csrc/md_masks.cpp,
// csrc/cuda/md_masks.cu). Each handle is looked up once (function-local static).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>
#include <vector>

namespace lskd {

using OptTensor = std::optional<at::Tensor>;
using OptTensorList = c10::List<OptTensor>;

using PodForwardSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const OptTensor&,
                                                         const OptTensor&, at::IntArrayRef, bool);
using PodBackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                                  const at::Tensor&, const at::Tensor&, at::IntArrayRef, bool);
using PodDistillSig = at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                                 at::IntArrayRef, bool, int64_t);
using SopForwardSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const OptTensor&,
                                                         const OptTensor&, int64_t, at::IntArrayRef, at::IntArrayRef,
                                                         at::IntArrayRef);
using SopBackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                                  const at::Tensor&, const at::Tensor&, int64_t, at::IntArrayRef, at::IntArrayRef,
                                  at::IntArrayRef);
using SopDistillSig = at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, int64_t,
                                 at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t);
using DistillTermsSig = std::vector<at::Tensor>(at::TensorList, at::TensorList, const OptTensorList&,
                                                const OptTensorList&, at::IntArrayRef, int64_t);
using MdStatsSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                              const at::Tensor&, double);

#define LSKD_OP_HANDLE(fn, Sig, name)                                                                 \
  inline const c10::TypedOperatorHandle<Sig>& fn() {                                                  \
    static const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>(); \
    return handle;                                                                                    \
  }
LSKD_OP_HANDLE(pod_forward_op, PodForwardSig, "lskd::pod_forward")
LSKD_OP_HANDLE(pod_backward_op, PodBackwardSig, "lskd::pod_backward")
LSKD_OP_HANDLE(pod_distill_op, PodDistillSig, "lskd::pod_distill")
LSKD_OP_HANDLE(sop_forward_op, SopForwardSig, "lskd::sop_forward")
LSKD_OP_HANDLE(sop_backward_op, SopBackwardSig, "lskd::sop_backward")
LSKD_OP_HANDLE(sop_distill_op, SopDistillSig, "lskd::sop_distill")
LSKD_OP_HANDLE(distill_terms_op, DistillTermsSig, "lskd::distill_terms")
LSKD_OP_HANDLE(md_stats_op, MdStatsSig, "lskd::md_stats")
#undef LSKD_OP_HANDLE

}  // namespace lskd
