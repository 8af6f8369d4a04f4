"""GPU checks: skipped on machines without CUDA (CI has none); run them on a GPU box.

They need no dataset (GPU machines here have no Fashion-MNIST): images are smooth random
patterns, which the model can learn. `bash benchmarks/gpu_check.sh tests` runs this file.
"""

import contextlib
import math

import pytest
import torch

from mae.config import load_config
from mae.engine import TrainStep, build_model, build_optimizer, pretrain
from mae.models import build_mae
from tests.conftest import REPO, attention_dtypes, load_benchmark

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SMOKE = REPO / "experiments" / "smoke.yaml"


def _patterns(g: torch.Generator, n: int, size: int = 28) -> torch.Tensor:
    """(n, 1, size, size) smooth images on the GPU: a random 4 x 4 grid, upsampled."""
    grid = torch.rand(n, 1, 4, 4, generator=g, device="cuda")
    return torch.nn.functional.interpolate(grid, size=size, mode="bilinear") * 2 - 1


def _curve(*overrides: str, steps: int = 60) -> torch.Tensor:
    """The loss curve from seed-0 weights on the same 64-image batches and masks."""
    cfg = load_config(SMOKE, ["train.device=cuda", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg).cuda()
    step = TrainStep(model, build_optimizer(model, cfg, 1e-3), cfg, torch.device("cuda"))
    g = torch.Generator(device="cuda").manual_seed(1)
    masks = torch.Generator(device="cuda").manual_seed(2)
    losses = []
    for _ in range(steps):
        imgs = _patterns(g, 64)
        noise = torch.rand(64, model.num_patches, generator=masks, device="cuda")
        losses.append(step(imgs, noise))
    return torch.stack(losses).float().cpu()


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_bf16_step_tracks_float32_eager(mode):
    """The engine's CUDA path (bf16 autocast, compiled, CUDA graphs with reduce-overhead)
    follows the float32 eager loss curve from the same weights, batches and masks, within
    noise: no further than the eager bf16 step goes from it, and no steady bias beyond what
    that run shows (benchmarks/throughput.py's compare_curves)."""
    reference = _curve("train.precision=fp32", "train.compile=false")
    eager = _curve("train.compile=false")
    fast = _curve("train.compile=true", f"train.compile_mode={mode}")
    assert reference[-10:].mean() < 0.8 * reference[:5].mean()  # it learns
    assert torch.isfinite(fast).all()
    verdict = load_benchmark("throughput").compare_curves(fast, reference, eager)  # the benchmark's own yardstick
    assert verdict["within_noise"], {k: v for k, v in verdict.items() if "rel_diff" in k or "limit" in k}


@pytest.mark.parametrize("compile_model", [False, True])
def test_pretrain_on_gpu_bf16(tmp_path, compile_model):
    cfg = load_config(SMOKE, [
        "data.dataset=synthetic", "data.synthetic_size=512", "train.batch_size=64", "train.epochs=2",
        "train.device=cuda", f"train.compile={str(compile_model).lower()}",
    ])
    # (eager only: a hook inside a compiled graph sees tracing, not the run)
    with contextlib.nullcontext(set()) if compile_model else attention_dtypes() as dtypes:
        result = pretrain(cfg, tmp_path)
    if not compile_model:
        assert dtypes == {torch.bfloat16}  # train.precision auto: bf16 autocast on CUDA
    assert all(math.isfinite(e["train_loss"]) for e in result.epochs)
    assert result.checkpoint_dir is not None and result.images_per_sec > 0


def test_bf16_loss_close_to_float32():
    torch.manual_seed(0)
    model = build_mae("mae_vit_base_patch16").cuda()
    imgs = torch.randn(8, 3, 224, 224, device="cuda")
    noise = torch.rand(8, 196, device="cuda")
    with torch.no_grad():
        fp32 = model(imgs, 0.75, noise)[0]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model(imgs, 0.75, noise, loss_only=True)[0]
    assert abs(bf16.item() - fp32.item()) / fp32.item() < 2e-2


def test_benchmark_peak_memory_is_each_variants_own():
    # Both "models" sit on the GPU at once; each step allocates 64 MiB for a moment and
    # keeps 32 MiB (an optimizer state). Each variant's peak is its 256 MiB of weights plus
    # its own 64 MiB, whichever runs first: not the device's peak, which holds both models.
    bench = load_benchmark("throughput")
    mib = 2**20 // 4  # float32 elements in a MiB
    models = {name: torch.nn.Linear(256 * mib, 1, bias=False).cuda() for name in ("a", "b")}
    kept = []

    def step():
        torch.empty(64 * mib, device="cuda").fill_(1.0)
        if len(kept) < 2:
            kept.append(torch.zeros(32 * mib, device="cuda"))

    _, _, peak = bench.time_in_turns({"a": step, "b": step}, warmup=1, n=1, device=torch.device("cuda"),
                                     label="test", models=models)
    assert peak["a"] == pytest.approx((256 + 64) / 1024, abs=0.01)
    assert peak["b"] == pytest.approx((256 + 64) / 1024, abs=0.01)


def test_each_step_replayed_as_a_cuda_graph_draws_a_fresh_mask():
    """Training passes no noise: the compiled step draws each mask inside its graph, and a CUDA
    graph replay must draw anew rather than repeat the recorded mask. Same weights (lr 0) and
    images: with a fixed mask the replays give one loss, with drawn masks each its own. (Each
    step updates, as training's do under CUDA graphs: without the update, gradients would
    accumulate into memory the next replay overwrites, which torch refuses; the engine never
    replays graphs with accumulation: the config refuses accum_iter > 1 with them.)"""
    cfg = load_config(SMOKE, ["train.device=cuda", "train.compile=true", "train.compile_mode=reduce-overhead"])
    torch.manual_seed(0)
    model = build_model(cfg).cuda()
    step = TrainStep(model, build_optimizer(model, cfg, 0.0), cfg, torch.device("cuda"))
    imgs = _patterns(torch.Generator(device="cuda").manual_seed(1), 64)
    fixed = torch.rand(64, model.num_patches, device="cuda")
    same = torch.stack([step(imgs, fixed) for _ in range(5)])[2:].float().cpu()  # after warm-up
    drawn = torch.stack([step(imgs, None) for _ in range(5)])[2:].float().cpu()
    assert torch.allclose(same, same[0].expand(3), rtol=1e-5), same
    assert len(set(drawn.tolist())) == 3, drawn


def test_attention_benchmark_times_gpu_work_without_launch_overhead():
    """benchmarks/attention.py on the GPU: the sleep-then-events time of a call is GPU work with
    the host's launches hidden, so it is no longer than the wall time of calls queued back to
    back (the micro model's calls are tiny: launch-bound), and bf16 stays close to float32."""
    report = load_benchmark("attention").main(["--batch-size", "64", "--kernels", "auto,math,math+pad64",
                                               "--steps", "3", "--device", "cuda"])
    for st in report["stages"]:
        for kernel, r in st["results"].items():
            assert "error" not in r, (st["stage"], kernel, r)
            assert 0 < r["ms_per_call"] <= 1.1 * r["wall_ms_per_call"], (st["stage"], kernel, r)
            assert r["rel_error"] < 3e-2, (st["stage"], kernel, r)  # bf16's 8 bits, through softmax and back
    assert report["summary"]["best"]
