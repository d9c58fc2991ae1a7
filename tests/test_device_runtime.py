"""The precision runtime with a device executor (the grouped executor's launches: through
the CUDA driver on a GPU; here the kernels' contract in torch over the same pointers —
`torch_launch` — and once the kernel source itself on the CPU emulation): `dynaexq.load(
..., launch=)` builds the runtime `device="cuda"` builds, with the pool on the host. It
must give what the CPU executor gives on the same tiers — logits, greedy tokens, the
controller's moves and the telemetry — while keeping its routing and served counts on
the device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dynaexq import load
from dynaexq.runtime.executors.cpu import CpuExecutor
from dynaexq.runtime.executors.grouped import GroupedExecutor
from dynaexq.runtime.policy import default_policy


def float_cpu_executor(engine) -> None:
    """Exact float inputs on the CPU executor (the kernels take float activations)."""
    rt = engine.precision
    rt.executor = CpuExecutor(rt.table, rt.store, rt.real, activations="float")


def windows(n: int, length: int, seed: int = 0) -> list[torch.Tensor]:
    from dynaexq.runtime.load import default_calibration

    text = np.concatenate(default_calibration(None, tokens=4096))
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(text) - length, size=n)
    return [torch.from_numpy(text[s : s + length][None]) for s in starts]


def test_grouped_runtime_equals_the_cpu_runtime_at_fixed_tiers(torch_launch) -> None:
    grouped = load(budget="20%", policy="static-map", launch=torch_launch, progress=False)
    cpu = load(budget="20%", policy="static-map", progress=False)
    float_cpu_executor(cpu)
    assert isinstance(grouped.precision.executor, GroupedExecutor)
    assert (grouped.precision.tier_map() == cpu.precision.tier_map()).all()
    assert len(set(grouped.precision.tier_map().ravel().tolist())) > 1  # mixed tiers
    for ids in windows(2, 24):
        torch.testing.assert_close(grouped.forward(ids), cpu.forward(ids), rtol=1e-4, atol=1e-4)
    prompts = [[int(t) for t in w[0]] for w in (windows(1, 12, seed=3) + windows(1, 7, seed=4))]
    a = grouped.generate(prompts, max_new_tokens=8, ignore_eos=True)
    b = cpu.generate(prompts, max_new_tokens=8, ignore_eos=True)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    for rt in (grouped.precision, cpu.precision):
        rt.flush()
    g, c = grouped.precision.telemetry.records, cpu.precision.telemetry.records
    assert len(g) == len(c) > 0
    for rg, rc in zip(g, c, strict=True):
        assert rg.hi_share == pytest.approx(rc.hi_share)
        assert rg.mass_hi_share == pytest.approx(rc.mass_hi_share, rel=1e-5)


def test_grouped_runtime_prefills_through_dense_experts(torch_launch) -> None:
    """A long prompt takes the prefill path (dequantized workspace, dense matmuls)."""
    from dynaexq.runtime.executors.grouped import DENSE_FROM

    grouped = load(budget="20%", policy="static-map", launch=torch_launch, progress=False)
    cpu = load(budget="20%", policy="static-map", progress=False)
    float_cpu_executor(cpu)
    ids = windows(1, DENSE_FROM + 30, seed=9)[0]
    torch.testing.assert_close(grouped.forward(ids), cpu.forward(ids), rtol=1e-4, atol=1e-4)


def test_grouped_runtime_moves_experts_like_the_cpu_runtime(torch_launch) -> None:
    """Dynamic under lockstep: the routed mass summed on the device feeds the same
    controller, so the same transitions land at the same steps and the logits agree."""
    from dataclasses import replace

    pol = default_policy("dynamic")
    # A cold start (no calibration) on a controller that moves for any gain.
    pol = replace(
        pol, controller=replace(pol.controller, step_tokens=16, move_gain=0.0, move_z=0.0)
    )
    cold = np.zeros((6, 64), dtype=np.float32)
    kw = dict(budget="20%", policy=pol, calibration=cold, progress=False)
    grouped = load(launch=torch_launch, **kw)
    cpu = load(**kw)
    float_cpu_executor(cpu)
    maps = []
    for ids in windows(10, 32, seed=1):
        torch.testing.assert_close(grouped.forward(ids), cpu.forward(ids), rtol=1e-4, atol=1e-4)
        maps.append((grouped.precision.tier_map(), cpu.precision.tier_map()))
    for rt in (grouped.precision, cpu.precision):
        rt.flush()
    moved = sum(int(r.started) for r in cpu.precision.telemetry.records)
    assert moved > 0, "the workload must make the controller move experts"
    for g, c in maps:
        assert (g == c).all()
    g, c = grouped.precision.telemetry.records, cpu.precision.telemetry.records
    assert [r.started for r in g] == [r.started for r in c]
    assert [r.finished for r in g] == [r.finished for r in c]
    for rg, rc in zip(g, c, strict=True):
        assert rg.mass_hi_share == pytest.approx(rc.mass_hi_share, rel=1e-5)


def test_the_runtime_runs_the_kernel_source(emu_launch) -> None:
    """One short step through the emulated kernels themselves (slow: a thread per CUDA
    thread), mixed tiers, against the CPU executor."""
    grouped = load(budget="20%", policy="static-map", launch=emu_launch, progress=False)
    cpu = load(budget="20%", policy="static-map", progress=False)
    float_cpu_executor(cpu)
    ids = windows(1, 3, seed=5)[0]
    torch.testing.assert_close(grouped.forward(ids), cpu.forward(ids), rtol=1e-4, atol=1e-4)


# -- on a GPU -------------------------------------------------------------------------------
def needs_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.mark.gpu
def test_the_gpu_runtime_matches_the_cpu_runtime() -> None:
    """Device pool, CUDA transfer engine's upload, grouped kernels through NVRTC: float32
    logits and greedy tokens of the CPU runtime at the same tiers; bf16 within bf16's
    tolerance; every byte the runtime allocates on the device within the budget."""
    needs_cuda()
    torch.cuda.reset_peak_memory_stats()
    gpu = load(budget="20%", policy="static-map", device="cuda", dtype="float32", progress=False)
    cpu = load(budget="20%", policy="static-map", progress=False)
    float_cpu_executor(cpu)
    rt = gpu.precision
    assert rt.pool.arena_kind == "device"
    assert (rt.tier_map() == cpu.precision.tier_map()).all()
    for ids in windows(3, 32, seed=2):
        got = gpu.forward(ids.cuda()).cpu()
        torch.testing.assert_close(got, cpu.forward(ids), rtol=1e-3, atol=1e-3)
    prompts = [[int(t) for t in w[0]] for w in windows(2, 9, seed=6)]
    a = gpu.generate(prompts, max_new_tokens=12, ignore_eos=True)
    b = cpu.generate(prompts, max_new_tokens=12, ignore_eos=True)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    pool = rt.pool.host_from  # the device part (staging in host memory is outside it)
    budget = gpu.deployment.plan.budget
    peak = torch.cuda.max_memory_allocated()
    print(f"budget {budget} B, pool {pool} B, torch peak {peak} B")
    assert pool + peak <= budget
    bf16 = load(budget="20%", policy="static-map", device="cuda", progress=False)
    assert bf16.dtype == torch.bfloat16
    for ids in windows(2, 32, seed=7):
        want = cpu.forward(ids)
        got = bf16.forward(ids.cuda()).float().cpu()
        cos = torch.nn.functional.cosine_similarity(got.flatten(1), want.flatten(1), dim=-1)
        assert cos.min() > 0.99, cos
        agree = (got.argmax(-1) == want.argmax(-1)).float().mean()
        assert agree > 0.9, agree


@pytest.mark.gpu
def test_a_gpu_decode_step_never_waits_for_the_device() -> None:
    """Serving mode (transitions land when done): decode steps with the controller
    moving experts run under torch's sync debug mode "error"."""
    from dataclasses import replace

    needs_cuda()
    pol = default_policy("dynamic")
    pol = replace(pol, controller=replace(pol.controller, step_tokens=4, move_gain=0.0, move_z=0.0))
    cold = np.zeros((6, 64), dtype=np.float32)
    engine = load(
        budget="20%", policy=pol, calibration=cold, device="cuda", lockstep=False, progress=False
    )
    model = engine.model
    prompt = windows(1, 16, seed=8)[0].cuda()
    batch = 4
    ids = prompt.expand(batch, -1).contiguous()
    cache = model.allocate_cache(batch, 16 + 40, engine.dtype, "cuda")
    with torch.inference_mode():
        logits = model(ids, torch.arange(16, device="cuda").expand(batch, -1), cache)[:, -1]
        pos = torch.full((batch,), 16, device="cuda")
        for step in range(40):
            nxt = logits.argmax(-1)
            torch.cuda.set_sync_debug_mode("error")
            try:
                logits = model(nxt[:, None], pos[:, None], cache, key_slots=17 + step)[:, 0]
            finally:
                torch.cuda.set_sync_debug_mode(0)
            pos = pos + 1
            torch.cuda.synchronize()  # what sampling does; outside the step
    rt = engine.precision
    rt.flush()
    started = sum(r.started for r in rt.telemetry.records)
    finished = sum(r.finished for r in rt.telemetry.records)
    print(f"transitions started {started}, finished {finished}")
    assert started > 0 and finished > 0


@pytest.mark.gpu
def test_generate_cli_on_the_gpu(tmp_path) -> None:
    import subprocess
    import sys

    needs_cuda()
    cmd = [sys.executable, "-m", "dynaexq.cli", "generate", "def main(", "--max-new-tokens",
           "16", "--budget", "20%", "--device", "cuda"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(out.stdout.strip()) > 0


def test_graph_step_bookkeeping_equals_eager_steps(torch_launch) -> None:
    """What a CUDA graph replay leaves to the host (runtime.graphs): the steps around a
    replay close and pin as the first layer of an eager step would, and the logged host
    counts replace the layers' own. Here the "replay" runs the model's device work with
    the bookkeeping off, as the graph does: the controller, the transitions and the
    telemetry must be those of eager decode."""
    from dataclasses import replace

    pol = default_policy("dynamic")
    pol = replace(pol, controller=replace(pol.controller, step_tokens=4, move_gain=0.0, move_z=0.0))
    cold = np.zeros((6, 64), dtype=np.float32)
    kw = dict(budget="20%", policy=pol, calibration=cold, progress=False, launch=torch_launch)
    eager, graphed = load(**kw), load(**kw)
    batch, prompt, steps = 2, 8, 12
    cap = prompt + steps + 1
    ids = windows(1, prompt, seed=11)[0].expand(batch, -1).contiguous()
    out = {}
    for name, engine in (("eager", eager), ("graphed", graphed)):
        model, rt = engine.model, engine.precision
        cache = model.allocate_cache(batch, cap, engine.dtype, "cpu")
        logits = model(ids, torch.arange(prompt).expand(batch, -1), cache)[:, -1]
        log = None
        if name == "graphed":  # the capture: a step that runs nothing on a GPU
            rt.begin_capture()
            sums = [rt._dev_mass.sum.clone(), rt._dev_served.sum.clone()]
            scratch = torch.full((batch, 1), cap - 1)
            model(torch.zeros(batch, 1, dtype=torch.long), scratch, cache, key_slots=cap)
            rt._dev_mass.sum.copy_(sums[0])  # on a GPU the capture adds nothing
            rt._dev_served.sum.copy_(sums[1])
            log = rt.end_capture()
        seen = []
        for s in range(steps):
            nxt = logits.argmax(-1)[:, None]
            pos = torch.full((batch, 1), prompt + s)
            if log is None:
                logits = model(nxt, pos, cache, key_slots=cap)[:, 0]
            else:  # a replay: bookkeeping around it, none inside
                rt.graph_step_begin()
                rt._capture = []
                try:
                    logits = model(nxt, pos, cache, key_slots=cap)[:, 0]
                finally:
                    rt._capture = None
                rt.graph_step_end(log)
            seen.append((logits.clone(), rt.tier_map()))
        rt.flush()
        out[name] = (seen, rt.telemetry.records)
    (es, er), (gs, gr) = out["eager"], out["graphed"]
    for (le, me), (lg, mg) in zip(es, gs, strict=True):
        torch.testing.assert_close(lg, le)
        assert (me == mg).all()
    assert sum(r.finished for r in er) > 0, "the controller must move experts"
    # The graphed run has the same steps (the capture is not one of them).
    assert [(r.tokens, r.started, r.finished) for r in gr] == [
        (r.tokens, r.started, r.finished) for r in er
    ]
    assert [r.mass_hi_share for r in gr] == pytest.approx([r.mass_hi_share for r in er])


@pytest.mark.gpu
def test_decode_under_a_cuda_graph_equals_eager_decode() -> None:
    """runtime.graphs.DecodeGraph: the same logits as eager decode step after step while
    the controller moves experts (lockstep: the same transitions land at the same steps),
    the graph captured once."""
    from dataclasses import replace

    from dynaexq.runtime.graphs import DecodeGraph

    needs_cuda()
    pol = default_policy("dynamic")
    pol = replace(pol, controller=replace(pol.controller, step_tokens=4, move_gain=0.0, move_z=0.0))
    cold = np.zeros((6, 64), dtype=np.float32)
    kw = dict(budget="20%", policy=pol, calibration=cold, device="cuda", progress=False)
    runs = {}
    for name in ("eager", "graph"):
        engine = load(**kw)
        model, batch, prompt, steps = engine.model, 4, 8, 24
        cap = prompt + steps + 2
        cache = model.allocate_cache(batch, cap, engine.dtype, "cuda")
        ids = windows(1, prompt, seed=12)[0].cuda().expand(batch, -1).contiguous()
        with torch.inference_mode():
            logits = model(ids, torch.arange(prompt, device="cuda").expand(batch, -1), cache)
            logits = logits[:, -1]
            graph = DecodeGraph(engine, cache, batch) if name == "graph" else None
            seen = []
            for s in range(steps):
                nxt = logits.argmax(-1)
                pos = torch.full((batch,), prompt + s, device="cuda")
                if graph is None:
                    logits = model(nxt[:, None], pos[:, None], cache, key_slots=cap)[:, 0]
                else:
                    logits = graph.step(nxt, pos)
                seen.append(logits.float().cpu())
        engine.precision.flush()
        runs[name] = (seen, engine.precision.telemetry.records)
    for a, b in zip(runs["eager"][0], runs["graph"][0], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)
    assert sum(r.finished for r in runs["graph"][1]) > 0


@pytest.mark.gpu
def test_serve_on_the_gpu(tmp_path) -> None:
    """`dynaexq serve --device cuda` with a budget: completions and streaming come back, and
    the runtime reports the dynamic policy."""
    needs_cuda()
    pytest.importorskip("openai")
    from dynaexq.engine import EMBEDDED_MODEL_DIR
    from test_serve import MODEL, start_server, stop_server

    srv = start_server(EMBEDDED_MODEL_DIR, tmp_path / "server.log", "--device", "cuda",
                       "--dtype", "bfloat16", "--budget", "30%", "--policy", "dynamic")  # fmt: skip
    try:
        client = srv.client()
        r = client.completions.create(model=MODEL, prompt="def main(", max_tokens=12)
        assert r.usage.completion_tokens >= 1
        chunks = client.completions.create(model=MODEL, prompt="import os", max_tokens=8,
                                           stream=True)  # fmt: skip
        assert sum(1 for _ in chunks) >= 1
        assert srv.stats()["runtime"]["policy"] == "dynamic"
    finally:
        stop_server(srv)
    assert srv.proc.returncode == 0, srv.log.read_text()
