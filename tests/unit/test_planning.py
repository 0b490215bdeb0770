"""The planner: exact parameter counts without weights, the memory model's parts, `auto`
batch size and checkpointing from the estimate, time and cost, advice, and the trainer's use
of it (estimate before loading weights, fail fast, the GPU-hours cap)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from finetune_trainer import hyper, runner
from finetune_trainer.config import ModelSpec, RunConfig
from finetune_trainer.errors import InvalidInputError
from finetune_trainer.planning.facts import method_facts, model_facts
from finetune_trainer.planning.gpus import GIB, gpu_type, parse_memory
from finetune_trainer.planning.memory import Setup, estimate, worst_batch
from finetune_trainer.planning.plan import (
    Data,
    Target,
    advise,
    data_notes,
    resolve,
    timing,
)
from finetune_trainer.planning.source import load_config
from planning_fixtures import hub_cache_with_configs


def _run(method: str = "lora", **training: Any) -> RunConfig:
    return RunConfig.model_validate(
        {
            "model": {"source": "./m"},
            "dataset": {"source": "d.jsonl", "maxSeqLength": 2048},
            "method": {"type": method},
            "training": training,
            "output": {"uri": "out"},
        }
    )


@pytest.fixture(scope="module")
def llama8b(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The Llama-3.1-8B config, read from a hub cache holding only config.json."""
    mp = pytest.MonkeyPatch()
    try:
        hub_cache_with_configs(tmp_path_factory.mktemp("hub"), mp)
        return load_config(ModelSpec(source="hf://meta-llama/Llama-3.1-8B"), Path("unused"))
    finally:
        mp.undo()


H100 = gpu_type("NVIDIA-H100-80GB-HBM3")
LONG = Data(tuple([2048] * 64 + [300] * 936))  # 1,000 examples, some at max length


@pytest.mark.parametrize("method", ["full", "lora", "dora", "prefix", "prompt", "ia3"])
def test_meta_device_count_equals_the_loaded_model(method: str, tiny_model_dir: Path) -> None:
    from finetune_trainer.methods import apply_method, count_parameters
    from transformers import AutoConfig, AutoModelForCausalLM

    run = _run(method).model_copy(update={"model": ModelSpec(source=str(tiny_model_dir))})
    facts = model_facts(AutoConfig.from_pretrained(tiny_model_dir), run)
    loaded = apply_method(
        run, AutoModelForCausalLM.from_pretrained(tiny_model_dir), gradient_checkpointing=False
    )
    real = count_parameters(loaded)
    assert (facts.params.total, facts.params.trainable) == (real.total, real.trainable)


def test_a_gguf_model_is_planned_from_its_header(smollm2_gguf: Path) -> None:
    config = load_config(ModelSpec(source=str(smollm2_gguf)), Path("unused"))
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)


def test_llama_8b_counts(llama8b: Any) -> None:
    facts = method_facts(llama8b, _run("lora"))
    assert facts["full"].params.total == 8_030_261_248
    assert facts["full"].params.trainable == facts["full"].params.total
    # all-linear r=16: every projection of 32 layers
    assert facts["lora"].params.trainable == 41_943_040
    # every linear layer but the head: all parameters less embedding, head and 65 norms
    assert facts["lora"].params.quantizable == 8_030_261_248 - 2 * 128256 * 4096 - 65 * 4096


def test_memory_parts_follow_the_method_and_sharding(llama8b: Any) -> None:
    facts = method_facts(llama8b, _run("lora"))

    def peak(method: str, **kw: Any) -> Any:
        setup = Setup(method, 2, 2, 1, 2048, "padding-free", True, **kw)
        return estimate(facts[method].shape, facts[method].params, setup)

    full, lora, qlora = peak("full"), peak("lora"), peak("qlora", quant_bits=4)
    assert qlora.parts["weights"] < lora.parts["weights"] / 2
    state = ("gradients", "optimizer")
    assert sum(full.parts[k] for k in state) > 50 * sum(lora.parts[k] for k in state)
    assert qlora.parts["quantization"] > 0
    assert full.parts["optimizer"] == 2 * full.parts["gradients"]  # AdamW: two bf16 moments
    sharded = peak("full", world_size=4, fsdp=True)
    assert sharded.parts["optimizer"] == full.parts["optimizer"] // 4
    assert peak("lora", liger=True).parts["logits"] < lora.parts["logits"]
    no_ckpt = estimate(
        facts["lora"].shape,
        facts["lora"].params,
        Setup("lora", 2, 2, 1, 2048, "padding-free", False),
    )
    assert no_ckpt.parts["activations"] > 5 * lora.parts["activations"]


def test_preference_pairs_double_the_batch_and_full_dpo_keeps_a_reference(llama8b: Any) -> None:
    def plan(method: str, objective: str) -> Any:
        run = _run(method, objective=objective, batchSize=2, gradientCheckpointing=True)
        run = run.model_copy(
            update={"dataset": run.dataset.model_copy(update={"format": "preference"})}
            if objective != "sft"
            else {}
        )
        facts = method_facts(llama8b, run)[method]
        return resolve(run, facts, Target(1, 1, 80 * GIB, H100), None).memory

    sft, dpo = plan("lora", "sft"), plan("lora", "dpo")
    assert sft.rows == 1 and dpo.rows == 4  # padding-free rows vs 2 pairs of padded sequences
    assert dpo.tokens == 2 * sft.tokens
    assert dpo.parts["reference"] == 0  # the adapter-disabled base is the reference
    full = plan("full", "dpo")
    assert full.parts["reference"] == full.parts["weights"] > 0
    assert plan("full", "orpo").parts["reference"] == 0  # ORPO has no reference model


def test_the_worst_batch_is_the_longest_examples_for_padding_free_rows() -> None:
    lengths = [10, 500, 20, 400, 30]
    free = Setup("lora", 2, 2, 2, 512, "padding-free", False, lengths=lengths)
    assert worst_batch(free) == (900, 1, 900)
    padded = Setup("lora", 2, 2, 2, 512, "padded", False, lengths=lengths)
    assert worst_batch(padded) == (1000, 2, 500)
    packed = Setup("lora", 2, 2, 2, 512, "packed", False, lengths=lengths)
    assert worst_batch(packed) == (1024, 1, 1024)


def test_auto_checkpointing_turns_on_exactly_when_the_estimate_without_does_not_fit(
    llama8b: Any,
) -> None:
    run = _run("lora", batchSize=4)
    facts = model_facts(llama8b, run)
    big = Target(1, 1, 10**15, H100)
    without = resolve(run, facts, big, LONG)
    assert without.gradient_checkpointing is False
    assert H100 is not None
    tight = Target(1, 1, without.memory.total - 1, H100)
    with_ckpt = resolve(run, facts, tight, LONG)
    assert with_ckpt.gradient_checkpointing is True
    assert with_ckpt.fits is True
    assert with_ckpt.memory.total < without.memory.total
    cpu = resolve(run, facts, Target(0, 1, None), LONG)
    assert cpu.gradient_checkpointing is False  # recomputing only costs time on CPU


def test_auto_batch_is_the_largest_that_fits(llama8b: Any) -> None:
    run = _run("lora")
    facts = model_facts(llama8b, run)
    got = resolve(run, facts, Target(1, 1, 80 * GIB, H100), LONG)
    assert got.fits is True
    assert got.batch_size in (1, 2, 4, 8, 16, 32, 64)
    double = run.model_copy(
        update={"training": run.training.model_copy(update={"batch_size": got.batch_size * 2})}
    )
    if got.batch_size < hyper.GPU_AUTO_BATCH_START:
        bigger = resolve(double, facts, Target(1, 1, 80 * GIB, H100), LONG)
        assert bigger.fits is False


def test_timing_steps_tokens_and_cost(llama8b: Any) -> None:
    run = _run("lora", batchSize=8, epochs=2, gradientAccumulationSteps=2)
    facts = model_facts(llama8b, run)
    target = Target(4, 1, 80 * GIB, H100, price_per_gpu_hour=3.0)
    time = timing(run, facts, target, LONG, 8)
    # 1,000 examples / (8 x 4 workers) = 32 batches = 16 optimizer steps per epoch
    assert time.steps == 32
    assert time.trained_tokens == 2 * LONG.tokens
    assert time.seconds is not None and time.gpu_hours is not None and time.cost is not None
    assert time.seconds[0] < time.seconds[1]
    assert time.gpu_hours[1] == pytest.approx(time.seconds[1] * 4 / 3600)
    assert time.cost[1] == pytest.approx(time.gpu_hours[1] * 3.0)
    capped = timing(_run("lora", maxSteps=5), facts, target, LONG, 8)
    assert capped.steps == 5


def test_advice_per_method_and_data(llama8b: Any) -> None:
    run = _run("full", batchSize=4)
    advice = advise(run, method_facts(llama8b, run), Target(1, 1, 80 * GIB, H100), LONG)
    by_method = {o.method: o for o in advice.options}
    assert set(by_method) == {"full", "lora", "qlora"}
    assert by_method["full"].gpus > 1 and by_method["full"].strategy == "fsdp"
    assert by_method["lora"].gpus == 1 and by_method["qlora"].gpus == 1
    assert by_method["qlora"].peak_bytes < by_method["lora"].peak_bytes
    assert advice.smallest is not None and advice.smallest.gpus == 1
    assert advice.fastest is not None
    assert data_notes(run, Data((100,) * 50))[0].startswith("only 50 training examples")
    assert "an adapter" in data_notes(run, Data((100,) * 500))[0]
    assert data_notes(_run("lora"), Data((100,) * 500)) == []


def test_memory_sizes_and_gpu_types() -> None:
    assert parse_memory("80Gi") == 80 * GIB
    assert parse_memory("24GB") == 24 * 10**9
    assert parse_memory("81559Mi") == 81559 * 2**20
    with pytest.raises(ValueError, match="not a memory size"):
        parse_memory("lots")
    found = gpu_type("NVIDIA-A100-SXM4-40GB")
    assert found is not None and found.name == "A100-40GB"
    assert gpu_type("NVIDIA L40S") is not None and gpu_type("NVIDIA L40S").name == "L40S"  # type: ignore[union-attr]
    assert gpu_type("Voodoo2") is None


# -- the trainer: estimate before loading weights -------------------------------------------
def _tiny_run(model: Path, **training: Any) -> RunConfig:
    return RunConfig.model_validate(
        {
            "model": {"source": str(model)},
            "dataset": {"source": "d.jsonl", "maxSeqLength": 128},
            "method": {"type": "lora", "lora": {"r": 4}},
            "training": {"precision": "fp32", "batchSize": 4, **training},
            "output": {"uri": "out"},
        }
    )


def test_production_auto_checkpointing_follows_the_estimate(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`runner` plans on the GPU it got and enables checkpointing when the estimate without it
    does not fit (before, production never passed the model's size: auto stayed off)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    run = _tiny_run(tiny_model_dir)
    config = AutoConfig.from_pretrained(tiny_model_dir)
    lengths = [128] * 16
    free = runner.plan_training(run, config, lengths, "cpu")
    assert free.resolved.gradient_checkpointing is False
    roomy = free.resolved.memory.total + 2**30
    monkeypatch.setattr(runner, "_gpu", lambda rank: (roomy, "NVIDIA H100 80GB HBM3"))
    assert (
        runner.plan_training(run, config, lengths, "cuda").resolved.gradient_checkpointing is False
    )
    tight = free.resolved.memory.total - 1
    monkeypatch.setattr(runner, "_gpu", lambda rank: (tight, "NVIDIA H100 80GB HBM3"))
    planned = runner.plan_training(run, config, lengths, "cuda")
    assert planned.resolved.gradient_checkpointing is True
    assert planned.estimate.gradient_checkpointing is True
    model, hp = runner.training_setup(
        run, planned, len(lengths), "cuda", lambda dtype: AutoModelForCausalLM.from_config(config)
    )
    assert hp.gradient_checkpointing is True
    assert model.base_model.model.is_gradient_checkpointing


def test_a_run_that_does_not_fit_fails_fast_with_advice(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoConfig

    run = _tiny_run(tiny_model_dir, gradientCheckpointing=False)
    config = AutoConfig.from_pretrained(tiny_model_dir)
    lengths = [128] * 16
    monkeypatch.setattr(runner, "_gpu", lambda rank: (2**20, "NVIDIA L4"))
    planned = runner.plan_training(run, config, lengths, "cuda")
    assert planned.estimate.fits is False
    with pytest.raises(InvalidInputError, match=r"does not fit: .* GiB per GPU .* this GPU has"):
        runner.check_plan(run, config, planned, lengths)


def test_the_platform_caps_gpu_hours(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune_trainer.progress import ENV_MAX_GPU_HOURS
    from transformers import AutoConfig

    run = _tiny_run(tiny_model_dir, epochs=1000)
    config = AutoConfig.from_pretrained(tiny_model_dir)
    lengths = [128] * 100_000
    monkeypatch.setattr(runner, "_gpu", lambda rank: (80 * GIB, "NVIDIA H100 80GB HBM3"))
    planned = runner.plan_training(run, config, lengths, "cuda")
    assert planned.estimate.gpu_hours_max is not None
    monkeypatch.setenv(ENV_MAX_GPU_HOURS, str(planned.estimate.gpu_hours_max * 2))
    runner.check_plan(run, config, planned, lengths)  # under the cap
    monkeypatch.setenv(ENV_MAX_GPU_HOURS, str(planned.estimate.gpu_hours_max / 2))
    with pytest.raises(InvalidInputError, match="over the platform's cap"):
        runner.check_plan(run, config, planned, lengths)


def test_finetune_run_of_a_job_too_large_for_its_gpu_exits_65_before_loading(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from finetune_trainer import models
    from finetune_trainer.cli import app
    from typer.testing import CliRunner

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(repo)
    monkeypatch.setattr(runner, "_device", lambda: "cuda")
    monkeypatch.setattr(runner, "_gpu", lambda rank: (64 * 2**20, "NVIDIA L4"))

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(runner, "load_model", never)
    monkeypatch.setattr(models, "load_model", never)
    result = CliRunner().invoke(
        app,
        [
            "run",
            "examples/quickstart.yaml",
            "--output",
            str(tmp_path / "out"),
            "--set",
            f"model.source={tiny_model_dir}",
        ],
    )
    assert result.exit_code == 65, result.output
    assert "does not fit" in result.output
    assert "what fits GPUs like it:" in result.output


def test_a_model_the_planner_cannot_read_still_trains(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from finetune_trainer.progress import Outcome
    from finetune_trainer.reporting import run_reported

    def unreadable(*args: Any, **kwargs: Any) -> Any:
        raise TypeError("int() argument must be a string or a number, not 'NoneType'")

    monkeypatch.setattr(runner, "plan_training", unreadable)
    repo = Path(__file__).resolve().parents[2]
    run = RunConfig.model_validate(
        {
            "model": {"source": str(tiny_model_dir)},
            "dataset": {"source": str(repo / "examples/data/instructions.jsonl")},
            "method": {"type": "lora", "lora": {"r": 4}},
            "training": {"maxSteps": 1, "batchSize": 2},
            "output": {"uri": str(tmp_path / "out")},
        }
    )
    ctx = runner.RunContext(name="unplanned")
    summary = run_reported(run, ctx, progress_port=None)
    assert summary.outcome == Outcome.SUCCEEDED, summary.message
    assert ctx.tracker.snapshot().estimate is None
