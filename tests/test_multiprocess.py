"""Several processes, one run: `seshu pretrain` and `seshu sft` in two processes on a CPU (DDP over gloo).

One `torchrun --nproc_per_node 2` launch runs, in its two processes, a pretraining run, its `--resume` to more
steps, and a LoRA fine-tuning of the result, each through `seshu`'s entry point. The launch runs this file as
the program (see `probe` at the bottom): it records, per command and per process, what each process printed
and which expensive work it did (training a tokenizer, reading a whole corpus into a cache). The commands
share one launch because each process spends most of its time importing; three launches would take about twice as
long.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from seshu.config import PretrainRecipe, SFTRecipe, load_recipe
from seshu.train import pretrain, sft

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "tiny"
LAUNCH_CONFIGS = RECIPES.parent / "accelerate"
PRETRAIN = RECIPES / "quickstart.yaml"
SFT = RECIPES / "bloom-alpaca-lora.yaml"
# Per process: 2 processes x 4 blocks = the reference's batch of 8, so a step sees the same 8 blocks either way.
PRETRAIN_SETS = ["train.batch_size=4", "train.save_every=2", "train.eval_every=2", "train.log_every=1"]
# 28 training conversations: 3 steps of 8 stay inside the first epoch (the last, partial batch of an epoch is
# split unevenly between processes). LoRA dropout draws its masks per process, so it is off for the comparison.
SFT_SETS = ["train.batch_size=4", "train.max_steps=3", "train.log_every=1", "train.eval_every=3",
            "train.save_every=3", "sft.lora.dropout=0"]  # fmt: skip
# Relative difference allowed between a loss of the two-process run and the one-process run. They sum the same
# float32 values in another order (two half batches, then an all-reduce of the gradients): seen, at most 8e-8
# over these steps. Training on other blocks (one process with a batch of 4) moves them by 3e-4 to 4e-3.
LOSS_RTOL = 1e-5


@dataclass
class Launch:
    folder: Path  # what the probe recorded
    pretrain_run: Path
    sft_run: Path

    def printed(self, command: int, rank: int) -> list[str]:
        text = (self.folder / f"out-{command}-{rank}.txt").read_text(encoding="utf-8")
        return [line for line in text.splitlines() if line.strip()]

    def built(self, command: int) -> list[str]:
        """Each expensive piece of work done during `command`, as "RANK WHAT", sorted."""
        lines = (self.folder / "built.txt").read_text(encoding="utf-8").splitlines()
        return sorted(line.split(" ", 1)[1] for line in lines if line.split(" ", 1)[0] == str(command))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> Launch:
    root = tmp_path_factory.mktemp("multiprocess")
    run, tuned = root / "pretrain", root / "sft"
    commands = [
        ["pretrain", "--config", PRETRAIN, "--out", run, *_sets(PRETRAIN_SETS, "train.max_steps=4")],
        ["pretrain", "--config", PRETRAIN, "--out", run, "--resume", *_sets(PRETRAIN_SETS, "train.max_steps=6")],
        ["sft", "--config", SFT, "--out", tuned, *_sets(SFT_SETS, f"model.init_from={run}")],
    ]
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port", str(free_port())]
    argv += [__file__, str(root), json.dumps([[str(arg) for arg in command] for command in commands])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return Launch(root, run, tuned)


def _sets(assignments: list[str], *more: str) -> list[str]:
    return [arg for assignment in [*assignments, *more] for arg in ("--set", assignment)]


def test_the_tokenizer_and_the_data_caches_are_built_once_by_the_main_process(launch: Launch) -> None:
    assert launch.built(0) == ["0 blocks", "0 tokenizer"]
    assert launch.built(1) == []  # resuming: the run's tokenizer and cache are reused by both processes
    assert launch.built(2) == ["0 rows", "0 rows"]  # fine-tuning: the train and the validation rows
    assert (launch.pretrain_run / "tokenizer" / "tokenizer.json").is_file()


def test_only_the_main_process_reports(launch: Launch) -> None:
    for command in range(3):
        # The CLI's closing summary (printed by seshu/cli, not by the library) is the one line each process prints.
        assert all(line.startswith("done: ") for line in launch.printed(command, rank=1))
    first, resumed, tuned = (launch.printed(command, rank=0) for command in range(3))
    assert first.count("training a bpe tokenizer (400 tokens) on the training corpus") == 1
    assert [line.split(" |")[0] for line in first if "| loss" in line] == [f"step {s}/4" for s in range(1, 5)]
    assert any("4 steps of 2,048 tokens" in line for line in first)  # 2 processes x 4 blocks x 256 tokens
    assert f"resuming from {launch.pretrain_run / 'checkpoints' / 'checkpoint-4'}" in resumed
    assert not any("tokenizer" in line for line in resumed)
    assert [line.split(" |")[0] for line in resumed if "| loss" in line] == ["step 5/6", "step 6/6"]
    assert sum(line.startswith("data (training and held-out): ") for line in tuned) == 1


def test_one_set_of_checkpoints_and_one_log_for_the_whole_run(launch: Launch) -> None:
    checkpoints = launch.pretrain_run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-4", "checkpoint-6"]  # save_total_limit: 2
    for checkpoint in checkpoints.iterdir():  # one model, and each process's random state to resume it
        assert sorted(p.name for p in checkpoint.glob("*.safetensors")) == ["model.safetensors"]
        assert sorted(p.name for p in checkpoint.glob("rng_state_*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
    entries = _log(launch.pretrain_run)
    assert [e["step"] for e in entries if "loss" in e] == [1, 2, 3, 4, 5, 6]
    assert [e["step"] for e in entries if "eval_loss" in e] == [2, 4, 6]
    assert not list(launch.pretrain_run.glob(".*partial*"))

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(launch.pretrain_run)
    card = (launch.pretrain_run / "README.md").read_text(encoding="utf-8")
    assert "steps: 6" in card and model.config.vocab_size == 400
    assert (launch.sft_run / "adapter_model.safetensors").is_file()


def test_the_first_losses_match_one_process_with_the_same_global_batch(launch: Launch, tmp_path: Path) -> None:
    one = pretrain.run(_recipe(PretrainRecipe, PRETRAIN, tmp_path / "pretrain", PRETRAIN_SETS, 8, max_steps=4))
    _assert_close(_losses(launch.pretrain_run)[:4], _losses(one.output_dir))

    tuned = sft.run(_recipe(SFTRecipe, SFT, tmp_path / "sft", SFT_SETS, 8, init_from=launch.pretrain_run))
    _assert_close(_losses(launch.sft_run), _losses(tuned.output_dir))


@pytest.mark.parametrize("path", sorted(LAUNCH_CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_launch_configs_parse_and_set_up_their_plugin(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `accelerate launch --config_file PATH` does before it starts the processes (their environment), and the
    plugin each process then builds from it; the GPU run itself is not tested here."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    header = [line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#")]
    assert any(f"accelerate launch --config_file recipes/accelerate/{path.name} " in line for line in header)
    parsed = launch_command_parser().parse_args(["--config_file", str(path), "--num_processes", "2", "-m", "seshu"])
    args, config, _ = _validate_launch_command(parsed)
    if config.distributed_type == DistributedType.FSDP:
        env = prepare_multi_gpu_env(args)
    else:
        assert config.distributed_type == DistributedType.DEEPSPEED
        args.deepspeed_fields_from_accelerate_config = ",".join(config.deepspeed_config)
        env = prepare_deepspeed_cmd_env(args)[1]
    assert env.get("ACCELERATE_MIXED_PRECISION", "no") == "no"  # the recipe's train.precision decides
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if config.distributed_type == DistributedType.FSDP:
        fsdp = FullyShardedDataParallelPlugin()
        assert (fsdp.fsdp_version, fsdp.state_dict_type.name) == (2, "FULL_STATE_DICT")  # published whole
        return
    deepspeed = DeepSpeedPlugin().deepspeed_config
    # Left to the Trainer, which fills them from the recipe's train section.
    assert deepspeed["gradient_accumulation_steps"] == deepspeed["gradient_clipping"] == "auto"
    zero = deepspeed["zero_optimization"]
    assert zero["stage"] in (2, 3)
    assert zero["stage"] == 2 or zero["stage3_gather_16bit_weights_on_model_save"]  # published whole


def _recipe(kind: type[Any], path: Path, out: Path, sets: list[str], batch: int, **extra: Any) -> Any:
    keys = {"max_steps": "train.max_steps", "init_from": "model.init_from"}
    overrides = [*sets, f"train.batch_size={batch}", f"output_dir={out}"]
    return load_recipe(kind, path, overrides + [f"{keys[key]}={value}" for key, value in extra.items()])


def _log(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text(encoding="utf-8").splitlines()]


def _losses(run: Path) -> list[float]:
    return [e["loss"] for e in _log(run) if "loss" in e]


def _assert_close(two: list[float], one: list[float]) -> None:
    assert len(two) == len(one) >= 3
    assert all(math.isclose(a, b, rel_tol=LOSS_RTOL) for a, b in zip(two, one, strict=True)), (two, one)


# ------------------------------------------------------------------------------------------------
# The program each process of the launch runs


def probe(folder: Path, commands: list[list[str]]) -> None:
    """Run each of `commands` through `seshu`'s entry point, writing what this process prints to
    FOLDER/out-COMMAND-RANK.txt and a line "COMMAND RANK WHAT" to FOLDER/built.txt whenever it trains a tokenizer
    or reads a whole corpus into blocks or rows (a peek at the first block does not count)."""
    import seshu.data.pipeline as pipeline
    import seshu.train.pretrain as pretrain_module
    import seshu.train.sft as sft_module
    from seshu.cli import main

    rank, command = os.environ["RANK"], [0]

    def note(what: str) -> None:
        with open(folder / "built.txt", "a", encoding="utf-8") as handle:
            handle.write(f"{command[0]} {rank} {what}\n")

    def counted(function: Callable[..., Any], what: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            note(what)
            return function(*args, **kwargs)

        return call

    def counted_when_read(generator: Callable[..., Iterator[Any]], what: str) -> Callable[..., Iterator[Any]]:
        def rows(*args: Any, **kwargs: Any) -> Iterator[Any]:
            yield from generator(*args, **kwargs)
            note(what)

        return rows

    pretrain_module.train_tokenizer = counted(pretrain_module.train_tokenizer, "tokenizer")
    pipeline._block_rows = counted_when_read(pipeline._block_rows, "blocks")
    sft_module._rows = counted_when_read(sft_module._rows, "rows")
    for index, args in enumerate(commands):
        command[0] = index
        sys.argv = ["seshu", *args]
        with open(folder / f"out-{index}-{rank}.txt", "w", encoding="utf-8") as out, contextlib.redirect_stdout(out):
            try:
                main()
            except SystemExit as exc:
                if exc.code:
                    raise


if __name__ == "__main__":
    probe(Path(sys.argv[1]), json.loads(sys.argv[2]))
