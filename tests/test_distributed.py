"""Two REAL processes on the CPU (torchrun, gloo), the world size read from inside each process: DDP (one
accelerate-prepared wrapper per phase), FSDP2 (torch's ``fully_shard``) and DeepSpeed ZeRO-1/2/3 (one
engine per phase) train the same student, sharded checkpoints resume exactly, and a sharded run exports what an
unsharded one does."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}


def torchrun(*args: str, processes: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", str(processes), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def worker(out: Path, kind: str, sharding: str, *options: str, processes: int = 2) -> list[dict]:
    """Run the worker; returns what each process saw, with its trained weights under ``"weights"``."""
    proc = torchrun("tests/distributed_worker.py", str(out), kind, sharding, *options, processes=processes)
    assert (
        proc.stdout.count(
            f"distributed: MULTI_CPU, {processes} processes, engine {engine_name(sharding, processes)}"
        )
        == 1
    )
    seen = [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]
    assert [s["rank"] for s in seen] == list(range(processes))
    assert all(s["world_size"] == processes for s in seen)
    for r, s in enumerate(seen):
        s["weights"] = load_file(str(out / f"rank{r}.safetensors"))
    return seen


def engine_name(sharding: str, processes: int = 2) -> str:
    if sharding.startswith("zero"):
        return f"DeepSpeed ZeRO-{sharding[4:]}"
    return "FSDP2" if sharding == "fsdp2" else "DDP" if processes > 1 else "single process"


def assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys() and a
    for name, value in a.items():
        if atol:
            torch.testing.assert_close(value, b[name], atol=atol, rtol=0, msg=name)
        else:
            assert torch.equal(value, b[name]), name


@pytest.mark.parametrize("student", ["lora", "full"])
def test_ddp_trains_one_student_in_two_processes_from_different_initialisations(tmp_path, student):
    seen = worker(tmp_path, student, "none", "same_init=0")
    assert all(s["distributed_type"] == "MULTI_CPU" and s["step"] == 4 for s in seen)
    assert any(k.startswith("gan_head.") for k in seen[0]["weights"])
    assert_same(seen[0]["weights"], seen[1]["weights"])  # process 1 trained process 0's weights


@pytest.mark.parametrize("sharding", ["none", "zero2"])
def test_two_processes_equal_one_process_with_the_doubled_batch(tmp_path, sharding):
    """Gradient accumulation (no all-reduce on the first micro-step) and the global-batch slices included."""
    two = worker(tmp_path / "two", "regression", sharding, "batch=4", "accumulation=2")
    one = worker(tmp_path / "one", "regression", "none", "batch=8", "accumulation=2", processes=1)
    assert_same(two[0]["weights"], two[1]["weights"])
    assert_same(two[0]["weights"], one[0]["weights"], atol=1e-4)
    halves = worker(tmp_path / "halves", "regression", "none", "batch=4", "accumulation=2", processes=1)
    moved = max((one[0]["weights"][k] - halves[0]["weights"][k]).abs().max() for k in one[0]["weights"])
    assert moved > 1e-3  # half the batch trains another model: the comparison above can fail


@pytest.fixture(scope="module")
def fsdp2_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp2")
    runs = {"ddp": worker(root / "ddp", "full", "none"), "fsdp2": worker(root / "fsdp2", "full", "fsdp2")}
    worker(root / "resumed", "full", "fsdp2", "steps=2")
    runs["resumed"] = worker(root / "resumed", "full", "fsdp2", "steps=4", "resume=latest")
    return root, runs


def test_fsdp2_shards_a_full_student_and_fake_score_and_trains_what_ddp_trains(fsdp2_runs):
    root, runs = fsdp2_runs
    fsdp2 = runs["fsdp2"]
    assert_same(fsdp2[0]["weights"], fsdp2[1]["weights"])  # gathered back into full weights on every process
    assert_same(fsdp2[0]["weights"], runs["ddp"][0]["weights"], atol=2e-4)
    checkpoint = root / "fsdp2" / "run" / "checkpoint-4"
    shards = [
        load_file(str(checkpoint / name))
        for name in ("train_state.safetensors", "train_state.rank-1.safetensors")
    ]
    info = json.loads((checkpoint / "train_state.json").read_text())
    assert info["shards"] == 2 and shards[0].keys() == shards[1].keys()
    full = fsdp2[0]["weights"]
    for phase, prefix in (("student", "student."), ("fake_score", "fake_score.")):
        weights = [v for k, v in full.items() if k.startswith(prefix)]
        for i in range(len(weights)):  # each process holds its part of dim 0 of every weight
            parts = [s[f"{phase}.{i}"] for s in shards]
            whole = torch.cat(parts)
            assert parts[0].shape[0] < whole.shape[0] or whole.shape[0] == 1
            assert any(w.shape == whole.shape and torch.equal(w, whole) for w in weights), (phase, i)
    ema = [k for k in shards[0] if k.startswith("ema.student.")]  # the student's EMA is kept sharded too
    assert len(ema) == len([k for k in full if k.startswith("student.")])
    for k in ema:
        student = shards[0][k.replace("ema.", "", 1)], shards[1][k.replace("ema.", "", 1)]
        assert [s[k].shape for s in shards] == [p.shape for p in student]


def test_a_sharded_checkpoint_resumes_exactly(fsdp2_runs):
    _, runs = fsdp2_runs
    assert runs["resumed"][0]["step"] == 4
    assert_same(runs["resumed"][0]["weights"], runs["fsdp2"][0]["weights"])


def test_a_sharded_checkpoint_is_refused_by_another_world(fsdp2_runs, tmp_path):
    root, _ = fsdp2_runs
    shutil.copytree(root / "fsdp2" / "run", tmp_path / "run")
    proc = torchrun("tests/distributed_worker.py", str(tmp_path), "full", "none", "resume=latest", processes=1,
                    check=False)  # fmt: skip
    assert proc.returncode != 0
    assert "holds the shards of 2 process(es), this run has 1" in proc.stderr


def test_fsdp2_lora_student_and_fake_score_on_one_shared_frozen_base(tmp_path):
    ddp = worker(tmp_path / "ddp", "lora", "none")
    fsdp2 = worker(tmp_path / "fsdp2", "lora", "fsdp2")
    assert_same(fsdp2[0]["weights"], fsdp2[1]["weights"])
    assert_same(fsdp2[0]["weights"], ddp[0]["weights"], atol=2e-4)


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero")
    runs = {name: worker(root / name, kind, sharding)
            for name, kind, sharding in [("ddp", "full", "none"), ("zero2", "full", "zero2"), ("zero3", "full", "zero3"),
                                         ("ddp-lora", "lora", "none"), ("zero1-lora", "lora", "zero1")]}  # fmt: skip
    for stage in ("zero2", "zero3"):
        worker(root / f"resumed-{stage}", "full", stage, "steps=2")
        runs[f"resumed-{stage}"] = worker(
            root / f"resumed-{stage}", "full", stage, "steps=4", "resume=latest"
        )
    return root, runs


@pytest.mark.parametrize(
    ("name", "reference"), [("zero2", "ddp"), ("zero3", "ddp"), ("zero1-lora", "ddp-lora")]
)
def test_deepspeed_zero_trains_what_ddp_trains_with_one_engine_per_phase(zero_runs, name, reference):
    """ZeRO-2/3 with a full student and fake score; ZeRO-1 with a LoRA student and LoRA fake score on one base."""
    _, runs = zero_runs
    assert_same(runs[name][0]["weights"], runs[name][1]["weights"])  # ZeRO-3: gathered back on every process
    assert_same(runs[name][0]["weights"], runs[reference][0]["weights"], atol=2e-4)
    assert any(k.startswith("gan_head.") for k in runs[name][0]["weights"])


def checkpoint_shards(root: Path, name: str) -> list[dict]:
    checkpoint = root / name / "run" / "checkpoint-4"
    assert json.loads((checkpoint / "train_state.json").read_text())["shards"] == 2
    return [
        load_file(str(checkpoint / f)) for f in ("train_state.safetensors", "train_state.rank-1.safetensors")
    ]


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_checkpoints_hold_each_process_its_shards_and_resume_exactly(zero_runs, stage):
    root, runs = zero_runs
    shards, full = (
        checkpoint_shards(root, stage),
        load_file(str(root / "ddp/run/checkpoint-4/train_state.safetensors")),
    )
    for phase in ("student", "fake_score"):
        trained = sum(v.numel() for k, v in full.items() if k.startswith(f"{phase}."))
        moments = [s[f"optimizer.{phase}.0.exp_avg"] for s in shards]  # one flat shard per process
        assert all(m.ndim == 1 and m.numel() < trained for m in moments)
        assert trained <= sum(m.numel() for m in moments) < 1.01 * trained + 64  # up to padding
        assert not torch.equal(moments[0][:16], moments[1][:16])
        held = [sum(v.numel() for k, v in s.items() if k.startswith(f"{phase}.")) for s in shards]
        if stage == "zero2":  # weights whole on every process
            assert held == [trained, trained]
        else:  # ZeRO-3: each process its partition of every weight, the student's EMA too
            assert all(h < trained <= sum(held) for h in held)
            ema = [sum(v.numel() for k, v in s.items() if k.startswith("ema.student.")) for s in shards]
            assert phase != "student" or ema == held
    assert runs[f"resumed-{stage}"][0]["step"] == 4
    assert_same(runs[f"resumed-{stage}"][0]["weights"], runs[stage][0]["weights"])


def test_deepspeed_bad_worlds_are_refused_in_one_sentence(tmp_path, monkeypatch):
    from accelerate import Accelerator

    from stepdistill.engines import TrainingEngine, resolve_sharding

    with pytest.raises(ValueError, match="sharding zero2 needs a launcher"):
        TrainingEngine(Accelerator(cpu=True), "zero2").check("no")
    monkeypatch.setenv("STEPDISTILL_DEEPSPEED_LAUNCH", "false")  # restored after the test, like the others
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    with pytest.raises(ValueError, match="offload is not used by the training loop"):
        resolve_sharding("auto", Accelerator(cpu=True))
    env = {**ENV, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "4"}
    proc = subprocess.run([sys.executable, "training_scripts/train_dmd2.py", "--output_dir", str(tmp_path / "r")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: DeepSpeed zero_stage must be 1, 2 or 3 for the training loop, got 4."
    ]
    assert not (tmp_path / "r").exists()  # refused before the teacher loads
    proc = torchrun("tests/distributed_worker.py", str(tmp_path / "fp16"), "full", "zero2", "mixed_precision=fp16",
                    check=False)  # fmt: skip
    assert proc.returncode != 0 and "use --mixed_precision bf16 or no" in proc.stderr
    proc = torchrun("tests/distributed_worker.py", str(tmp_path / "lora"), "lora", "zero3", check=False)
    assert proc.returncode != 0 and "ZeRO-3 partitions each module for one engine" in proc.stderr


@pytest.mark.parametrize("sharding", ["none", "fsdp2", "zero2"])
def test_bf16_mixed_precision_trains_under_every_engine(tmp_path, sharding):
    fp32 = worker(tmp_path / "fp32", "full", sharding)
    bf16 = worker(tmp_path / "bf16", "full", sharding, "mixed_precision=bf16")
    assert_same(bf16[0]["weights"], bf16[1]["weights"])
    differences = [(bf16[0]["weights"][k] - fp32[0]["weights"][k]).abs().max() for k in fp32[0]["weights"]]
    assert all(torch.isfinite(w).all() for w in bf16[0]["weights"].values())
    assert 0 < max(differences) < 0.1  # bf16 autocast changed the computation, not the training


def test_a_recipe_under_torchrun_runs_as_two_processes_and_a_sharded_run_exports_the_same(tmp_path):
    exports = {}
    for sharding in ("none", "fsdp2", "zero2", "zero3"):
        out = tmp_path / sharding
        proc = torchrun("training_scripts/train_dmd2.py", "--output_dir", str(out), "--max_train_steps", "2",
                        "--train_batch_size", "4", "--eval_samples_per_class", "0", "--report_to", "none",
                        "--validation_steps", "0", "--full", "--regression_pairs", "64", "--sharding", sharding)  # fmt: skip
        assert proc.stdout.count(f"distributed: MULTI_CPU, 2 processes, engine {engine_name(sharding)}") == 1
        assert proc.stdout.count('{"export": ') == 1
        exports[sharding] = out / "pipeline"
    files = {
        s: sorted(p.relative_to(e).as_posix() for p in e.rglob("*") if p.is_file())
        for s, e in exports.items()
    }
    for sharded in ("fsdp2", "zero2", "zero3"):
        assert files["none"] == files[sharded]
        for name in files["none"]:
            if name.endswith(".safetensors"):
                a, b = (load_file(str(exports[s] / name)) for s in ("none", sharded))
                assert_same(a, b, atol=2e-4)
            elif name.endswith(".json") and "metrics" not in name:
                assert (exports["none"] / name).read_text() == (exports[sharded] / name).read_text(), name


CONFIGS = ROOT / "training_scripts" / "accelerate_configs"


def launch_environment(config: Path) -> dict[str, str]:
    """The environment ``accelerate launch --config_file config`` gives each process (accelerate's own code)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(
        ["--config_file", str(config), "training_scripts/train_dmd2.py"]
    )
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:  # what accelerate's launch_command sets before its DeepSpeed launcher
        from accelerate.utils.launch import prepare_deepspeed_cmd_env

        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


@pytest.mark.parametrize(
    ("config", "sharding", "reshard"),
    [
        ("ddp_8gpu.yaml", "none", True),
        ("fsdp2_8gpu.yaml", "fsdp2", True),
        ("fsdp2_grad_op_8gpu.yaml", "fsdp2", False),
        ("deepspeed_zero2_8gpu.yaml", "zero2", True),
        ("deepspeed_zero3_8gpu.yaml", "zero3", True),
    ],
)
def test_shipped_accelerate_configs_select_the_engine(monkeypatch, config, sharding, reshard):
    from accelerate import Accelerator

    from stepdistill.engines import TrainingEngine

    env = launch_environment(CONFIGS / config)
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    for key, value in env.items():
        if key.startswith(
            ("ACCELERATE_USE_FSDP", "FSDP_", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_")
        ):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("STEPDISTILL_DEEPSPEED_LAUNCH", "false")  # restored after the test
    engine = TrainingEngine(Accelerator(cpu=True), "auto")
    assert (engine.sharding, engine.reshard_after_forward) == (sharding, reshard)
    assert "ACCELERATE_USE_DEEPSPEED" not in os.environ  # taken over: accelerate's own DeepSpeed stays off


def test_an_fsdp1_config_is_refused_in_one_sentence(monkeypatch):
    from accelerate import Accelerator

    from stepdistill.engines import TrainingEngine

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="FSDP2 only: set fsdp_version: 2"):
        TrainingEngine(Accelerator(cpu=True), "auto")


def test_readme_multi_gpu_commands_name_shipped_configs_and_valid_options():
    import re

    from stepdistill.cli import parse_args
    from stepdistill.recipes import StudentArgs
    from stepdistill.t2i_recipes import TextToImageArgs

    sys.path.insert(0, str(ROOT / "training_scripts"))
    import train_dmd2

    text = (ROOT / "README.md").read_text().split("### Many processes", 1)[1].split("\n## ", 1)[0]
    commands = [c for c in re.findall(r"^accelerate launch .*$", text.replace("\\\n", " "), flags=re.M)]
    assert len(commands) == 3
    for command in commands:
        words = command.split()
        assert (ROOT / words[words.index("--config_file") + 1]).exists()
        script = words.index("training_scripts/train_dmd2.py")
        args, t2i, dmd, cfg = parse_args(StudentArgs, TextToImageArgs, train_dmd2.DigitsDMDConfig,
                                         train_dmd2.DMDTrainConfig, args=words[script + 1 :])  # fmt: skip
        assert cfg.mixed_precision == "bf16" and not dmd.gan and t2i.prompts
