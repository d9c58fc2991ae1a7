"""`dynaexq quantize` on small Qwen3-MoE checkpoints saved by transformers."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from dynaexq.checkpoint import (
    CheckpointError,
    CheckpointFileNotFoundError,
    MissingTensorError,
    NonFiniteTensorError,
    TensorShapeError,
    UnsupportedDtypeError,
)
from dynaexq.cli import main
from dynaexq.quant import PackedExpertView, dequantize_expert, pack_expert, parse_tier
from dynaexq.quant.tiered import TieredCheckpoint, quantize_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file

H, I, E, L = 64, 32, 4, 2  # noqa: E741 (hidden, intermediate, experts, layers)
TIERS = "bf16,int4,int2g64a-rtn"


def _save_model(path: Path, **kw) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=96,
        hidden_size=H,
        intermediate_size=96,
        moe_intermediate_size=I,
        num_hidden_layers=L,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=E,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path, **kw)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("hf") / "model"
    _save_model(p)
    return p


def _tensors(root: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(root.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _fuse(src: Path, dst: Path) -> None:
    """Rewrite a per-expert checkpoint into the fused on-disk form."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    t = _tensors(src)
    out = {k: v for k, v in t.items() if ".mlp.experts." not in k}
    for layer in range(L):
        p = f"model.layers.{layer}.mlp.experts"
        gu = [
            torch.cat([t[f"{p}.{e}.gate_proj.weight"], t[f"{p}.{e}.up_proj.weight"]])
            for e in range(E)
        ]
        out[f"{p}.gate_up_proj"] = torch.stack(gu)
        out[f"{p}.down_proj"] = torch.stack([t[f"{p}.{e}.down_proj.weight"] for e in range(E)])
    save_file(out, str(dst / "model.safetensors"))


def test_transformers_saves_per_expert_names(hf_model):
    names = set(_tensors(hf_model))
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in names
    assert not any(n.endswith("gate_up_proj") for n in names)


def test_quantize_checks_every_tensor(hf_model, tmp_path):
    out = tmp_path / "tiered"
    run = quantize_checkpoint(
        hf_model, out, [parse_tier(t) for t in TIERS.split(",")], progress=False
    )
    src = _tensors(hf_model)
    ck = TieredCheckpoint(out)
    m = ck.manifest
    assert m["layout_version"] == 1 and m["moe_layers"] == [0, 1]
    assert [t["name"] for t in m["tiers"]] == ["bf16", "int4g128", "int2g64a-rtn"]
    for tier in ck.tiers:
        nbytes = m["expert_nbytes"][tier.name]
        for layer in range(L):
            blobs = ck.expert_blobs(layer, tier)
            assert blobs.shape == (E, nbytes) and blobs.dtype == torch.uint8
            metrics = m["metrics"][tier.name][str(layer)]
            assert len(metrics) == E
            for e in range(E):
                p = f"model.layers.{layer}.mlp.experts.{e}"
                g, u, d = (src[f"{p}.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj"))
                assert torch.equal(blobs[e], pack_expert(tier, g, u, d)), (tier, layer, e)
                if tier.name == "bf16":  # pass-through is bit-exact
                    g2, u2, d2 = dequantize_expert(PackedExpertView(tier, H, I, blobs[e]))
                    assert torch.equal(g2, g.float()) and torch.equal(d2, d.float())
                    assert metrics[e]["weights"] == 0
                else:
                    assert 0 < metrics[e]["down_proj"] < 0.6
    # Non-expert tensors are carried over unchanged, expert tensors are not.
    nonexpert = dict(ck.nonexpert_tensors())
    want = {k: v for k, v in src.items() if ".mlp.experts." not in k}
    assert set(nonexpert) == set(want)
    for k, v in want.items():
        assert torch.equal(nonexpert[k], v) and nonexpert[k].dtype == v.dtype, k
    assert (out / "config.json").exists()
    expert_bytes = sum(v.numel() * v.element_size() for k, v in src.items() if k not in want)
    assert m["source_expert_bytes"] == expert_bytes
    assert run["quantize_mb_per_s"] > 0 and "quantize_mb_per_s" not in m
    assert not list(tmp_path.glob(".tiered.*"))


def test_fused_and_sharded_sources_give_the_same_blobs(hf_model, tmp_path):
    fused = tmp_path / "fused"
    _fuse(hf_model, fused)
    sharded = tmp_path / "sharded"
    _save_model(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").exists()
    outs = {}
    for name, src in (("per_expert", hf_model), ("fused", fused), ("sharded", sharded)):
        outs[name] = tmp_path / f"out-{name}"
        rc = main(
            ["quantize", str(src), "--tiers", "int4", "--out", str(outs[name]), "--no-progress"]
        )
        assert rc == 0
    ref = TieredCheckpoint(outs["per_expert"])
    for name in ("fused", "sharded"):
        ck = TieredCheckpoint(outs[name])
        assert ck.manifest["source_expert_bytes"] == ref.manifest["source_expert_bytes"]
        assert set(ck.manifest["nonexpert"]) == set(ref.manifest["nonexpert"])
        for layer in range(L):
            assert torch.equal(
                ck.expert_blobs(layer, "int4g128"), ref.expert_blobs(layer, "int4g128")
            )


def test_existing_output_needs_force(hf_model, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep").write_text("x")
    assert main(["quantize", str(hf_model), "--tiers", "int8", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and (out / "keep").exists()
    assert (
        main(
            [
                "quantize",
                str(hf_model),
                "--tiers",
                "int8",
                "--out",
                str(out),
                "--force",
                "--no-progress",
            ]
        )
        == 0
    )
    assert not (out / "keep").exists() and (out / "manifest.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


def _broken_copy(hf_model: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    (dst / "config.json").write_text((hf_model / "config.json").read_text())
    t = _tensors(hf_model)
    edit(t)
    save_file(t, str(dst / "model.safetensors"))
    return dst


X = "model.layers.{}.mlp.experts.{}.{}_proj.weight"


def _drop(t):
    t.pop(X.format(1, 2, "up"))


def _reshape(t):
    t[X.format(0, 1, "down")] = torch.zeros(H, I + 1)


def _retype(t):
    t[X.format(0, 0, "gate")] = torch.zeros(I, H, dtype=torch.int32)


def _poison(t):
    t[X.format(1, 3, "gate")][0, 0] = float("inf")


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        (_drop, MissingTensorError, r"'model\.layers\.1\.mlp\.experts\.2\.up_proj\.weight' is"),
        (
            _reshape,
            TensorShapeError,
            r"experts\.1\.down_proj\.weight' has shape \[64, 33\], expected \[64, 32\]",
        ),
        (_retype, UnsupportedDtypeError, r"experts\.0\.gate_proj\.weight' has dtype I32"),
        (_poison, NonFiniteTensorError, r"experts\.3\.gate_proj\.weight' has inf or NaN"),
    ],
)
def test_bad_input_names_the_tensor(hf_model, tmp_path, capsys, edit, error, message):
    src = _broken_copy(hf_model, tmp_path / "bad", edit)
    out = tmp_path / "out"
    # The quantizer raises the same errors as the model loader (dynaexq.checkpoint's).
    with pytest.raises(error, match=message) as e:
        quantize_checkpoint(src, out, [parse_tier("int4")], progress=False)
    assert isinstance(e.value, CheckpointError) and str(src) in str(e.value)
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    assert main(["quantize", str(src), "--tiers", "int4", "--out", str(out), "--no-progress"]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_bad_fused_or_sharded_source_names_the_tensor_or_file(hf_model, tmp_path):
    fused = tmp_path / "fused"
    _fuse(hf_model, fused)
    name = "model.layers.1.mlp.experts.down_proj"
    t = load_file(str(fused / "model.safetensors"))
    t[name] = t[name][:, :, :-1].contiguous()
    save_file(t, str(fused / "model.safetensors"))
    with pytest.raises(TensorShapeError, match=rf"'{re.escape(name)}' has shape \[4, 64, 31\]"):
        quantize_checkpoint(fused, tmp_path / "o", [parse_tier("int4")], progress=False)
    # An index listing a shard that is not there.
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((hf_model / "config.json").read_text())
    shutil.copy(hf_model / "model.safetensors", sharded / "model-00001-of-00002.safetensors")
    names = list(_tensors(hf_model))
    wm = {n: "model-00001-of-00002.safetensors" for n in names}
    wm[names[-1]] = "model-00002-of-00002.safetensors"
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(CheckpointFileNotFoundError, match="model-00002-of-00002"):
        quantize_checkpoint(sharded, tmp_path / "o", [parse_tier("int4")], progress=False)
    # No weights at all.
    (sharded / "model.safetensors.index.json").unlink()
    (sharded / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointFileNotFoundError, match="no model.safetensors"):
        quantize_checkpoint(sharded, tmp_path / "o", [parse_tier("int4")], progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused", "sharded"]


def test_bad_config_and_tiers(hf_model, tmp_path, capsys):
    assert main(["quantize", str(hf_model), "--tiers", "int5", "--out", str(tmp_path / "o")]) == 2
    assert "int5" in capsys.readouterr().err
    src = tmp_path / "nocfg"
    src.mkdir()
    assert main(["quantize", str(src), "--out", str(tmp_path / "o")]) == 2
    assert "config.json" in capsys.readouterr().err
    cfg = json.loads((hf_model / "config.json").read_text())
    del cfg["moe_intermediate_size"]
    (src / "config.json").write_text(json.dumps(cfg))
    assert main(["quantize", str(src), "--out", str(tmp_path / "o")]) == 2
    assert "moe_intermediate_size" in capsys.readouterr().err


def test_interrupted_run_leaves_nothing_complete_and_resumes(hf_model, tmp_path, monkeypatch):
    import dynaexq.quant.tiered as tiered

    ref = tmp_path / "ref"
    assert (
        main(["quantize", str(hf_model), "--tiers", "int4", "--out", str(ref), "--no-progress"])
        == 0
    )
    calls = {"n": 0}
    real = tiered.quantize_expert

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == E + 2:  # in the second layer
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(tiered, "quantize_expert", flaky)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):  # one thread: the patched quantizer runs here
        main(
            ["quantize", str(hf_model), "--tiers", "int4", "--out", str(out), "--no-progress",
             "--threads", "1"]
        )  # fmt: skip
    # Nothing complete at the output; the first layer's shard waits in the partial dir.
    assert not out.exists()
    part = tiered.partial_dir(out)
    assert (part / "experts-layer000.safetensors").is_file()
    assert not (part / "experts-layer001.safetensors").exists()
    monkeypatch.setattr(tiered, "quantize_expert", real)
    calls["n"] = 0
    counted = {"n": 0}

    def counting(*a, **kw):
        counted["n"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(tiered, "quantize_expert", counting)
    run = quantize_checkpoint(hf_model, out, [parse_tier("int4")], progress=False)
    assert run["resumed_layers"] == [0] and counted["n"] == E  # layer 1 only
    assert not part.exists()
    for f in sorted(ref.iterdir()):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())


def test_manifest_sections_match_the_layout(hf_model, tmp_path):
    out = tmp_path / "o"
    assert (
        main(["quantize", str(hf_model), "--tiers", "int3g32a", "--out", str(out), "--no-progress"])
        == 0
    )
    m = json.loads((out / "manifest.json").read_text())
    secs = m["tiers"][0]["sections"]
    names = ["qweight", "scales", "zeros"]
    assert [s["name"] for s in secs] == [f"{m}.{n}" for m in ("gate_up", "down") for n in names]
    assert all(s["offset"] % 256 == 0 for s in secs)
    with safe_open(str(out / m["experts"]["0"]["file"]), framework="pt") as f:
        assert f.get_slice("layers.0.experts.int3g32a").get_shape() == [
            E,
            m["expert_nbytes"]["int3g32a"],
        ]
    assert parse_tier("int3g32a").name == m["tiers"][0]["name"]


def test_a_cached_quantize_waits_for_another_writer_of_the_same_entry(hf_model, tmp_path) -> None:
    """Two evals of a suite that need the same cached tiered checkpoint: the second waits
    for the first one's lock instead of failing, then uses what it wrote."""
    import threading

    from dynaexq.quant.tiered import QuantizeBusyError, _lock, wait_for_writer
    from dynaexq.runtime import store

    cache = tmp_path / "cache"
    first = store.tiered_checkpoint_for(hf_model, TIERS, cache_dir=cache, progress=False)
    dst = first.root
    shutil.rmtree(dst)  # as if the first writer were still at work on it
    held = _lock(dst)
    with pytest.raises(QuantizeBusyError):
        quantize_checkpoint(hf_model, dst, [parse_tier(t) for t in TIERS.split(",")])
    got: list[TieredCheckpoint] = []
    waiter = threading.Thread(
        target=lambda: got.append(
            store.tiered_checkpoint_for(hf_model, TIERS, cache_dir=cache, progress=False)
        )
    )
    waiter.start()
    waiter.join(timeout=2.0)
    assert waiter.is_alive() and not got  # waiting on the lock, not failing
    held.close()
    waiter.join(timeout=120)
    assert not waiter.is_alive() and got[0].root == dst
    assert (dst / "manifest.json").is_file()
    # Waiting on a finished entry leaves no lock file behind.
    wait_for_writer(dst)
    assert not list(cache.glob(".*.lock"))
