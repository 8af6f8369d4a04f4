"""benchmarks/attention.py: the step's attention calls as the model makes them, the FLOP count,
exact head padding, a CPU run."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mae.models import build_mae
from tests.conftest import load_benchmark

attention = load_benchmark("attention")


def test_stages_are_the_vit_b_steps_attention_calls():
    got = {s["stage"]: (s["queries"], s["keys"], s["heads"], s["head_dim"], s["calls"])
           for s in attention.stages("mae_vit_base_patch16", 224, 0.75)}
    # 49 visible patches + cls; 196 patches + cls in the decoder, whose last block asks the 147 masked ones
    assert got == {"encoder": (50, 50, 12, 64, 12), "decoder": (197, 197, 16, 32, 7),
                   "decoder-last": (147, 197, 16, 32, 1)}


def test_the_benchmarks_calls_are_the_models_in_shape_and_layout(monkeypatch):
    """Every scaled_dot_product_attention call of the model's training forward (loss-only, as
    the engine runs it), in order, against the benchmark's stages: shapes and strides of q, k, v."""
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append(tuple((t.shape, t.stride()) for t in (q, k, v)))
        return real(q, k, v, *args, **kwargs)

    model = build_mae("mae_vit_micro_patch4")
    imgs, noise = torch.randn(2, 1, 28, 28), torch.rand(2, model.num_patches)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model(imgs, 0.75, noise, loss_only=True)
    monkeypatch.undo()
    expected = []
    for s in attention.stages("mae_vit_micro_patch4", None, 0.75):
        leaves, views, grad = attention.inputs(2, s, torch.float32, torch.device("cpu"), torch.Generator())
        q, k, v = views(*leaves)
        assert grad.shape == q.shape
        expected += [tuple((t.shape, t.stride()) for t in (q, k, v))] * s["calls"]
    assert seen == expected


def test_useful_flops_is_what_the_flop_counter_counts_for_math_attention():
    s = dict(queries=7, keys=11, heads=3, head_dim=8, calls=1)
    leaves, views, grad = attention.inputs(2, s, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(0))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = F.scaled_dot_product_attention(*views(*leaves))
        torch.autograd.grad(out, leaves, grad)
    assert counter.get_total_flops() == attention.useful_flops(2, s)


@pytest.mark.parametrize("kernel", ["math+pad64", "flash+pad64"])
def test_padding_heads_to_64_dims_leaves_output_and_gradients_unchanged(kernel):
    s = dict(queries=9, keys=13, heads=2, head_dim=24, calls=1)
    leaves, views, grad = attention.inputs(3, s, torch.float64, torch.device("cpu"), torch.Generator().manual_seed(1))
    with sdpa_kernel(SDPBackend.MATH):
        plain = attention.forward_backward(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), leaves, views,
                                           grad)
    seen = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append(q.shape[-1])
        return real_sdpa(q, k, v, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention.F, "scaled_dot_product_attention", spy)
        padded = attention.forward_backward(attention.attention_fn(kernel), leaves, views, grad)
    assert seen == [64]  # the kernel ran on padded heads
    assert [t.shape for t in padded] == [t.shape for t in plain]
    assert attention.relative_error(padded, plain) < 1e-12


def test_cpu_run_times_what_runs_and_names_what_cannot(tmp_path):
    out = tmp_path / "attention.json"
    report = attention.main(["--batch-size", "4", "--kernels", "auto,math,cudnn", "--steps", "2",
                             "--warmup", "1", "--device", "cpu", "--threads", "1", "--json", str(out)])
    assert json.loads(out.read_text())["summary"] == report["summary"]
    assert [s["stage"] for s in report["stages"]] == ["encoder", "decoder", "decoder-last"]
    for st in report["stages"]:
        assert "No viable backend" in st["results"]["cudnn"]["error"]  # CUDA-only, said so; the run goes on
        for k in ("auto", "math"):
            r = st["results"][k]
            assert r["ms_per_step"] == pytest.approx(r["ms_per_call"] * st["calls"])
            assert 0 < r["ms_per_call"] and 0 < r["wall_ms_per_call"]
            assert r["rel_error"] < 1e-5  # float32 against float32 math
    s = report["summary"]
    fastest = [min(("auto", "math"), key=lambda k: st["results"][k]["ms_per_step"]) for st in report["stages"]]
    assert list(s["best"].values()) == fastest
    assert s["ms_per_step_best"] == pytest.approx(sum(st["results"][k]["ms_per_step"]
                                                      for st, k in zip(report["stages"], fastest)))
    assert s["ms_per_step_auto"] == pytest.approx(sum(st["results"]["auto"]["ms_per_step"] for st in report["stages"]))


def test_a_stage_where_no_kernel_runs_gives_no_summary():
    report = attention.main(["--batch-size", "2", "--kernels", "cudnn,efficient", "--steps", "1", "--warmup", "0",
                             "--device", "cpu", "--threads", "1"])
    assert report["summary"] == {} and all("error" in r for st in report["stages"] for r in st["results"].values())


def test_heads_already_a_multiple_of_64_are_not_timed_twice():
    report = attention.main(["--model", "mae_vit_base_patch16", "--batch-size", "1", "--kernels", "math,math+pad64",
                             "--steps", "1", "--warmup", "0", "--device", "cpu", "--threads", "1"])
    kernels = {s["stage"]: set(s["results"]) for s in report["stages"]}
    assert kernels == {"encoder": {"math"}, "decoder": {"math", "math+pad64"}, "decoder-last": {"math", "math+pad64"}}
