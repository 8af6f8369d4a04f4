"""benchmarks/profile_step.py: the kernel-name categories, and a CPU run whose split adds up."""

import json

import pytest

from tests.conftest import load_benchmark

profile_step = load_benchmark("profile_step")


@pytest.mark.parametrize("name,expected", [
    # kernel names as CUDA profiles of torch 2.x on Hopper show them
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_kernel__5x_cublas",
     "matmul"),
    ("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NNT", "matmul"),
    ("triton_tem_fused_addmm_3", "matmul"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4, false, false, "
     "cutlass::bfloat16_t>, false, false>(Flash_fwd_params)", "attention"),
    ("fmha_cutlassB_bf16_aligned_64x64_k64_sm80", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x64_4x1x1_kernel0_0", "attention"),
    ("triton_red_fused__to_copy_native_layer_norm_0", "pointwise"),
    ("triton_poi_fused__scaled_dot_product_flash_attention_transpose_4", "pointwise"),  # layout work, not attention
    ("cpp_fused__scaled_dot_product_flash_attention_for_cpu_clone_2", "pointwise"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "pointwise"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>",
     "optimizer"),
    ("Memcpy HtoD (Pageable -> Device)", "copy"),
    ("aten::mm", "matmul"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
    ("aten::copy_", "copy"),
    ("aten::native_layer_norm_backward", "pointwise"),
    ("some_new_kernel", "other"),
])
def test_kernels_are_sorted_into_categories(name, expected):
    assert profile_step.category(name) == expected


def test_cpu_profile_adds_up(tmp_path):
    out = tmp_path / "profile.json"
    report = profile_step.main(["--batch-size", "8", "--warmup", "1", "--steps", "2", "--top", "5",
                                "--device", "cpu", "--threads", "1", "--json", str(out)])
    assert json.loads(out.read_text())["config"]["batch"] == 8
    split = report["ms_per_step_by_category"]
    assert set(split) == set(profile_step.CATEGORIES)
    assert split["matmul"] > 0 and split["attention"] > 0  # a ViT's linear layers and SDPA
    assert sum(split.values()) == pytest.approx(report["busy_ms_per_step"])
    assert 0 < report["busy_ms_per_step"] <= 1.5 * report["wall_ms_per_step"]
    top = [row["ms_per_step"] for row in report["top"]]
    assert len(top) == 5 and top == sorted(top, reverse=True)


def test_gpu_breakdown_counts_kernels_not_the_annotations_spanning_them():
    """On CUDA the optimizer's step is a user annotation with device time of its own, spanning
    the fused AdamW kernels; counting both doubled the optimizer's share (the first H200 run)."""
    from types import SimpleNamespace

    import torch
    from torch.autograd import DeviceType

    def row(key, us, device_type=DeviceType.CUDA, annotation=False):
        return SimpleNamespace(key=key, self_device_time_total=us, count=2, device_type=device_type,
                               is_user_annotation=annotation)

    prof = SimpleNamespace(key_averages=lambda: [
        row("Optimizer.step#AdamW.step", 935.0, annotation=True),
        row("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>", 912.0),
        row("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", 3000.0),
        row("aten::mm", 3000.0, device_type=DeviceType.CPU),  # its device time is the kernel's above
    ])
    split, rows = profile_step.breakdown(prof, torch.device("cuda"), steps=2)
    assert split["optimizer"] == pytest.approx(0.456) and split["matmul"] == pytest.approx(1.5)
    assert [r[0] for r in rows] == ["nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT",
                                    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel"
                                    "<FusedAdamMathFunctor<float, 4>>"]
