"""A ZeRO checkpoint written on 2 ranks resumes on 1 (pipelines/reshard.py), without Ray.

Two processes train a small network for 3 steps with fixed data, save as the trainer does, record
what they saved (whole weights, fp32 master weights, Adam moments) and take a 4th step: the
uninterrupted reference. One process then builds a fresh engine from another seed, loads the
checkpoint through `load_resharded`, records what it holds and takes the same 4th step on the same
two samples. Every case shares these three processes: starting DeepSpeed is most of the cost.
"""

from __future__ import annotations

import glob
import importlib
import os
import traceback
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import free_port

SAVED_STEPS = 3
CLIENT_STATE = {"iteration": SAVED_STEPS, "stage": {"dmd_phase": "student", "seen": [1, 2, 3]}}
CASES = {  # name: (ZeRO stage, precision)
    "zero0-fp32": (0, "fp32"),
    "zero1-fp32": (1, "fp32"),
    "zero2-fp32": (2, "fp32"),
    "zero3-fp32": (3, "fp32"),
    "zero2-bf16": (2, "bf16"),
    "zero3-bf16": (3, "bf16"),
}
ELSEWHERE = {"zero3-bf16"}  # converted into a folder of its own, as for a checkpoint folder kept read-only


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The global batch of each step: two samples, one per rank on 2 ranks, both on 1 rank."""
    generator = torch.Generator().manual_seed(7)
    return [
        (torch.randn(2, 4, generator=generator), torch.randn(2, 3, generator=generator))
        for _ in range(SAVED_STEPS + 1)
    ]


def _engine(stage: int, precision: str, world: int, seed: int):
    """The trainer's engine (its DeepSpeed config) for a two-layer network; the global batch stays 2."""
    import deepspeed

    from pipelines.deepspeed_setup import deepspeed_config
    from pipelines.trainer import TrainerConfig

    config = TrainerConfig(
        zero_stage=stage, precision=precision, num_workers=world, batch_size=2 // world, grad_accum=1, lr=0.05
    )
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    engine, *_ = deepspeed.initialize(
        model=module,
        model_parameters=module.parameters(),
        config=deepspeed_config(config, world, config.lr),
        dist_init_required=False,
    )
    return engine


def _step(engine, batch: tuple[torch.Tensor, torch.Tensor], rank: int, world: int) -> None:
    inputs, targets = (tensor[rank::world] for tensor in batch)
    dtype = next(engine.module.parameters()).dtype
    loss = torch.nn.functional.mse_loss(engine(inputs.to(dtype)).float(), targets)
    engine.backward(loss)
    engine.step()


def _weights(engine) -> dict[str, torch.Tensor]:
    """Whole weights by parameter name (gathered under ZeRO-3, a collective)."""
    from pipelines.deepspeed_setup import gathered

    named = list(engine.module.named_parameters())
    with gathered(param for _, param in named):
        return {name: param.detach().clone() for name, param in named}


def _snapshot(engine) -> dict[str, dict[str, torch.Tensor]]:
    """Whole weights, fp32 master weights and Adam moments by parameter name (collectives under ZeRO).

    ZeRO-0 in fp32 has no master copy: torch's AdamW steps the module's own parameters."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    named = list(engine.module.named_parameters())
    if engine.zero_optimization_stage() == 0:
        state = engine.optimizer.state
        return {
            "weights": _weights(engine),
            "fp32": {name: param.detach().clone() for name, param in named},
            "exp_avg": {name: state[param]["exp_avg"].clone() for name, param in named},
            "exp_avg_sq": {name: state[param]["exp_avg_sq"].clone() for name, param in named},
        }
    return {
        "weights": _weights(engine),
        "fp32": {name: safe_get_full_fp32_param(param).clone() for name, param in named},
        "exp_avg": {name: safe_get_full_optimizer_state(param, "exp_avg").clone() for name, param in named},
        "exp_avg_sq": {
            name: safe_get_full_optimizer_state(param, "exp_avg_sq").clone() for name, param in named
        },
    }


def _adam_steps(engine) -> list[int]:
    """Adam's step count of each parameter (ZeRO 0) or flat partition (ZeRO 1-3): its bias correction."""
    optimizer = engine.optimizer if engine.zero_optimization_stage() == 0 else engine.optimizer.optimizer
    return [int(state["step"]) for state in optimizer.state.values()]


def _train_and_save(case: str, rank: int, folder: str) -> None:
    batches = _batches()
    engine = _engine(*CASES[case], world=2, seed=0)
    for batch in batches[:SAVED_STEPS]:
        _step(engine, batch, rank, 2)
    engine.save_checkpoint(os.path.join(folder, case), tag="state", client_state=CLIENT_STATE)
    saved = {**_snapshot(engine), "adam_steps": _adam_steps(engine)}
    _step(engine, batches[SAVED_STEPS], rank, 2)
    saved["continued"] = _snapshot(engine)["fp32"]
    if rank == 0:
        torch.save(saved, os.path.join(folder, f"{case}.saved.pt"))


def _resume(case: str, folder: str) -> None:
    from pipelines.reshard import load_resharded

    try:
        engine = _engine(*CASES[case], world=1, seed=1)
        resumed = {"fresh": _weights(engine)}
        elsewhere = os.path.join(folder, f"{case}.universal") if case in ELSEWHERE else None
        resumed["client_state"] = load_resharded(engine, os.path.join(folder, case), "state", elsewhere)
        resumed.update(_snapshot(engine), adam_steps=_adam_steps(engine), global_steps=engine.global_steps)
        _step(engine, _batches()[SAVED_STEPS], 0, 1)
        resumed.update(continued=_snapshot(engine)["fp32"], global_steps_after=engine.global_steps)
    except Exception:  # reported by this case's test alone, not by every case's
        resumed = {"error": traceback.format_exc()}
    torch.save(resumed, os.path.join(folder, f"{case}.resumed.pt"))


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    """On 2 ranks: train, save, record, continue, for every case. On 1 rank: resume every case."""
    import torch.distributed as dist

    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce into a cache that every venv
    # on a machine shares and rebuilds for its own paths: tens of seconds a build. Gloo suffices.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for case in CASES:
            if world == 2:
                _train_and_save(case, rank, folder)
            else:
                _resume(case, folder)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("reshard"))
    for world in (2, 1):
        mp.start_processes(_worker, args=(world, free_port(), folder), nprocs=world, start_method="spawn")
    return folder


@pytest.mark.parametrize("case", CASES)
def test_zero_checkpoint_from_two_ranks_resumes_on_one(runs, case):
    from pipelines.reshard import UNIVERSAL_SUFFIX, saved_world_size, to_universal

    stage, precision = CASES[case]
    engine_dir = os.path.join(runs, case)
    saved = torch.load(os.path.join(runs, f"{case}.saved.pt"), weights_only=False)
    resumed = torch.load(os.path.join(runs, f"{case}.resumed.pt"), weights_only=False)
    assert "error" not in resumed, resumed.get("error")
    assert saved_world_size(engine_dir, "state") == 2

    names = list(saved["weights"])
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    # Known answers that a no-op load would miss: another seed's weights, and moments of real steps.
    assert not any(torch.equal(resumed["fresh"][n], saved["weights"][n]) for n in names)
    assert all(saved["exp_avg"][n].abs().min() > 0 and saved["exp_avg_sq"][n].abs().min() > 0 for n in names)
    assert saved["adam_steps"] and set(saved["adam_steps"]) == {SAVED_STEPS}

    for key in ("weights", "fp32", "exp_avg", "exp_avg_sq"):
        for name in names:
            assert torch.equal(resumed[key][name], saved[key][name]), (
                f"{key} of {name} differs after resharding"
            )
    assert set(resumed["adam_steps"]) == {SAVED_STEPS}  # Adam's bias correction resumes where it stopped
    assert resumed["global_steps"] == SAVED_STEPS and resumed["global_steps_after"] == SAVED_STEPS + 1
    assert {key: resumed["client_state"].get(key) for key in CLIENT_STATE} == CLIENT_STATE

    # One more step on 1 rank equals the 2-rank run's 4th step: a batch mean against an all-reduce
    # mean, exact up to rounding (bf16's in the forward and backward passes).
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if precision == "fp32" else {"rtol": 0.0, "atol": 2e-4}
    for name in names:
        assert not torch.allclose(saved["continued"][name], saved["fp32"][name], **tolerance)
        torch.testing.assert_close(resumed["continued"][name], saved["continued"][name], **tolerance)

    elsewhere = os.path.join(runs, f"{case}.universal") if case in ELSEWHERE else None
    universal = os.path.join(elsewhere or engine_dir, "state" + UNIVERSAL_SUFFIX)
    if stage == 0:  # one optimizer file, no shards: DeepSpeed's ordinary load, at any world size
        assert not os.path.exists(universal)
        return
    # Converted once, and reused without a second conversion; no staging folder left behind.
    stamp = os.stat(universal).st_mtime_ns
    assert to_universal(engine_dir, "state", elsewhere) == universal
    assert os.stat(universal).st_mtime_ns == stamp
    assert not [
        entry for entry in os.listdir(os.path.dirname(universal)) if entry.startswith(".state_universal-")
    ]
    if elsewhere:
        assert not [entry for entry in os.listdir(engine_dir) if "universal" in entry]


def _convert(engine_dir: str, universal_dir: str) -> str:
    from pipelines.reshard import to_universal

    return to_universal(engine_dir, "state", universal_dir)


def _universal_tensors(folder: str) -> dict[str, torch.Tensor]:
    """Each file of a universal checkpoint's zero/ folder: a parameter's fp32 weight, moment or step."""
    tensors = {}
    for path in sorted(glob.glob(os.path.join(folder, "zero", "*", "*.pt"))):
        loaded = torch.load(path, weights_only=False)
        tensors[os.path.relpath(path, folder)] = loaded["param"] if isinstance(loaded, dict) else loaded
    return tensors


def test_concurrent_conversions_on_one_machine_agree(runs, tmp_path):
    """Every rank of a machine converts the checkpoint it is about to load: one converts, the others
    wait for it and reuse its result."""
    engine_dir, scratch = os.path.join(runs, "zero2-fp32"), str(tmp_path / "scratch")
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        folders = list(pool.map(_convert, [engine_dir] * 2, [scratch] * 2))
    assert folders == [os.path.join(scratch, "state_universal")] * 2
    converted = _universal_tensors(folders[0])
    # The same as the conversion the zero2-fp32 case resumed from.
    expected = _universal_tensors(os.path.join(engine_dir, "state_universal"))
    assert list(converted) == list(expected) and "zero/0.weight/exp_avg.pt" in converted
    assert all(torch.equal(converted[name], expected[name]) for name in expected)
    assert sorted(os.listdir(scratch)) == [".state_universal.lock", "state_universal"]
