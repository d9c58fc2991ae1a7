"""Checkpoint reading: layouts, laziness, config spellings and the error messages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")

import dynaexq  # noqa: E402
from dynaexq import engine as engine_mod  # noqa: E402
from dynaexq.checkpoint import (  # noqa: E402
    Checkpoint,
    CheckpointError,
    CheckpointFileNotFoundError,
    EmbeddedModelMissingError,
    MissingTensorError,
    NonFiniteTensorError,
    TensorShapeError,
    UnsupportedArchitectureError,
    UnsupportedDtypeError,
)
from dynaexq.model.config import ModelConfig  # noqa: E402
from dynaexq.model.testing import make_hf_model, save_checkpoint, save_fused_checkpoint  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one thread is faster, and two stall when the 2 CPUs are busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


EXPERT = "model.layers.0.mlp.experts.3.down_proj.weight"


@pytest.fixture(scope="module")
def hf():
    return make_hf_model(seed=7)


@pytest.fixture(scope="module")
def single(hf, tmp_path_factory) -> Path:
    return save_checkpoint(hf, tmp_path_factory.mktemp("single"))


@pytest.fixture(scope="module")
def sharded(hf, tmp_path_factory) -> Path:
    return save_checkpoint(hf, tmp_path_factory.mktemp("sharded"), max_shard_size="30KB")


@pytest.fixture(scope="module")
def fused(hf, tmp_path_factory) -> Path:
    return save_fused_checkpoint(hf, tmp_path_factory.mktemp("fused"))


@pytest.fixture
def scratch(single, tmp_path) -> Path:
    """A writable copy of the single-file checkpoint."""
    return Path(shutil.copytree(single, tmp_path / "ckpt"))


def test_transformers_saves_per_expert_names(single) -> None:
    names = set(Checkpoint(single).names())
    assert EXPERT in names
    assert not any(n.endswith("gate_up_proj") for n in names)


def test_layouts_agree(single, sharded, fused) -> None:
    a, b, c = Checkpoint(single), Checkpoint(sharded), Checkpoint(fused)
    assert (a.expert_layout(0), c.expert_layout(0)) == ("per_expert", "fused")
    assert len(b.files) > 3
    cfg = a.config
    for layer in cfg.moe_layers:
        for e in range(cfg.num_experts):
            xs = [ck.expert(layer, e) for ck in (a, b, c)]
            for x in xs[1:]:
                assert torch.equal(x.gate, xs[0].gate)
                assert torch.equal(x.up, xs[0].up)
                assert torch.equal(x.down, xs[0].down)


def _rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc")
def test_fused_expert_read_is_lazy(tmp_path) -> None:
    """Reading one expert of a 128 MiB fused tensor must not bring the whole file in."""
    e, i, h = 64, 256, 1024  # gate_up [64, 512, 1024] float32 = 128 MiB
    raw = {**_raw_minimal(), "hidden_size": h, "moe_intermediate_size": i, "num_experts": e}
    raw["num_attention_heads"], raw["num_key_value_heads"] = 8, 8
    (tmp_path / "config.json").write_text(json.dumps(raw))
    save_file(
        {
            "model.layers.0.mlp.experts.gate_up_proj": torch.ones(e, 2 * i, h),
            "model.layers.0.mlp.experts.down_proj": torch.ones(e, h, i),
        },
        str(tmp_path / "model.safetensors"),
    )
    ck = Checkpoint(tmp_path)
    before = _rss_mib()
    t = ck.expert(0, 17)
    total = float(t.gate.sum() + t.up.sum() + t.down.sum())  # touch every byte read
    grown = _rss_mib() - before
    assert total == 3 * i * h
    assert grown < 32, f"reading one 3 MiB expert grew RSS by {grown:.0f} MiB"


def test_open_files_are_capped(sharded) -> None:
    ck = Checkpoint(sharded, max_open_files=2)
    for name in list(ck.names()):
        ck.tensor(name)
    assert len(ck._handles) <= 2
    ck.close()
    assert not ck._handles
    assert ck.tensor(EXPERT).shape == (48, 16)  # reopens on demand


def test_legacy_config_spelling_parses_the_same(single) -> None:
    raw = json.loads((single / "config.json").read_text())
    new = ModelConfig.from_dict(raw)
    legacy = dict(raw)
    legacy["num_experts"] = legacy.pop("num_local_experts")
    legacy["rope_theta"] = legacy.pop("rope_parameters")["rope_theta"]
    legacy["rope_scaling"] = None
    old = ModelConfig.from_dict(legacy)
    assert old == new
    assert new.num_experts == 8 and new.moe_layers == [0, 2]


def test_rope_scaling_variants_parse() -> None:
    base = json.loads(json.dumps({**_raw_minimal(), "max_position_embeddings": 4096}))
    yarn = ModelConfig.from_dict(
        {
            **base,
            "rope_scaling": {
                "type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 1024,
            },
        }
    )
    assert (yarn.rope.rope_type, yarn.rope.factor, yarn.rope.original_max_position_embeddings) == (
        "yarn",
        4.0,
        1024,
    )
    dyn = ModelConfig.from_dict(
        {**base, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 5e5}}
    )
    assert (dyn.rope.rope_type, dyn.rope.theta) == ("dynamic", 5e5)
    with pytest.raises(UnsupportedArchitectureError, match="partial_rotary_factor"):
        ModelConfig.from_dict({**base, "partial_rotary_factor": 0.5})
    with pytest.raises(UnsupportedArchitectureError, match="longrope"):
        ModelConfig.from_dict({**base, "rope_scaling": {"rope_type": "longrope", "factor": 2.0}})


def _raw_minimal() -> dict:
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "vocab_size": 10,
        "hidden_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 4,
    }


# -- errors ---------------------------------------------------------------------------------
def test_missing_directory_and_config(tmp_path) -> None:
    with pytest.raises(CheckpointFileNotFoundError, match="does not exist"):
        Checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointFileNotFoundError, match="config.json"):
        Checkpoint(tmp_path)


def test_missing_weights_file(scratch) -> None:
    (scratch / "model.safetensors").unlink()
    (scratch / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(
        CheckpointFileNotFoundError, match=r"model\.safetensors.*pytorch_model\.bin"
    ):
        Checkpoint(scratch)


def test_missing_shard(sharded, tmp_path) -> None:
    path = Path(shutil.copytree(sharded, tmp_path / "s"))
    victim = sorted(path.glob("model-0000*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointFileNotFoundError, match=victim.name):
        Checkpoint(path)


def _rewrite(path: Path, edit) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_missing_tensor_is_named(scratch) -> None:
    _rewrite(scratch, lambda t: t.pop(EXPERT))
    with pytest.raises(MissingTensorError, match=EXPERT.replace(".", r"\.")):
        dynaexq.load(scratch, device="cpu")
    name = "model.layers.2.self_attn.k_norm.weight"
    _rewrite(scratch, lambda t: t.pop(name))
    with pytest.raises(MissingTensorError, match=r"k_norm\.weight.*expected shape \[12\]"):
        dynaexq.load(scratch, device="cpu", experts=lambda *_: None)  # type: ignore[arg-type]


def test_misshaped_tensor_is_named(scratch) -> None:
    name = "model.layers.0.self_attn.q_proj.weight"
    _rewrite(scratch, lambda t: t.__setitem__(name, torch.zeros(70, 48)))
    with pytest.raises(TensorShapeError, match=r"q_proj\.weight.*\[70, 48\].*\[72, 48\]"):
        dynaexq.load(scratch, device="cpu")


def test_unsupported_tensor_dtype_is_named(scratch) -> None:
    _rewrite(scratch, lambda t: t.__setitem__(EXPERT, t[EXPERT].to(torch.float8_e4m3fn)))
    with pytest.raises(UnsupportedDtypeError, match=r"down_proj\.weight.*F8_E4M3"):
        dynaexq.load(scratch, device="cpu")


def test_header_only_queries_agree_with_the_data(single, fused) -> None:
    """expert_tensors/check_tensor/nbytes answer from the headers what reading would give."""
    for path in (single, fused):
        ck = Checkpoint(path)
        wanted = ck.expert_tensors(0)
        assert len(wanted) == (2 if path == fused else 3 * ck.config.num_experts)
        for name, shape in wanted.items():
            ck.check_tensor(name, shape)
            t = ck.tensor(name)
            assert t.shape == shape and ck.nbytes(name) == t.numel() * t.element_size()
        first = next(iter(wanted))
        with pytest.raises(TensorShapeError, match=first.replace(".", r"\.")):
            ck.check_tensor(first, (1, *wanted[first][1:]))
        with pytest.raises(MissingTensorError, match="nope"):
            ck.check_tensor("nope")


def test_tensor_as_stored_copies_any_dtype(scratch) -> None:
    _rewrite(scratch, lambda t: t.__setitem__("extra.ids", torch.arange(5, dtype=torch.int32)))
    ck = Checkpoint(scratch)
    with pytest.raises(UnsupportedDtypeError, match="extra.ids"):
        ck.tensor("extra.ids")
    assert torch.equal(ck.tensor_as_stored("extra.ids"), torch.arange(5, dtype=torch.int32))
    assert ck.nbytes("extra.ids") == 20


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_non_finite_expert_is_named_when_checked(single, fused, tmp_path, layout) -> None:
    path = Path(shutil.copytree(single if layout == "per_expert" else fused, tmp_path / "c"))
    name = (
        "model.layers.0.mlp.experts.2.up_proj.weight"
        if layout == "per_expert"
        else "model.layers.0.mlp.experts.gate_up_proj"
    )
    tensors = load_file(str(path / "model.safetensors"))
    i = Checkpoint(path).config.moe_intermediate_size
    if layout == "per_expert":
        tensors[name][1, 1] = float("nan")
    else:
        tensors[name][2, i + 1, 1] = float("nan")  # expert 2, an up row
    save_file(tensors, str(path / "model.safetensors"))
    ck = Checkpoint(path)
    ck.expert(0, 2)  # unchecked reads do not pay for the pass
    ck.expert(0, 1, check_finite=True)
    with pytest.raises(NonFiniteTensorError, match=name.replace(".", r"\.")) as e:
        ck.expert(0, 2, check_finite=True)
    assert layout == "per_expert" or "expert 2, up rows" in str(e.value)


def test_unsupported_compute_dtype(single) -> None:
    with pytest.raises(UnsupportedDtypeError, match="float64"):
        dynaexq.load(single, dtype="float64", device="cpu")


@pytest.mark.parametrize(
    "edit, pattern",
    [
        ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "LlamaForCausalLM"),
        ({"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"}, "deepseek_v3"),
        ({"quantization_config": {"quant_method": "fp8"}}, "fp8"),
        ({"hidden_act": "gelu"}, "gelu"),
    ],
)
def test_unsupported_architecture(scratch, edit, pattern) -> None:
    cfg = json.loads((scratch / "config.json").read_text())
    cfg.update(edit)
    (scratch / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match=pattern):
        dynaexq.load(scratch, device="cpu")


def test_errors_are_checkpoint_errors() -> None:
    for cls in (
        CheckpointFileNotFoundError,
        MissingTensorError,
        TensorShapeError,
        UnsupportedArchitectureError,
        UnsupportedDtypeError,
        EmbeddedModelMissingError,
        NonFiniteTensorError,
    ):
        assert issubclass(cls, CheckpointError)
        assert getattr(dynaexq, cls.__name__) is cls


def test_embedded_model_missing(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(engine_mod, "EMBEDDED_MODEL_DIR", tmp_path / "embedded")
    with pytest.raises(EmbeddedModelMissingError, match="embedded default model is missing"):
        dynaexq.load()


def test_bfloat16_checkpoint_loads_as_bfloat16(hf, tmp_path) -> None:
    bf = make_hf_model(seed=7).to(torch.bfloat16)
    path = save_checkpoint(bf, tmp_path / "bf16")
    engine = dynaexq.load(path, device="cpu")
    assert engine.dtype == torch.bfloat16
    assert engine.model.model.embed_tokens.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = bf(ids).logits.float()
    ours = engine.forward(ids)
    assert ours.dtype == torch.float32
    # Same bf16 arithmetic up to summation order: close, not bit-equal.
    assert (ours - ref).abs().max().item() <= 0.05 * ref.abs().max().item()


# The released Qwen3-30B-A3B config.json (legacy spellings: num_experts, rope_theta).
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "decoder_sparse_step": 1,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 6144,
    "max_position_embeddings": 40960,
    "max_window_layers": 48,
    "mlp_only_layers": [],
    "model_type": "qwen3_moe",
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_attention_heads": 32,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "output_router_logits": False,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}


def test_real_qwen3_30b_config_builds_the_same_parameters_as_transformers() -> None:
    """At full scale, on the meta device: our modules + routed experts have exactly the
    parameters of transformers' model (30.5B), with the expected active count."""
    import transformers
    from dynaexq.model.qwen3_moe import Qwen3MoeForCausalLM

    cfg = ModelConfig.from_dict(QWEN3_30B_A3B)
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.rope.theta) == (128, 8, 1e6)
    assert cfg.eos_token_ids == (151645,) and cfg.torch_dtype == "bfloat16"
    with torch.device("meta"):
        ours = Qwen3MoeForCausalLM(cfg, experts=None)  # type: ignore[arg-type]
        hf = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**QWEN3_30B_A3B))
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    routed = len(cfg.moe_layers) * cfg.num_experts * per_expert
    n_ours = sum(p.numel() for p in ours.parameters()) + routed
    n_hf = sum(p.numel() for p in hf.parameters())
    assert n_ours == n_hf
    assert round(n_ours / 1e9, 1) == 30.5
    active = n_ours - routed + len(cfg.moe_layers) * cfg.num_experts_per_tok * per_expert
    assert 3.3e9 <= active < 3.4e9  # "A3B": 3.3B active (3.35B with both embeddings)
    hf_names = {n for n, _ in hf.named_parameters() if ".experts." not in n}
    assert {n for n, _ in ours.named_parameters()} == hf_names
