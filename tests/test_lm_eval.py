"""lm-evaluation-harness against `dynaexq serve` (loopback) and in process.

Three tasks from local files this test writes: a multiple-choice task (loglikelihood), a
perplexity task (loglikelihood_rolling) and a generate_until task. They run through
lm-eval's `local-completions` and `local-chat-completions` clients against the server
(the embedded model), and through the in-process `dynaexq` model; the scores agree, and
the loglikelihoods equal those computed from `engine.forward`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
lm_eval = pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")

import dynaexq  # noqa: E402
from dynaexq.engine import EMBEDDED_MODEL_DIR  # noqa: E402
from test_serve import MODEL, Server, start_server, stop_server  # noqa: E402

pytestmark = pytest.mark.timeout(600)


MC_DOCS = [
    ("def add(a, b):\n    return", [" a + b", " a / b", " None", " add"], 0),
    ("for i in range(10):\n   ", [" print(i)", " return", " }", " the"], 0),
    ("#include <stdio.h>\nint main(void) {\n   ", [" printf(", " import", " def", " The"], 0),
    ("import os\nimport", [" sys", " {", " int", " the"], 0),
    ("The function returns", [" the", " int main(", " }", " 0x"], 0),
    ("if __name__ ==", [" \"__main__\":", " 0;", " The", " {"], 0),
    ("class Foo:\n    def __init__(self", ["):", " int x;", " the", " 7"], 0),
    ("    except ValueError", [":", " {", " the", " ;"], 0),
]  # fmt: skip
GEN_DOCS = [
    ("def add(a, b):\n", "    return a + b"),
    ("import os\nimport sys\n", "import re"),
    ("int main(void)\n{\n", "    return 0;"),
    ("for i in range(10):\n", "    print(i)"),
    ("The following", "The following"),
]
ROLLING_DOCS = [
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "#include <stdlib.h>\n\nint main(int argc, char **argv)\n{\n    return EXIT_SUCCESS;\n}\n",
]


def write_tasks(root: Path) -> Path:
    data = root / "data"
    data.mkdir(parents=True)

    def jsonl(name: str, rows: list[dict[str, Any]]) -> str:
        path = data / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    mc = jsonl("mc", [{"q": q, "choices": c, "answer": a} for q, c, a in MC_DOCS])
    gen = jsonl("gen", [{"prompt": p, "target": t} for p, t in GEN_DOCS])
    rolling = jsonl("rolling", [{"text": t} for t in ROLLING_DOCS])
    tasks = {
        "dxq_mc": f"""task: dxq_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
target_delimiter: ""
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
""",
        "dxq_gen": f"""task: dxq_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {gen}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
""",
        "dxq_rolling": f"""task: dxq_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {rolling}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
    }
    for name, text in tasks.items():
        (root / f"{name}.yaml").write_text(text)
    return root


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory: pytest.TempPathFactory) -> Any:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets")))
    from lm_eval.tasks import TaskManager

    root = write_tasks(tmp_path_factory.mktemp("lm_eval_tasks"))
    return TaskManager(include_path=str(root), include_defaults=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("log") / "server.log"
    srv = start_server(EMBEDDED_MODEL_DIR, log, "--max-context", "512", "--max-batch", "8")
    yield srv
    stop_server(srv)
    assert srv.proc.returncode == 0, srv.log.read_text()


@pytest.fixture(scope="module")
def in_process() -> Any:
    import dynaexq.lm_eval

    lm = dynaexq.lm_eval.DynaexqLM(batch_size=8, max_length=512, dtype="float32", device="cpu")
    yield lm
    lm.close()


def evaluate(model: Any, task_manager: Any, tasks: list[str], **kw: Any) -> dict[str, Any]:
    from lm_eval import simple_evaluate

    return simple_evaluate(
        model=model,
        tasks=tasks,
        task_manager=task_manager,
        log_samples=True,
        bootstrap_iters=0,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
        **kw,
    )


def per_doc(results: dict[str, Any], task: str) -> list[Any]:
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


@pytest.fixture(scope="module")
def completions_results(server: Server, task_manager: Any) -> dict[str, Any]:
    args = (
        f"model={MODEL},base_url={server.url}/v1/completions,num_concurrent=2,"
        "max_retries=1,max_length=512,timeout=120"
    )
    return evaluate(
        "local-completions", task_manager, ["dxq_mc", "dxq_gen", "dxq_rolling"],
        model_args=args, batch_size=4,
    )  # fmt: skip


@pytest.fixture(scope="module")
def adapter_results(in_process: Any, task_manager: Any) -> dict[str, Any]:
    return evaluate(in_process, task_manager, ["dxq_mc", "dxq_gen", "dxq_rolling"])


def test_local_completions_scores_every_task(completions_results: dict[str, Any]) -> None:
    res = completions_results["results"]
    assert 0.0 <= res["dxq_mc"]["acc,none"] <= 1.0
    assert res["dxq_mc"]["acc,none"] >= 0.5  # the embedded model knows its Python and C
    assert 0.0 <= res["dxq_gen"]["exact_match,none"] <= 1.0
    assert 1.0 < res["dxq_rolling"]["word_perplexity,none"] < 1e4
    for doc in per_doc(completions_results, "dxq_mc"):
        for ((ll, greedy),) in doc:
            assert math.isfinite(ll) and ll < 0 and isinstance(greedy, bool)


def test_in_process_adapter_gives_the_same_scores(
    completions_results: dict[str, Any], adapter_results: dict[str, Any]
) -> None:
    a, b = completions_results["results"], adapter_results["results"]
    assert a["dxq_mc"]["acc,none"] == b["dxq_mc"]["acc,none"]
    assert a["dxq_gen"]["exact_match,none"] == b["dxq_gen"]["exact_match,none"]
    for key in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert a["dxq_rolling"][key] == pytest.approx(b["dxq_rolling"][key], rel=1e-4)
    for x, y in zip(
        per_doc(completions_results, "dxq_mc"), per_doc(adapter_results, "dxq_mc"), strict=True
    ):
        for ((lx, gx),), ((ly, gy),) in zip(x, y, strict=True):
            assert lx == pytest.approx(ly, abs=1e-3) and gx == gy
    gen_a = per_doc(completions_results, "dxq_gen")
    gen_b = per_doc(adapter_results, "dxq_gen")
    assert gen_a == gen_b and any(r[0][0] for r in gen_a)  # the same, non-empty texts


def test_adapter_loglikelihood_equals_engine_forward(in_process: Any) -> None:
    from lm_eval.api.instance import Instance

    engine = dynaexq.load(EMBEDDED_MODEL_DIR, dtype="float32", device="cpu")
    context, continuation = MC_DOCS[0][0], MC_DOCS[0][1][0]
    req = Instance("loglikelihood", {}, (context, continuation), 0)
    ((ll, greedy),) = in_process.loglikelihood([req])
    ctx = engine.tokenizer.encode(context)
    whole = engine.tokenizer.encode(context + continuation)
    cont = whole[len(ctx) :]
    lp = torch.log_softmax(engine.forward([whole])[0], -1)
    want = sum(float(lp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
    assert ll == pytest.approx(want, abs=1e-3)
    assert greedy == all(int(lp[len(ctx) - 1 + j].argmax()) == t for j, t in enumerate(cont))


def test_local_chat_completions_generate_until(
    server: Server, task_manager: Any, in_process: Any
) -> None:
    """Chat: lm-eval's chat client scores generate_until tasks only (its loglikelihood is
    not implemented); with the chat template, the in-process model answers the same."""
    chat = evaluate(
        "local-chat-completions", task_manager, ["dxq_gen"],
        model_args=f"model={MODEL},base_url={server.url}/v1/chat/completions,max_retries=1",
        apply_chat_template=True,
    )  # fmt: skip
    local = evaluate(in_process, task_manager, ["dxq_gen"], apply_chat_template=True)
    in_process._chat = False  # back to plain prompts for the other tests
    assert (
        chat["results"]["dxq_gen"]["exact_match,none"]
        == (local["results"]["dxq_gen"]["exact_match,none"])
    )
    texts = per_doc(chat, "dxq_gen")
    assert texts == per_doc(local, "dxq_gen") and any(r[0][0] for r in texts)


def test_dynaexq_lm_eval_command(
    task_manager: Any, adapter_results: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """`dynaexq lm-eval` registers the model and runs lm-eval's own command line."""
    from dynaexq.cli import main

    root = task_manager.include_path
    root = root[0] if isinstance(root, list) else root
    argv = ["lm-eval", "--max-length", "512", "--dtype", "float32", "--"]
    assert main([*argv, "--tasks", "dxq_mc", "--include_path", str(root)]) == 0
    out = capsys.readouterr().out
    acc = adapter_results["results"]["dxq_mc"]["acc,none"]
    row = re.search(r"^\|dxq_mc\s*\|.*\|acc\s*\|[^|]*\|\s*([0-9.]+)\|", out, re.M)
    assert row is not None, out
    assert float(row.group(1)) == pytest.approx(acc, abs=1e-4)


def test_example_tasks(capsys: pytest.CaptureFixture[str]) -> None:
    """The tasks shipped for the README: built from the held-out text, runnable by name."""
    import importlib.util

    import dynaexq.lm_eval
    from dynaexq.cli import main

    spec = importlib.util.spec_from_file_location(
        "tasks_utils", dynaexq.lm_eval.TASKS_DIR / "utils.py"
    )
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    for build in (utils.heldout_python, utils.heldout_c, utils.heldout_prose):
        docs = build()["test"]
        assert len(docs) == utils.DOCS and all(len(d["text"]) > 200 for d in docs)
    docs = utils.next_line()["test"]
    assert len(docs) == utils.DOCS
    for d in docs:
        assert len(set(d["choices"])) == 4 and 0 <= d["answer"] < 4
        assert d["prefix"].startswith(d["context"]) and d["rest"]
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    argv = ["lm-eval", "--", "--tasks", "dynaexq_next_line_mc", "dynaexq_heldout_c"]
    assert main([*argv, "--limit", "4"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\|dynaexq_next_line_mc\s*\|.*\|acc\s*\|", out, re.M), out
    assert re.search(r"^\|dynaexq_heldout_c\s*\|.*\|bits_per_byte\s*\|", out, re.M), out
