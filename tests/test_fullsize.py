"""Full-size checkpoints with bounded host memory (issue 12).

Fast tests on small synthetic checkpoints in the released layout (per-expert tensors,
sharded safetensors with an index): the memory-mapped host store against the resident
one, the cached calibration, the clear errors (RAM for pinning, disk for quantizing,
mismatched tiered checkpoints), an interrupted `dynaexq quantize` resumed to a
byte-identical result, the memory report.

The slow test (`test_fullsize_checkpoint_in_bounded_host_memory`) runs the whole path on
a 7.9 GB synthetic checkpoint written once into the cache (~/.cache/dynaexq/synthetic, never
in the clone) and reused: quantize (only when the quantizer's code changed: the tiered
checkpoint is cached under a key of its sources), then `dynaexq serve` (load with a
budget and the dynamic policy, calibrate, one completion, /stats) and `dynaexq.load` +
generate, each in a child process whose peak anonymous memory is sampled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dynaexq  # noqa: E402
from dynaexq.quant import parse_tier, parse_tiers  # noqa: E402
from dynaexq.quant.tiered import (  # noqa: E402
    NotEnoughDiskError,
    TieredCheckpoint,
    TieredMismatchError,
    partial_dir,
    quantize_checkpoint,
)
from dynaexq.runtime import calibration as calibration_mod  # noqa: E402
from dynaexq.runtime import store as store_mod  # noqa: E402
from dynaexq.runtime.memory import memory_report  # noqa: E402
from dynaexq.runtime.policy import Policy  # noqa: E402
from dynaexq.runtime.store import HostMemoryError, TierStore  # noqa: E402
from fullsize_workload import cache_root, run_sampled, write_synthetic  # noqa: E402

PY = sys.executable
TEXT = (Path(dynaexq.__file__).parent / "data" / "calibration.txt").read_text()


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return write_synthetic(
        tmp_path_factory.mktemp("src") / "m",
        layers=3, experts=16, hidden=128, inter=64, heads=4, kv_heads=2, head_dim=32,
        top_k=4, shard_bytes=200_000,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiered(small, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiered") / "t"
    quantize_checkpoint(small, out, parse_tiers("int2,bf16"), progress=False)
    return out


def test_synthetic_checkpoint_has_the_released_layout(small) -> None:
    index = json.loads((small / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1  # sharded
    assert "model.layers.2.mlp.experts.15.down_proj.weight" in index["weight_map"]


def _run(tiered: Path, mode: str, tokens: int = 160):
    # The two-tier controller that follows every shift (not the default one, which moves
    # only when a move pays and may never move on random weights): the staging ring must
    # carry copies here.
    eng = dynaexq.load(
        tiered, budget="20%", policy=Policy("dynamic"), calibration=[TEXT], host_store=mode,
        progress=False,
    )  # fmt: skip
    out = eng.generate([list(range(1, 9))], max_new_tokens=tokens, temperature=0.0)[0]
    return eng, out.token_ids


def test_mapped_store_serves_the_same_tokens_as_pinned(tiered) -> None:
    mapped, ids_m = _run(tiered, "mapped")
    pinned, ids_p = _run(tiered, "pinned")
    assert mapped.precision.store.host_mode == "mapped"
    assert pinned.precision.store.host_mode == "pinned"
    host_m, host_p = mapped.precision.mover.host, pinned.precision.mover.host
    assert host_m.mapped_files and not host_p.mapped_files
    # The mapped store holds only its ring; the pinned one every tier.
    ring = host_m.staging_stats()
    assert host_m.resident_bytes == ring["total_bytes"] == ring["slots"] * ring["slot_bytes"]
    assert host_p.resident_bytes >= pinned.precision.store.tier_total_bytes()
    assert ids_m == ids_p
    tm, tp = mapped.precision.telemetry.totals(), pinned.precision.telemetry.totals()
    assert tm["transitions_finished"] == tp["transitions_finished"] > 0
    assert ring["acquisitions"] > 0 and ring["peak_in_use"] <= ring["slots"]
    assert host_m.staging_stats()["in_use"] <= mapped.precision.policy.controller.in_flight


def test_mapped_views_are_the_tiered_checkpoint_bytes(tiered) -> None:
    store = TierStore.from_tiered(TieredCheckpoint(tiered), host_store="mapped")
    host = store.host_store([0, 1], min_slots=2)
    host_resident = TierStore.from_tiered(TieredCheckpoint(tiered), host_store="pinned")
    res = host_resident.host_store([0, 1])
    tc = TieredCheckpoint(tiered)
    for li, layer in enumerate(store.layers):
        for ti, t in enumerate(store.tiers):
            want = tc.expert_blobs(layer, t)
            assert torch.equal(store.blobs[(li, ti)], want)
            for e in (0, 7, 15):
                assert bytes(host.view(li, e, ti)) == want[e].numpy().tobytes()
                assert bytes(res.view(li, e, ti)) == want[e].numpy().tobytes()


def test_calibration_runs_once_and_is_cached_beside_the_tiered_checkpoint(
    tiered, monkeypatch
) -> None:
    shutil.rmtree(tiered / "calibration", ignore_errors=True)
    calls = {"n": 0}
    real = calibration_mod.calibration_scores

    def counted(*a, **kw):
        calls["n"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(calibration_mod, "calibration_scores", counted)
    a = dynaexq.load(tiered, budget="20%", policy="dynamic", calibration=[TEXT], progress=False)
    assert calls["n"] == 1 and len(list((tiered / "calibration").glob("*.npy"))) == 1
    b = dynaexq.load(tiered, budget="20%", policy="dynamic", calibration=[TEXT], progress=False)
    assert calls["n"] == 1  # the second start read the cached ranking
    np.testing.assert_array_equal(a.deployment.calibration, b.deployment.calibration)
    # Other text: another ranking.
    dynaexq.load(tiered, budget="20%", policy="dynamic", calibration=[TEXT[:900]], progress=False)
    assert calls["n"] == 2
    # Without calibration text, the generic text shipped with the package is used.
    c = dynaexq.load(tiered, budget="20%", policy="dynamic", progress=False)
    assert calls["n"] == 2  # ... which is TEXT, already cached
    np.testing.assert_array_equal(c.deployment.calibration, a.deployment.calibration)
    assert float(a.deployment.calibration.sum()) > 0


def test_calibration_from_the_maps_ranks_like_the_full_precision_model(small, tiered) -> None:
    from dynaexq.engine import load as load_engine
    from dynaexq.tokenizer import Tokenizer

    tokens = [np.asarray(Tokenizer(small).encode(TEXT), dtype=np.int64)]
    full = load_engine(small, dtype="float32", device="cpu")
    want = calibration_mod.calibration_scores(full, tokens)
    eng = load_engine(tiered, dtype="float32", device="cpu", experts=lambda c, d, dev: None)
    store = TierStore.from_tiered(TieredCheckpoint(tiered), host_store="mapped")
    got = calibration_mod.calibrate(eng, store, tokens, cache=False, progress=False)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)  # bf16 tier = the source


def test_pinning_without_the_ram_is_refused_and_auto_maps(tiered, monkeypatch) -> None:
    tc = TieredCheckpoint(tiered)
    need = TierStore.from_tiered(tc, host_store="mapped").tier_total_bytes()
    monkeypatch.setattr(store_mod, "mem_available", lambda: need)  # 1x: no room to pin
    with pytest.raises(HostMemoryError, match=r"needs .* GiB of host RAM, but only .* GiB"):
        TierStore.from_tiered(tc, host_store="pinned")
    assert TierStore.from_tiered(tc, host_store="auto").host_mode == "mapped"
    monkeypatch.setattr(store_mod, "mem_available", lambda: 3 * need)
    assert TierStore.from_tiered(tc, host_store="auto").host_mode == "pinned"
    with pytest.raises(ValueError, match="host_store must be one of"):
        TierStore.from_tiered(tc, host_store="resident")


def test_mismatched_tiered_checkpoints_are_refused(small, tiered, tmp_path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tiered, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_experts"] = 32
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TieredMismatchError, match=r"num_experts \(16 vs 32\)"):
        TieredCheckpoint(bad)
    shutil.copy(tiered / "config.json", bad / "config.json")
    m = json.loads((bad / "manifest.json").read_text())
    m["layout_version"] = 99
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(Exception, match="layout version 99, this build reads 1"):
        TieredCheckpoint(bad)
    # A source changed since the tiered checkpoint was made from it.
    src = tmp_path / "src"
    shutil.copytree(small, src)
    out = tmp_path / "t2"
    quantize_checkpoint(src, out, [parse_tier("int4")], progress=False)
    TieredCheckpoint(out).check_source(src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TieredMismatchError, match="different version of"):
        TieredCheckpoint(out).check_source(src)
    with pytest.raises(TieredMismatchError):
        store_mod.tiered_checkpoint_for(out, "int4")  # its recorded source changed


def test_not_enough_disk_is_said_before_starting(small, tmp_path, monkeypatch) -> None:
    import dynaexq.quant.tiered as tiered_mod

    real = shutil.disk_usage
    monkeypatch.setattr(tiered_mod.shutil, "disk_usage", lambda p: real(p)._replace(free=10 << 20))
    calls = {"n": 0}
    monkeypatch.setattr(tiered_mod, "quantize_expert", lambda *a, **k: calls.update(n=1))
    with pytest.raises(NotEnoughDiskError, match=r"needs [\d.]+ GB more .* only 0\.01 GB"):
        quantize_checkpoint(small, tmp_path / "o", parse_tiers("int2,bf16"), progress=False)
    assert calls["n"] == 0  # refused before quantizing anything
    from dynaexq.cli import main

    assert main(["quantize", str(small), "--out", str(tmp_path / "o2"), "--no-progress"]) == 2


def _quantize_cmd(src: Path, out: Path, threads: int = 1) -> list[str]:
    return [
        PY, "-m", "dynaexq.cli", "quantize", str(src), "--tiers", "int4,int2", "--out",
        str(out), "--threads", str(threads), "--no-progress",
    ]  # fmt: skip


def test_killed_quantize_resumes_to_a_byte_identical_checkpoint(tmp_path) -> None:
    src = write_synthetic(
        tmp_path / "src", layers=4, experts=16, hidden=512, inter=256, heads=4, kv_heads=2,
        head_dim=32, top_k=2, shard_bytes=3 << 20,
    )  # fmt: skip
    ref = tmp_path / "ref"
    done = subprocess.run(_quantize_cmd(src, ref), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    part = partial_dir(out)
    p = subprocess.Popen(_quantize_cmd(src, out, threads=2), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (part / "experts-layer001.safetensors").is_file():
        assert p.poll() is None, "quantize finished before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not out.exists() and not (part / "manifest.json").exists()
    assert not (part / "experts-layer003.safetensors").exists()
    again = subprocess.run(
        _quantize_cmd(src, out, threads=2), capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stderr
    assert re.search(r"resumed: [1-3] layers were already done", again.stdout), again.stdout
    assert not part.exists()
    names = sorted(f.name for f in ref.iterdir())
    assert names == sorted(f.name for f in out.iterdir())
    for n in names:
        assert (ref / n).read_bytes() == (out / n).read_bytes(), n


def test_memory_report_counts_every_component(tiered) -> None:
    eng = dynaexq.load(
        tiered, budget="20%", policy="dynamic", calibration=[TEXT], host_store="mapped",
        progress=False,
    )  # fmt: skip
    r = memory_report(eng)
    assert r["host"]["anonymous"] > 0 and r["host"]["rss"] >= r["host"]["anonymous"]
    s = r["host_store"]
    assert s["mode"] == "mapped" and s["resident_store_bytes"] == 0
    files = sorted(tiered.glob("experts-layer*.safetensors"))
    assert s["mapped_tiered_bytes"] == sum(f.stat().st_size for f in files)
    assert s["staging_ring_bytes"] == eng.precision.mover.host.resident_bytes > 0
    d = r["device"]
    plan = eng.deployment.plan
    assert sum(d["pool_by_tier"].values()) + sum(d["pool_staging_by_tier"].values()) == (
        plan.pool_bytes
    )
    assert d["total"] == plan.total_bytes and d["total"] <= plan.budget
    json.dumps(r)  # served as JSON by /stats


# ---------------------------------------------------------------------------- full size

# 13 x 128 experts of 4.7 MB: 7.9 GB of bf16 experts. On the CPU backend the "device" pool
# is host memory too: its int2 floor alone is 14% of the checkpoint, so the bound leaves
# ~11% for everything else (torch alone is ~0.3 GB): the model must be this large for the
# process baseline to fit beside it.
FULL = {"layers": 13, "experts": 128, "hidden": 1024, "inter": 768}
FULL_TIERS = "int2,bf16"
FULL_BUDGET = "2%"


def _quantizer_key() -> str:
    """The tiered checkpoint is cached under a hash of the code that writes it."""
    import dynaexq.quant as q

    h = hashlib.sha256()
    for f in sorted(Path(q.__file__).parent.glob("*.py")):
        h.update(f.read_bytes())
    h.update(FULL_TIERS.encode())
    return h.hexdigest()[:12]


def _nonexpert_bytes(src: Path) -> int:
    from dynaexq.checkpoint import Checkpoint

    ck = Checkpoint(src)
    return sum(ck.nbytes(n) for n in ck.names() if ".mlp.experts." not in n)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_fullsize_checkpoint_in_bounded_host_memory(tmp_path) -> None:
    root = cache_root() / "synthetic"
    name = "qwen3moe-{layers}x{experts}-h{hidden}-i{inter}".format(**FULL)
    src = write_synthetic(root / name, **FULL, progress=True)
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    assert size >= 4e9
    limit = 0.25 * size + _nonexpert_bytes(src)
    figures: dict[str, object] = {"checkpoint_bytes": size, "limit_anon": limit}

    # 1. Quantize (cached under the quantizer's code; a run records its own figures).
    tiered = root / f"{name}-tiered-{_quantizer_key()}"
    record = tiered.with_name(tiered.name + ".quantize.json")
    if not (tiered / "manifest.json").is_file():
        for old in root.glob(f"{name}-tiered-*"):
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        # One worker: each further worker process adds ~0.7 GB of anonymous memory (its
        # own torch), which this bound has no room for; `--threads 2` is ~1.5x faster.
        cmd = _quantize_cmd(src, tiered, threads=1)
        cmd[cmd.index("int4,int2")] = FULL_TIERS
        done, peak = run_sampled(cmd, timeout=3600)
        assert done.returncode == 0, done.stderr
        mb_s = float(re.search(r"([\d.]+) MB/s", done.stdout).group(1))
        record.write_text(json.dumps({"peak": peak, "mb_per_s": mb_s, "stdout": done.stdout}))
    q = json.loads(record.read_text())
    figures["quantize"] = q
    assert q["peak"]["RssAnon"] < limit, q["peak"]

    # 2. dynaexq serve: load (budget, dynamic, calibration), one completion, /stats.
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    shutil.rmtree(tiered / "calibration", ignore_errors=True)  # calibrate in this run
    env = dict(os.environ, DYNAEXQ_HOST_STORE="mapped")
    cmd = [
        PY, "-m", "dynaexq.cli", "serve", "--model", str(tiered), "--host", "127.0.0.1",
        "--port", "0", "--policy", "dynamic", "--budget", FULL_BUDGET, "--max-batch", "1",
        "--max-context", "512", "--device", "cpu", "--calibration", str(calib),
    ]  # fmt: skip
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                         env=env)  # fmt: skip
    from fullsize_workload import Sampler

    log: list[str] = []
    try:
        with Sampler(p.pid) as s:
            t0 = time.monotonic()
            url = None
            while url is None:
                line = p.stderr.readline()
                assert line or p.poll() is None, "".join(log)
                log.append(line)
                m = re.search(r"on (http://[\d.]+:\d+)/v1", line)
                url = m.group(1) if m else None
                assert time.monotonic() - t0 < 1800, "".join(log)
            # The memory report follows the startup line; then the server starts listening.
            log += [p.stderr.readline() for _ in range(3)]
            while True:
                try:
                    urllib.request.urlopen(url + "/health", timeout=60).read()
                    break
                except urllib.error.URLError:
                    assert p.poll() is None and time.monotonic() - t0 < 1800, "".join(log)
                    time.sleep(0.1)
            figures["serve_ready_s"] = time.monotonic() - t0
            models = json.loads(urllib.request.urlopen(url + "/v1/models", timeout=60).read())
            model = models["data"][0]["id"]
            body = json.dumps(
                {"model": model, "prompt": "def fibonacci(n):", "max_tokens": 8}
            ).encode()
            req = urllib.request.Request(
                url + "/v1/completions", body, {"Content-Type": "application/json"}
            )
            resp = json.loads(urllib.request.urlopen(req, timeout=600).read())
            stats = json.loads(urllib.request.urlopen(url + "/stats", timeout=60).read())
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
    assert resp["choices"][0]["text"] is not None and resp["usage"]["completion_tokens"] >= 1
    mem = stats["memory"]
    assert mem["host_store"]["mode"] == "mapped"
    assert mem["host_store"]["mapped_tiered_bytes"] > size
    assert any("memory: host anonymous" in line for line in log), "".join(log)
    figures["serve"] = {"peak": s.peak, "memory": mem, "startup_log": "".join(log[-4:])}
    report = root / f"{name}.figures.json"
    report.write_text(json.dumps(figures, indent=1))
    assert s.peak["RssAnon"] < limit, figures["serve"]

    # 3. dynaexq.load + generate from the cached tiered checkpoint (cached ranking):
    #    time to first token and peak memory.
    out = tmp_path / "load.json"
    calib.write_text(TEXT)
    done = subprocess.run(
        [PY, str(Path(__file__).parent / "fullsize_workload.py"), "load", str(tiered),
         FULL_BUDGET, str(calib), str(out)],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    run = json.loads(out.read_text())
    figures["load"] = run
    assert run["pieces"] >= 1 and run["first_token_s"] is not None
    report.write_text(json.dumps(figures, indent=1))
    assert run["peak"]["RssAnon"] < limit, run["peak"]
    print(json.dumps(figures, indent=1))
