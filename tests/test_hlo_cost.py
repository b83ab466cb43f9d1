"""``hlo_cost`` counts what a compiled program's kernels read and write, loops weighed by their trip counts."""

import os

import pytest

from qwen2_jax.tools import hlo_cost

# A weight [8, 64, 32] bf16 (32,768 bytes) and rows x [4, 64] bf16 (512 bytes). The entry copies the weight
# (a weight copy), then a loop of 3 trips multiplies x by one expert's slice [64, 32] (4,096 bytes) read in
# place by a dynamic-slice inside the matmul's fusion.
STATE = "(s32[], bf16[8,64,32]{2,1,0}, bf16[4,64]{1,0}, f32[4,32]{1,0})"
PROGRAM = f"""HloModule test

%fused_dot (p0: bf16[8,64,32], p1: s32[], p2: bf16[4,64]) -> f32[4,32] {{
  %p0 = bf16[8,64,32]{{2,1,0}} parameter(0)
  %p1 = s32[] parameter(1)
  %p2 = bf16[4,64]{{1,0}} parameter(2)
  %c = s32[] constant(0)
  %ds = bf16[1,64,32]{{2,1,0}} dynamic-slice(%p0, %p1, %c, %c), dynamic_slice_sizes={{1,64,32}}
  %bc = bf16[64,32]{{1,0}} bitcast(%ds)
  ROOT %dot = f32[4,32]{{1,0}} dot(%p2, %bc), lhs_contracting_dims={{1}}, rhs_contracting_dims={{0}}
}}

%body (state: {STATE}) -> {STATE} {{
  %state = {STATE} parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  %w = bf16[8,64,32]{{2,1,0}} get-tuple-element(%state), index=1
  %x = bf16[4,64]{{1,0}} get-tuple-element(%state), index=2
  %fusion.1 = f32[4,32]{{1,0}} fusion(%w, %i, %x), kind=kOutput, calls=%fused_dot
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = {STATE} tuple(%next, %w, %x, %fusion.1)
}}

%cond (state: {STATE}) -> pred[] {{
  %state = {STATE} parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  %n = s32[] constant({{N}})
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}}

ENTRY %main (w: bf16[8,64,32], x: bf16[4,64]) -> f32[4,32] {{
  %w = bf16[8,64,32]{{2,1,0}} parameter(0)
  %x = bf16[4,64]{{1,0}} parameter(1)
  %zero = s32[] constant(0)
  %fzero = f32[] constant(0)
  %init = f32[4,32]{{1,0}} broadcast(%fzero), dimensions={{}}
  %copy.1 = bf16[8,64,32]{{2,1,0}} copy(%w)
  %tuple = {STATE} tuple(%zero, %copy.1, %x, %init)
  %while = {STATE} while(%tuple), condition=%cond, body=%body{{ANNOTATION}}
  ROOT %out = f32[4,32]{{1,0}} get-tuple-element(%while), index=3
}}
"""


def program(trips=3, annotated=True):
    text = PROGRAM.replace("{N}", str(trips))
    return text.replace("{ANNOTATION}", f', backend_config={{"known_trip_count":{{"n":"{trips}"}}}}' if annotated else "")


# By hand: the broadcast reads a 4-byte scalar and writes 512; the copy reads and writes 32,768; each trip's
# fusion reads 4,096 (the slice) + 4 (the index) + 512 (x) and writes 512, and its counter add 8 + 4; the
# condition runs trips + 1 times, reading 8 and writing 1.
BY_HAND = 516 + 2 * 32768 + 3 * (5124 + 12) + 4 * 9


def test_bytes_of_a_program_equal_the_hand_computed_count():
    report = hlo_cost.analyze(program(), weight_params={0})
    assert report.bytes == BY_HAND
    assert report.weight_copy_bytes == 32768  # the copy; the fused slice is read in place
    assert report.count == 1 + 1 + 3 * 2 + 4 and report.unknown_trip_loops == 0
    assert report.flops == 3 * 2 * (4 * 32) * 64  # three [4, 64] x [64, 32] products


def test_a_loop_without_an_annotation_takes_its_trip_count_from_its_condition():
    assert hlo_cost.analyze(program(annotated=False), weight_params={0}).bytes == BY_HAND  # as XLA:TPU leaves it


def test_the_step_loop_counts_once_and_other_data_dependent_loops_count_their_bound():
    text = program(annotated=False).replace("constant(3)", "parameter(1)").replace(
        "%n = s32[] parameter(1)", "%n = s32[] get-tuple-element(%state), index=0")  # the bound is not a constant
    step = hlo_cost.analyze(text, step_loop=True)
    assert step.unknown_trip_loops == 0 and step.bytes == 516 + 2 * 32768 + (5124 + 12) + 2 * 9
    bounded = hlo_cost.analyze(text, loop_bound=5)
    assert bounded.unknown_trip_loops == 1 and bounded.bytes == 516 + 2 * 32768 + 5 * (5124 + 12) + 6 * 9


def test_arrays_in_a_tpu_cores_own_memory_are_not_hbm_bytes():
    assert hlo_cost.shape_bytes("bf16[8,128]{1,0:T(8,128)(2,1)}") == 2048
    assert hlo_cost.shape_bytes("bf16[8,128]{1,0:T(8,128)(2,1)S(1)}") == 0  # VMEM
    assert hlo_cost.shape_bytes("bf16[8,128]{1,0:T(8,128)(2,1)S(1)}", hbm_only=False) == 2048
    assert hlo_cost.shape_bytes("(f32[2,3], s8[10], pred[])") == 24 + 10 + 1


# XLA:TPU copies a row of a cache [4, 64, 32] bf16 (a row: 4,096 bytes) through VMEM: a slice into VMEM, then an
# update in place from VMEM, fused or not.
TPU_ROW_COPY = """HloModule row_copy

%fused_slice (p0: bf16[4,64,32], p1: s32[]) -> bf16[1,64,32] {
  %p0 = bf16[4,64,32]{2,1,0:T(8,128)(2,1)} parameter(0)
  %p1 = s32[] parameter(1)
  %c = s32[] constant(0)
  ROOT %ds = bf16[1,64,32]{2,1,0:T(8,128)(2,1)S(1)} dynamic-slice(%p0, %p1, %c, %c), dynamic_slice_sizes={1,64,32}
}

%fused_update (p0: bf16[4,64,32], p1: bf16[1,64,32], p2: s32[]) -> bf16[4,64,32] {
  %p0 = bf16[4,64,32]{2,1,0:T(8,128)(2,1)} parameter(0)
  %p1 = bf16[1,64,32]{2,1,0:T(8,128)(2,1)S(1)} parameter(1)
  %p2 = s32[] parameter(2)
  %c = s32[] constant(0)
  ROOT %dus = bf16[4,64,32]{2,1,0:T(8,128)(2,1)} dynamic-update-slice(%p0, %p1, %p2, %c, %c)
}

ENTRY %main (cache: bf16[4,64,32], source: s32[], slot: s32[]) -> bf16[4,64,32] {
  %cache = bf16[4,64,32]{2,1,0:T(8,128)(2,1)} parameter(0)
  %source = s32[] parameter(1)
  %slot = s32[] parameter(2)
  %c = s32[] constant(0)
  %row = bf16[1,64,32]{2,1,0:T(8,128)(2,1)S(1)} FUSED_SLICE
  ROOT %out = bf16[4,64,32]{2,1,0:T(8,128)(2,1)} FUSED_UPDATE
}
"""


@pytest.mark.parametrize("fused", [True, False])
def test_a_slice_into_vmem_reads_its_bytes_from_hbm_and_an_update_from_vmem_writes_them(fused):
    text = TPU_ROW_COPY.replace("FUSED_SLICE", "fusion(%cache, %source), kind=kLoop, calls=%fused_slice" if fused else
                                "dynamic-slice(%cache, %source, %c, %c), dynamic_slice_sizes={1,64,32}")
    text = text.replace("FUSED_UPDATE", "fusion(%cache, %row, %slot), kind=kLoop, calls=%fused_update" if fused else
                        "dynamic-update-slice(%cache, %row, %slot, %c, %c)")
    report = hlo_cost.analyze(text)
    row = 64 * 32 * 2
    # the row read from the cache and written back into it; the VMEM copy between is not HBM; 4-byte indices
    assert [(k.read, k.written) for k in report.kernels] == [(row + 4 * fused, 0), (4 * fused, row)]


def test_collective_groups_in_every_form_xla_prints():
    assert hlo_cost._group_size("replica_groups={{0,1,2,3},{4,5,6,7}}") == 4
    assert hlo_cost._group_size("replica_groups=[2,4]<=[8]") == 4
    assert hlo_cost._group_size("replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], "
                                "device_ids=([2,4]T(1,0)) {'axis_0','axis_2'}") == 8


@pytest.mark.skipif(not os.path.isdir(os.path.join(os.path.dirname(hlo_cost.__file__), "targets")),
                    reason="no GPU target configs")
def test_a_matmul_compiled_for_an_h200_reads_its_operands_and_writes_its_result_once():
    import jax
    import jax.numpy as jnp

    from qwen2_jax.tools import aot

    device = aot.devices(aot.TARGETS["h200"])[0]
    s = jax.sharding.SingleDeviceSharding(device)
    w = jax.ShapeDtypeStruct((512, 256), jnp.bfloat16, sharding=s)  # [out, in]
    x = jax.ShapeDtypeStruct((4, 256), jnp.bfloat16, sharding=s)
    text = jax.jit(lambda w, x: jnp.einsum("ti,oi->to", x, w)).lower(w, x).compile().as_text()
    report = hlo_cost.analyze(text, weight_params={0})
    assert report.bytes == 512 * 256 * 2 + 4 * 256 * 2 + 4 * 512 * 2 and report.weight_copy_bytes == 0
    assert report.flops == 2 * 4 * 512 * 256


def attend_blocks(x, n):  # a loop whose trip count is data: the caller knows its bound by the function
    import jax
    import jax.numpy as jnp

    return jax.lax.fori_loop(0, n, lambda i, acc: acc + jnp.sin(acc), x)


def test_a_data_dependent_loop_is_bounded_by_the_python_function_that_made_it():
    import jax
    import jax.numpy as jnp

    text = jax.jit(attend_blocks).lower(jnp.zeros(1024), jnp.int32(3)).compile().as_text()
    seen = []
    bound = lambda functions: seen.append(functions) or (7 if "attend_blocks" in functions else 1)
    once, bounded = hlo_cost.analyze(text), hlo_cost.analyze(text, loop_bound=bound)
    assert seen and "attend_blocks" in seen[0] and bounded.unknown_trip_loops == 1
    # the body's kernels run 7 times instead of once; the condition's 8 instead of 2
    assert {k.runs for k in bounded.kernels} - {1.0} == {7.0, 8.0} and {k.runs for k in once.kernels} == {1.0, 2.0}


def test_a_convolution_cut_by_negative_padding_reads_only_the_rows_its_window_reaches():
    """XLA:TPU writes the engine's decode over its first 16 of 64 slots as this convolution (lhs dilated by 16,
    768 positions cut off the end): out[s] = x[s] @ w[s] for s < 16, so it reads a quarter of x."""
    text = """HloModule conv

%fused_conv (p0: bf16[64,128,256], p1: bf16[16,7,256]) -> bf16[16,128,7] {
  %p0 = bf16[64,128,256]{2,1,0} parameter(0)
  %p1 = bf16[16,7,256]{2,1,0} parameter(1)
  ROOT %conv = bf16[16,128,7]{2,1,0} convolution(%p0, %p1), window={size=16 stride=15 pad=0_-768 lhs_dilate=16}, dim_labels=0bf_0oi->0bf
}

ENTRY %main (x: bf16[64,128,256], w: bf16[16,7,256]) -> bf16[16,128,7] {
  %x = bf16[64,128,256]{2,1,0} parameter(0)
  %w = bf16[16,7,256]{2,1,0} parameter(1)
  ROOT %fusion = bf16[16,128,7]{2,1,0} fusion(%x, %w), kind=kOutput, calls=%fused_conv
}
"""
    (kernel,) = hlo_cost.analyze(text).kernels
    assert kernel.read == 16 * 128 * 256 * 2 + 16 * 7 * 256 * 2
    assert kernel.written == 16 * 128 * 7 * 2
    uncut = text.replace(" pad=0_-768", "").replace("bf16[16,128,7]", "bf16[64,128,7]")
    (kernel,) = hlo_cost.analyze(uncut).kernels
    assert kernel.read == 64 * 128 * 256 * 2 + 16 * 7 * 256 * 2
