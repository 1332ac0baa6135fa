"""The tests pod_distill and sop_distill share (as torchvision's ``RoIOpTester``).

:class:`DistillOpTester` holds the sweeps over backends, dtypes, layouts, mask kinds and
reductions, written once; a subclass per op (``TestPodDistill``, ``TestSopDistill``) supplies its
op with its float64 oracle (:class:`helpers.OpSpec`), the op's parameters for each sweep, and
the expected outputs of its raw forward op (:meth:`DistillOpTester.raw_op_grad`). Tests of one
op's own parameters (POD scales, SOP groups and pooling geometry) stay in that op's module.

Op parameters reach the sweeps in two ways: a plain class attribute read by the test body
(e.g. :attr:`mask_params`), or, where each value is its own test case, ``variants[test name]``
(``{id: value}``, parametrized as ``variant`` by :meth:`pytest_generate_tests`) or the name of a
class attribute given to the ``backend_params`` marker (joint with the backend, with a smaller
list for Triton; resolved by conftest.py).
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, List, Sequence, Tuple

import pytest
import torch
from helpers import (
    DTYPES,
    DTYPES_TRITON,
    F64,
    LAYOUTS,
    MASK_COMBOS,
    MASK_COMBOS_TRITON,
    REDUCTIONS,
    TOLERANCES,
    OpSpec,
    acc_dtype,
    channel_mask,
    check_against_reference,
    check_all_masked_image,
    check_deterministic,
    check_module,
    check_nan_propagates,
    check_no_grad_to_teacher_and_masks,
    check_zero_distance,
    dtype_id,
    features,
    random_case,
    raw_ops,
    small_shape,
    spatial_mask,
)

Params = Dict[str, Any]
#: (shape, op parameters, dtype) of an edge-shape case.
EdgeCase = Tuple[Tuple[int, int, int, int], Params, torch.dtype]


class DistillOpTester:
    """Shared tests of a distillation op ``(student, teacher, spatial, channel, ..., reduction, backend)``.

    Subclasses set every attribute below (the values used by pod_distill and sop_distill are in
    tests/test_pod_distill.py and tests/test_sop_distill.py) and implement :meth:`raw_op_grad`.
    """

    #: The op (lskd.pod_distill / lskd.sop_distill) with its float64 oracle (lskd.reference).
    op: ClassVar[OpSpec]
    #: Its lskd.nn module, and the module's keyword arguments to compare with the function.
    module_cls: ClassVar[type]
    module_variants: ClassVar[Sequence[Params]]
    module_variants_triton: ClassVar[Sequence[Params]]
    #: Op parameters of the mask-kind sweep, of the layout sweep (each layout runs every entry).
    mask_params: ClassVar[Params]
    layout_params: ClassVar[Sequence[Params]]
    #: Parameter sets that must give d = 0 and gradient 0 at student == teacher.
    zero_distance_variants: ClassVar[Sequence[Params]]
    all_masked_params: ClassVar[Params]
    nan_params: ClassVar[Sequence[Params]]
    deterministic_params: ClassVar[Sequence[Params]]
    no_grad_params: ClassVar[Params]
    #: Edge shapes, jointly with the backend (``backend_params``): all, and the Triton subset.
    edge_params: ClassVar[List[EdgeCase]]
    edge_params_triton: ClassVar[List[EdgeCase]]
    #: ``{test name: {id: value}}``: the values of ``variant`` (one test case each).
    variants: ClassVar[Dict[str, Dict[str, Any]]]

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """Parametrizes ``variant`` with the op's ``variants[test name]``."""
        if "variant" in metafunc.fixturenames:
            values = self.variants[metafunc.function.__name__]
            metafunc.parametrize("variant", list(values.values()), ids=list(values))

    # -- hooks of the op ------------------------------------------------------------------
    def edge_calls(self, params: Params) -> Tuple[Params, Params]:
        """Parameters of an edge case's two calls: masked with reduction "none", unmasked "sum"."""
        return params, params

    def raw_op_grad(self, ops, s: torch.Tensor, t: torch.Tensor, m: torch.Tensor, k: torch.Tensor, variant, tol: float):
        """Run the op's raw forward on ``s, t [N, C, H, W]`` with masks ``m [N, H, W]``, ``k [N, C]``
        (acc dtype), check its outputs against the schema's definition (relative ``tol``), run the
        raw backward with grad_dist = 1 and return the student gradient."""
        raise NotImplementedError

    # -- the sweeps -------------------------------------------------------------------------
    @pytest.mark.cases(default=6, triton=2)
    @pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
    def test_random_cases_match_reference(self, backend, case, dtype, rng):
        student, teacher, sm, cm, reduction, params = random_case(self.op, rng, backend, dtype)
        check_against_reference(self.op, backend, student, teacher, sm, cm, reduction, **params)

    @pytest.mark.backend_params("sk,ck", MASK_COMBOS, triton=MASK_COMBOS_TRITON)
    def test_mask_kinds(self, backend, sk, ck):
        n, c, h, w = small_shape(backend)
        dtype = torch.float32
        s, t = features((n, c, h, w), dtype), features((n, c, h, w), dtype)
        sm, cm = spatial_mask(sk, n, h, w, dtype), channel_mask(ck, n, c, dtype)
        out, grad = check_against_reference(self.op, backend, s, t, sm, cm, "none", **self.mask_params)
        if "zeros" in (sk, ck):
            assert torch.equal(out, torch.zeros_like(out)) and torch.equal(grad, torch.zeros_like(grad))

    @pytest.mark.parametrize("layout", LAYOUTS)
    @pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=dtype_id)
    def test_layouts(self, backend, layout, dtype):
        """Student and teacher in two different layouts."""
        shape = small_shape(backend)
        n, c, h, w = shape
        other = LAYOUTS[(LAYOUTS.index(layout) + 1) % len(LAYOUTS)]
        s, t = features(shape, dtype, layout=layout), features(shape, dtype, layout=other)
        sm, cm = spatial_mask("float", n, h, w, dtype), channel_mask("bool", n, c, dtype)
        for params in self.layout_params:
            check_against_reference(self.op, backend, s, t, sm, cm, "none", **params)

    @pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
    def test_both_channels_last(self, backend, dtype):
        """Student and teacher both channels-last, as in a training step (the CPU kernels have a
        channel-vectorised path for it on maps up to 32x32); channel counts below, at and past one
        block of 16, and a map past 32x32."""
        shapes = [small_shape(backend)]
        if backend != "triton":
            shapes += [(2, 16, 8, 8), (3, 37, 6, 9), (1, 20, 40, 33)]
        for n, c, h, w in shapes:
            s = features((n, c, h, w), dtype, layout="channels_last")
            t = features((n, c, h, w), dtype, layout="channels_last")
            sm, cm = spatial_mask("float", n, h, w, dtype), channel_mask("bool", n, c, dtype)
            for params in self.layout_params:
                check_against_reference(self.op, backend, s, t, sm, cm, "none", **params)
                check_against_reference(self.op, backend, s, t, None, None, "sum", **params)

    @pytest.mark.parametrize("reduction", REDUCTIONS)
    def test_reductions(self, backend, reduction, variant):
        shape = small_shape(backend)
        s, t = features(shape, F64), features(shape, F64)
        check_against_reference(self.op, backend, s, t, None, None, reduction, **variant)

    @pytest.mark.backend_params("shape,params,dtype", "edge_params", triton="edge_params_triton")
    def test_edge_shapes(self, backend, shape, params, dtype):
        n, c, h, w = shape
        s, t = features(shape, dtype), features(shape, dtype)
        sm = spatial_mask("float", n, h, w, dtype)
        masked, summed = self.edge_calls(params)
        check_against_reference(self.op, backend, s, t, sm, None, "none", **masked)
        check_against_reference(self.op, backend, s, t, None, None, "sum", **summed)

    @pytest.mark.backend_params("dtype", DTYPES, triton=DTYPES_TRITON)
    def test_zero_distance_has_zero_gradient(self, backend, dtype):
        check_zero_distance(self.op, backend, dtype, small_shape(backend), self.zero_distance_variants)

    def test_all_masked_image_has_zero_distance_and_gradient(self, backend):
        check_all_masked_image(self.op, backend, small_shape(backend), **self.all_masked_params)

    @pytest.mark.backend_params("dtype", (torch.float32, F64, torch.bfloat16), triton=(torch.bfloat16,))
    def test_nan_in_student_gives_nan(self, backend, dtype):
        for params in self.nan_params:
            check_nan_propagates(self.op, backend, dtype, small_shape(backend), **params)

    @pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=dtype_id)
    def test_deterministic(self, backend, dtype):
        for params in self.deterministic_params:
            check_deterministic(self.op, backend, dtype, small_shape(backend), **params)

    def test_teacher_and_masks_get_no_gradient(self, backend):
        check_no_grad_to_teacher_and_masks(self.op, backend, small_shape(backend), **self.no_grad_params)

    def test_module_matches_function(self, backend):
        variants = self.module_variants_triton if backend == "triton" else self.module_variants
        check_module(self.op, self.module_cls, backend, small_shape(backend), variants)

    @pytest.mark.parametrize("layout", ("contiguous", "channels_last", "strided"))
    @pytest.mark.parametrize("dtype", (torch.float32, F64, torch.bfloat16), ids=dtype_id)
    def test_raw_op_contract(self, compiled_backend, layout, dtype, variant):
        """The raw forward's outputs are in the acc dtype, as the schema defines them
        (:meth:`raw_op_grad`); the raw backward's gradient has the dtype and strides of
        ``empty_like(student)``."""
        shape = small_shape(compiled_backend)
        n, c, h, w = shape
        acc = acc_dtype(dtype)
        s, t = features(shape, dtype, layout=layout), features(shape, dtype, layout=layout)
        m, k = torch.rand(n, h, w, dtype=acc), (torch.rand(n, c) < 0.7).to(acc)
        g = self.raw_op_grad(raw_ops(compiled_backend), s, t, m, k, variant, TOLERANCES[dtype].dist)
        assert g.dtype == dtype and g.shape == s.shape
        if layout != "strided":
            assert g.stride() == torch.empty_like(s).stride(), (g.stride(), s.stride())
